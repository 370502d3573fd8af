"""Checking a checkpoint against a model, name maps, and params-only restore.

Two kinds of restore exist:

* **resume** (:class:`moe_jax.checkpoints.manager.CheckpointManager`): the
  whole train state comes back, every leaf must be in the checkpoint with the
  same shape (:func:`check_compatible` with ``allow_unused=False``).
* **initial checkpoint** for finetuning (:func:`restore_params`): only the
  parameters, possibly a subset of what the checkpoint holds, possibly under
  new names declared in a small *name map*, possibly cast to a new dtype.

Both refuse to guess: a parameter the model expects that is missing from the
checkpoint, or whose shape differs (a different number of experts, say),
raises :class:`CheckpointMismatchError` naming the parameter and both shapes.
A parameter is only left to its fresh initialization when the name map
declares it so with ``None``.

Name maps: ``{model_path: checkpoint_path_or_None}``, paths slash-joined and
relative to the params roots (``"encoder/layers_0/mlp/wi/kernel"``). A key
matches a model path exactly, or as a prefix ending at a ``/`` boundary (so
``{"decoder/block_0": "decoder/layers_0"}`` renames a whole subtree); the
longest matching key wins.
"""

from __future__ import annotations

import difflib
import logging
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from moe_jax.checkpoints import tree_paths

NameMap = Mapping[str, Optional[str]]

STATE_ITEM = "state"
DATA_STATE_ITEM = "data_state"
_ORBAX_METADATA_FILE = "_METADATA"


class CheckpointMismatchError(ValueError):
  """The checkpoint does not fit the model/train state it is restored into."""


def _shape(x: Any) -> tuple[int, ...]:
  return tuple(int(d) for d in x.shape)


def _similar(name: str, candidates) -> str:
  close = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.6)
  return f" Similar names in the checkpoint: {close}." if close else ""


def check_compatible(expected: Mapping[str, Any], stored: Mapping[str, Any],
                     *, allow_unused: bool,
                     source_names: Optional[Mapping[str, str]] = None,
                     what: str = "checkpoint") -> None:
  """Raises if ``stored`` cannot supply every leaf of ``expected``.

  Args:
    expected: ``{path: array or ShapeDtypeStruct}`` the caller wants.
    stored: ``{path: metadata with .shape}`` from the checkpoint.
    allow_unused: accept checkpoint leaves nobody asked for (subset restore).
    source_names: ``{expected_path: stored_path}`` when names were mapped;
      by default each path is looked up under its own name.
    what: word used for the checkpoint in messages.

  Raises:
    CheckpointMismatchError: listing every missing parameter, every shape
      mismatch (``name: checkpoint shape (8, 4) != model shape (4, 4)``) and,
      unless ``allow_unused``, every checkpoint leaf the model lacks.
  """
  source_names = source_names or {}
  problems = []
  used = set()
  for name, want in expected.items():
    src = source_names.get(name, name)
    shown = name if src == name else f"{name} (from {what} {src!r})"
    if src not in stored:
      problems.append(f"missing in {what}: {shown} with model shape "
                      f"{_shape(want)}.{_similar(src, stored)}")
      continue
    used.add(src)
    have = stored[src]
    if _shape(have) != _shape(want):
      hint = ""
      if (len(have.shape) == len(want.shape) and len(want.shape) >= 2
          and _shape(have)[1:] == _shape(want)[1:]):
        hint = (" (leading dimension differs: a different number of experts? "
                "upcycle or prune the checkpoint instead of loading it)")
      problems.append(f"shape mismatch: {shown}: {what} shape {_shape(have)} "
                      f"!= model shape {_shape(want)}{hint}")
  if not allow_unused:
    for src in sorted(set(stored) - used):
      problems.append(f"not in the model: {what} has {src} with shape "
                      f"{_shape(stored[src])}")
  if problems:
    raise CheckpointMismatchError(
        f"The {what} does not match the model ({len(problems)} problem(s)):\n  "
        + "\n  ".join(problems)
        + "\nFix the model config (sizes, number of experts, layer names) to "
        "match the checkpoint, or restore params only with a declared name "
        "map (moe_jax.checkpoints.restore.restore_params).")


