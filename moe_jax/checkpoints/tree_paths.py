"""Slash-joined leaf paths for pytrees and Orbax checkpoint metadata.

Checkpoint code talks about parameters by *path*: ``"params/encoder/layers_0/
mlp/wi/kernel"``. The same path must come out of a live train state (a flax
struct dataclass, optax namedtuples, dicts, tuples) and out of the metadata
tree Orbax writes next to a checkpoint (where dataclasses and namedtuples
have become dicts keyed by field name, and tuples have become lists). Both
flatten through :func:`flatten_with_paths`, so their paths agree.

Typed PRNG keys (``jax.random.key``) are stored as their raw ``uint32`` key
data; :func:`encode_prng_keys` / :func:`decode_prng_keys` do that round trip.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

SEP = "/"


def flatten_with_paths(tree: Any, is_leaf: Callable[[Any], bool] | None = None
                       ) -> dict[str, Any]:
  """``{path: leaf}`` for every leaf of ``tree`` (``None`` nodes are empty).

  Paths are ``jax.tree_util.keystr(..., simple=True, separator="/")``: dict
  keys, attribute names and sequence indices joined by ``/``. (Plain dict
  trees can use ``flax.traverse_util.flatten_dict(tree, sep="/")``.)

  Raises:
    ValueError: two leaves map to the same path (e.g. the key ``"a/b"`` beside
      ``{"a": {"b": ...}}``), which would make names ambiguous.
  """
  out: dict[str, Any] = {}
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=is_leaf)[0]:
    name = jax.tree_util.keystr(key_path, simple=True, separator=SEP)
    if name in out:
      raise ValueError(
          f"Two leaves of the tree share the path {name!r}; rename one of the "
          "keys so every leaf has a unique slash-joined path.")
    out[name] = leaf
  return out


def is_prng_key(x: Any) -> bool:
  """True for typed PRNG key arrays and their ``ShapeDtypeStruct``s."""
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)


def _key_data_abstract(x: Any) -> tuple[jax.ShapeDtypeStruct, Any]:
  """Abstract ``uint32`` key data of a typed key, and the key's PRNG impl."""
  impls = []

  def data(k):
    impls.append(jax.random.key_impl(k))
    return jax.random.key_data(k)

  out = jax.eval_shape(data, jax.ShapeDtypeStruct(x.shape, x.dtype))
  return out, impls[0]


def encode_prng_keys(tree: Any) -> tuple[Any, Any]:
  """Replaces typed PRNG keys by their raw ``uint32`` key data.

  Works on concrete arrays and on ``jax.ShapeDtypeStruct`` trees (abstract
  keys become ``ShapeDtypeStruct(shape + impl_key_shape, uint32)``, keeping
  their sharding, which leaves the trailing key-data dimension replicated).

  Returns:
    ``(encoded_tree, impls)``: ``impls`` has ``tree``'s structure with the
    PRNG implementation at key leaves and ``None`` elsewhere; pass it to
    :func:`decode_prng_keys`.
  """
  def encode(x):
    if not is_prng_key(x):
      return x, None
    if isinstance(x, jax.ShapeDtypeStruct):
      data, impl = _key_data_abstract(x)
      return jax.ShapeDtypeStruct(data.shape, data.dtype,
                                  sharding=x.sharding), impl
    return jax.random.key_data(x), jax.random.key_impl(x)

  leaves, treedef = jax.tree_util.tree_flatten(tree)
  pairs = [encode(x) for x in leaves]
  encoded = treedef.unflatten([p[0] for p in pairs])
  impls = treedef.unflatten([_Impl(p[1]) for p in pairs])
  return encoded, impls


class _Impl:
  """Opaque leaf holding a PRNG impl (or ``None``) so trees keep their shape."""

  def __init__(self, impl):
    self.impl = impl


def decode_prng_keys(tree: Any, impls: Any) -> Any:
  """Inverse of :func:`encode_prng_keys` on a restored (concrete) tree."""
  def decode(x, box):
    if box.impl is None:
      return x
    return jax.random.wrap_key_data(x, impl=box.impl)

  return jax.tree_util.tree_map(decode, tree, impls)