def leaf_shardings(abstract: Any, shardings: Any) -> Any:
  """``shardings``, or each abstract leaf's own ``.sharding`` when ``None``.

  Raises:
    ValueError: ``shardings`` is ``None`` and a leaf carries no sharding.
  """
  if shardings is not None:
    return shardings
  flat = tree_paths.flatten_with_paths(abstract)
  unsharded = [n for n, x in flat.items() if getattr(x, "sharding", None) is None]
  if unsharded:
    raise ValueError(
        f"No sharding for {unsharded[:5]}: pass shardings (e.g. from "
        "partitioning.params_shardings) or give the abstract leaves one with "
        "jax.ShapeDtypeStruct(shape, dtype, sharding=...).")
  return jax.tree_util.tree_map(lambda x: x.sharding, abstract)


def map_name(name: str, name_map: Optional[NameMap]) -> Optional[str]:
  """Checkpoint path for model path ``name`` under ``name_map``.

  Returns ``None`` when the map declares the parameter as not loaded.
  """
  if not name_map:
    return name
  best = None
  for key in name_map:
    stripped = key.rstrip(tree_paths.SEP)
    if name == stripped or name.startswith(stripped + tree_paths.SEP):
      if best is None or len(stripped) > len(best.rstrip(tree_paths.SEP)):
        best = key
  if best is None:
    return name
  target = name_map[best]
  if target is None:
    return None
  rest = name[len(best.rstrip(tree_paths.SEP)):]
  return target.rstrip(tree_paths.SEP) + rest


def stored_metadata(item_dir: str) -> dict[str, Any]:
  """``{path: ArrayMetadata}`` of an Orbax pytree item directory."""
  meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(item_dir))
  return tree_paths.flatten_with_paths(meta.tree)


def committed_steps(root) -> list[int]:
  """Steps of a run directory with a committed ``state`` item, ascending
  (Orbax writes a step under a temporary name: a half-written one is absent)."""
  root = epath.Path(root)
  return sorted(int(p.name) for p in root.iterdir()
                if p.name.isdigit() and (p / STATE_ITEM / _ORBAX_METADATA_FILE).exists())


def resolve_state_dir(path: str) -> str:
  """The Orbax ``state`` item directory that ``path`` names.

  ``path`` may be the item directory itself, a step directory written by
  :class:`~moe_jax.checkpoints.manager.CheckpointManager` (``.../1000``), or
  the manager's root directory (the latest committed step is used).
  """
  path = epath.Path(path)
  if (path / _ORBAX_METADATA_FILE).exists():
    return str(path)
  if (path / STATE_ITEM / _ORBAX_METADATA_FILE).exists():
    return str(path / STATE_ITEM)
  if path.is_dir():
    steps = committed_steps(path)
    if steps:
      return str(path / str(steps[-1]) / STATE_ITEM)
  raise FileNotFoundError(
      f"No Orbax checkpoint at '{path}': expected an item directory holding "
      f"{_ORBAX_METADATA_FILE}, a step directory holding '{STATE_ITEM}/', or a "
      "model directory with numbered step directories. Check the "
      "initial-checkpoint path in your gin config.")


def _params_root(stored: dict[str, Any], params_key: Optional[str], where: str
                 ) -> dict[str, Any]:
  if not params_key:
    return stored
  prefix = params_key.rstrip(tree_paths.SEP) + tree_paths.SEP
  sub = {k[len(prefix):]: v for k, v in stored.items() if k.startswith(prefix)}
  if not sub:
    tops = sorted({k.split(tree_paths.SEP)[0] for k in stored})
    raise CheckpointMismatchError(
        f"The checkpoint at {where} has no {params_key!r} subtree (top-level "
        f"entries: {tops}). Pass params_key=None for a checkpoint whose root "
        "is the params tree, or the right key.")
  return sub


def restore_params(path: str, abstract_params: Any, shardings: Any = None, *,
                   name_map: Optional[NameMap] = None,
                   dtype: Any = None,
                   init_params: Any = None,
                   params_key: Optional[str] = "params") -> Any:
  """Restores model parameters from a checkpoint (e.g. to start finetuning).

  Args:
    path: checkpoint location (see :func:`resolve_state_dir`).
    abstract_params: the model's params tree of ``jax.ShapeDtypeStruct`` (or
      arrays); gives the structure, shapes and, without ``dtype``, dtypes.
    shardings: tree of ``jax.sharding.Sharding`` like ``abstract_params``;
      ``None`` uses each leaf's own ``.sharding``.
    name_map: ``{model_path: checkpoint_path or None}`` (module docstring).
      ``None`` declares "initialize this one fresh"; its value then comes from
      ``init_params``.
    dtype: cast every floating-point parameter to this dtype (e.g.
      ``jnp.bfloat16``); integer leaves keep theirs.
    init_params: concrete params tree like ``abstract_params``; required only
      when the name map declares parameters as not loaded.
    params_key: the subtree of the checkpoint holding the params (``"params"``
      for a train state written by the manager; ``None`` for the root).

  Returns:
    A params tree with ``abstract_params``'s structure, every leaf a
    ``jax.Array`` placed with its sharding.

  Raises:
    CheckpointMismatchError: a parameter is missing from the checkpoint or has
      another shape there (the message names it and both shapes).
    ValueError: the name map declares a parameter as not loaded but no
      ``init_params`` was given.
  """
  item_dir = resolve_state_dir(path)
  stored = _params_root(stored_metadata(item_dir), params_key, item_dir)
  shardings = leaf_shardings(abstract_params, shardings)
  wanted = tree_paths.flatten_with_paths(abstract_params)
  wanted_sh = tree_paths.flatten_with_paths(shardings)
  unknown = [k for k in (name_map or {})
             if not any(n == k.rstrip(tree_paths.SEP) or
                        n.startswith(k.rstrip(tree_paths.SEP) + tree_paths.SEP)
                        for n in wanted)]
  if unknown:
    raise ValueError(f"Name map keys {unknown} match no model parameter; "
                     f"model parameters look like {sorted(wanted)[:5]}.")

  sources = {name: map_name(name, name_map) for name in wanted}
  fresh = sorted(n for n, s in sources.items() if s is None)
  if fresh and init_params is None:
    raise ValueError(
        f"The name map declares {fresh} as not loaded from the checkpoint; "
        "pass init_params (the freshly initialized params) to fill them.")
  to_load = {n: s for n, s in sources.items() if s is not None}
  check_compatible({n: wanted[n] for n in to_load}, stored, allow_unused=True,
                   source_names=to_load)
  unused = sorted(set(stored) - set(to_load.values()))
  if unused:
    logging.info("restore_params: %d checkpoint parameters not loaded: %s",
                 len(unused), unused[:20])

  def target_dtype(name):
    want = wanted[name].dtype
    if dtype is not None and jnp.issubdtype(want, jnp.floating):
      return jnp.dtype(dtype)
    return want

  # One read per checkpoint leaf; a leaf feeding several parameters is
  # restored once and copied into the other shardings.
  first_user: dict[str, str] = {}
  for name, src in to_load.items():
    first_user.setdefault(src, name)
  item = {}
  restore_args = {}
  for src, name in first_user.items():
    prefix = params_key.rstrip(tree_paths.SEP) + tree_paths.SEP if params_key else ""
    item[prefix + src] = jax.ShapeDtypeStruct(
        _shape(wanted[name]), target_dtype(name), sharding=wanted_sh[name])
    restore_args[prefix + src] = ocp.ArrayRestoreArgs(
        sharding=wanted_sh[name], dtype=target_dtype(name),
        global_shape=_shape(wanted[name]))
  loaded = ocp.PyTreeCheckpointer().restore(
      item_dir, args=ocp.args.PyTreeRestore(
          item=traverse_util.unflatten_dict(item, sep=tree_paths.SEP),
          restore_args=traverse_util.unflatten_dict(restore_args, sep=tree_paths.SEP),
          partial_restore=True))
  loaded = tree_paths.flatten_with_paths(loaded)
  if params_key:
    prefix = params_key.rstrip(tree_paths.SEP) + tree_paths.SEP
    loaded = {k[len(prefix):]: v for k, v in loaded.items()}

  init_flat = (tree_paths.flatten_with_paths(init_params)
               if init_params is not None else {})
  out = {}
  for name in wanted:
    src = sources[name]
    if src is None:
      value = init_flat[name]
      if dtype is not None and jnp.issubdtype(value.dtype, jnp.floating):
        value = value.astype(dtype)
      out[name] = jax.device_put(value, wanted_sh[name])
    else:
      value = loaded[src]
      if first_user[src] != name:
        value = jax.device_put(value, wanted_sh[name])
      out[name] = value
  leaves_in_order = [out[n] for n in wanted]
  treedef = jax.tree_util.tree_structure(abstract_params)
  return jax.tree_util.tree_unflatten(treedef, leaves_in_order)
