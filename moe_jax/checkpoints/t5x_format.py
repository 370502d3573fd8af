"""Reads dense T5 v1.1 checkpoints in T5X's on-disk format.

A T5X checkpoint directory (``.../checkpoint_1000000/``) holds

* ``checkpoint``: a msgpack file (flax serialization) of the train-state
  dict ``{"target": params, "state": {"step": ..., "param_states": ...}}``
  (older checkpoints nest both under ``"optimizer"``). Small arrays are stored
  inline; every large array is replaced by a *tensorstore spec* -- a dict with
  a ``"driver"`` key (``"zarr"``) whose ``kvstore`` path is relative to the
  checkpoint directory;
* one zarr directory per large array, named by its dotted path
  (``target.encoder.layers_0.mlp.wi_0.kernel/`` with ``.zarray`` + chunks).

T5X stores attention kernels with the heads joined (``[embed, heads * d_kv]``
and ``[heads * d_kv, embed]``); this project keeps them split. Parameter names
(T5X's ``t5x/examples/t5`` network) map onto ours like this:

=============================================  ======================================
T5X ``target/...``                             moe_jax params
=============================================  ======================================
token_embedder/embedding [vocab, d]            token_embedder/embedding
{enc,dec}oder/relpos_bias/rel_embedding [h,b]  {enc,dec}oder/relpos_bias/rel_embedding
encoder/layers_i/pre_attention_layer_norm      encoder/layers/layers_i/pre_self_attention_norm
decoder/layers_i/pre_self_attention_layer_norm decoder/layers/layers_i/pre_self_attention_norm
.../attention | self_attention/{q,k,v}/kernel  .../self_attention/{query,key,value}/kernel [d,h,kv]
  [d, h*kv]; .../out/kernel [h*kv, d]            .../out/kernel [h, kv, d]
decoder/layers_i/pre_cross_attention_layer_norm  .../pre_cross_attention_norm
decoder/layers_i/encoder_decoder_attention/*   .../encoder_decoder_attention/*
.../pre_mlp_layer_norm/scale                   .../pre_mlp_norm/scale
.../mlp/{wi_0,wi_1,wi,wo}/kernel               .../mlp/{wi_0,wi_1,wi,wo}/kernel
encoder/encoder_norm, decoder/decoder_norm     encoder/encoder_norm, decoder/decoder_norm
decoder/logits_dense/kernel [d, vocab]         decoder/logits_dense/kernel
=============================================  ======================================
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import numpy as np

CHECKPOINT_FILE = "checkpoint"
_LAYER = re.compile(r"^layers_(\d+)$")


class T5xFormatError(ValueError):
  """The directory is not a dense T5 v1.1 checkpoint in T5X's format."""


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """``{"a/b": leaf}``; a dict with a ``"driver"`` key is a (tensorstore) leaf."""
  if isinstance(tree, Mapping) and not _is_ts_spec(tree):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}{k}/"))
    return out
  return {prefix.rstrip("/"): tree}


def _is_ts_spec(x: Any) -> bool:
  return isinstance(x, Mapping) and "driver" in x


def _absolute_spec(spec: Mapping[str, Any], checkpoint_dir: str) -> dict:
  """The spec with its (relative) file kvstore path made absolute."""
  spec = dict(spec)
  kvstore = spec.get("kvstore")
  if isinstance(kvstore, str):
    kvstore = {"driver": "file", "path": kvstore}
  if isinstance(kvstore, Mapping):
    kvstore = dict(kvstore)
    if kvstore.get("driver") == "file":
      path = kvstore.get("path", "")
      if "path" in spec:  # older specs split the array dir off the kvstore
        path = os.path.join(path, spec.pop("path"))
      if not os.path.isabs(path):
        path = os.path.join(checkpoint_dir, path)
      kvstore["path"] = path
    spec["kvstore"] = kvstore
  return spec


def _read_leaf(leaf: Any, checkpoint_dir: str, name: str) -> np.ndarray:
  if _is_ts_spec(leaf):
    import tensorstore as ts  # pylint: disable=g-import-not-at-top
    spec = _absolute_spec(leaf, checkpoint_dir)
    try:
      arr = ts.open(spec, open=True, read=True).result()
      return np.asarray(arr.read().result())
    except Exception as e:  # pylint: disable=broad-except
      raise T5xFormatError(
          f"Could not read the tensorstore array of {name!r} (spec {spec}): {e}. "
          "Is the checkpoint directory complete (one zarr directory per large "
          "array next to the 'checkpoint' file)?") from e
  return np.asarray(leaf)


def read_t5x_tree(path: str) -> tuple[dict[str, Any], str]:
  """Unread leaves of a T5X checkpoint: ``({"target/...": leaf}, checkpoint_dir)``.

  Leaves are numpy arrays (inline) or tensorstore spec dicts (read lazily by
  :func:`read_t5x_arrays`).
  """
  from flax import serialization  # pylint: disable=g-import-not-at-top
  ckpt_file = path if os.path.isfile(path) else os.path.join(path, CHECKPOINT_FILE)
  if not os.path.isfile(ckpt_file):
    raise FileNotFoundError(
        f"No T5X '{CHECKPOINT_FILE}' file at {path}: pass the T5X checkpoint "
        "directory (e.g. .../checkpoint_1000000) that holds the msgpack "
        f"'{CHECKPOINT_FILE}' file.")
  with open(ckpt_file, "rb") as f:
    tree = serialization.msgpack_restore(f.read())
  if not isinstance(tree, Mapping):
    raise T5xFormatError(f"{ckpt_file} does not hold a T5X state dict.")
  if "optimizer" in tree and "target" not in tree:
    tree = tree["optimizer"]
  if "target" not in tree:
    raise T5xFormatError(
        f"{ckpt_file} has no 'target' (parameters) entry; top-level keys are "
        f"{sorted(tree)}. Is it a T5X train-state checkpoint?")
  return _flatten(tree), os.path.dirname(ckpt_file)


def read_t5x_arrays(path: str, prefix: str = "target/") -> dict[str, np.ndarray]:
  """``{name: array}`` for every leaf under ``prefix`` (``prefix`` stripped)."""
  flat, ckpt_dir = read_t5x_tree(path)
  return {k[len(prefix):]: _read_leaf(v, ckpt_dir, k)
          for k, v in flat.items() if k.startswith(prefix)}


def read_t5x_step(path: str) -> int:
  """The ``state/step`` of a T5X checkpoint (0 when absent)."""
  flat, ckpt_dir = read_t5x_tree(path)
  leaf = flat.get("state/step")
  if leaf is None:
    return 0
  return int(np.asarray(_read_leaf(leaf, ckpt_dir, "state/step")).reshape(-1)[0])


def _num_layers(names, stack: str) -> int:
  idx = {int(m.group(1)) for n in names if n.startswith(f"{stack}/")
         for m in [_LAYER.match(n.split("/")[1])] if m}
  if not idx:
    raise T5xFormatError(
        f"The T5X checkpoint has no '{stack}/layers_<i>' parameters: not a T5 "
        "v1.1 encoder-decoder checkpoint.")
  if idx != set(range(len(idx))):
    raise T5xFormatError(f"The T5X checkpoint's {stack} layers {sorted(idx)} are "
                         "not numbered 0..n-1.")
  return len(idx)


def t5x_to_params(target: Mapping[str, np.ndarray]) -> dict:
  """Our unrolled params tree (numpy float32) from T5X ``target`` arrays.

  Args:
    target: ``{"encoder/layers_0/mlp/wi_0/kernel": array, ...}`` (paths
      below ``target/``).

  Raises:
    T5xFormatError: a T5 v1.1 parameter is missing or sparse (the message
      names it).
  """
  target = dict(target)
  if any("/moe/" in n or "/expert" in n for n in target):
    raise T5xFormatError("The T5X checkpoint already has MoE parameters; "
                         "upcycling needs a dense checkpoint.")

  def get(name):
    if name not in target:
      raise T5xFormatError(
          f"The T5X checkpoint lacks the T5 v1.1 parameter target/{name}; is it a "
          "dense T5 v1.1 / mT5 checkpoint (t5x/examples/t5 network)?")
    return np.asarray(target[name], np.float32)

  rel = get("encoder/relpos_bias/rel_embedding")
  heads = rel.shape[0]

  def attention(prefix):
    q = get(f"{prefix}/query/kernel")
    d, joined = q.shape
    if joined % heads:
      raise T5xFormatError(f"{prefix}/query/kernel has {joined} columns, not a "
                           f"multiple of the {heads} heads of relpos_bias.")
    kv = joined // heads
    split = lambda n: get(f"{prefix}/{n}/kernel").reshape(d, heads, kv)  # noqa: E731
    return {"query": {"kernel": split("query")}, "key": {"kernel": split("key")},
            "value": {"kernel": split("value")},
            "out": {"kernel": get(f"{prefix}/out/kernel").reshape(heads, kv, d)}}

  def mlp(prefix):
    names = [n for n in ("wi", "wi_0", "wi_1", "wo")
             if f"{prefix}/{n}/kernel" in target]
    if "wo" not in names:
      get(f"{prefix}/wo/kernel")  # raises, naming it
    return {n: {"kernel": get(f"{prefix}/{n}/kernel")} for n in names}

  def norm(name):
    return {"scale": get(f"{name}/scale")}

  params = {"token_embedder": {"embedding": get("token_embedder/embedding")}}
  for stack in ("encoder", "decoder"):
    layers = {}
    for i in range(_num_layers(target, stack)):
      p = f"{stack}/layers_{i}"
      if stack == "encoder":
        layer = {"pre_self_attention_norm": norm(f"{p}/pre_attention_layer_norm"),
                 "self_attention": attention(f"{p}/attention")}
      else:
        layer = {"pre_self_attention_norm": norm(f"{p}/pre_self_attention_layer_norm"),
                 "self_attention": attention(f"{p}/self_attention"),
                 "pre_cross_attention_norm": norm(f"{p}/pre_cross_attention_layer_norm"),
                 "encoder_decoder_attention": attention(f"{p}/encoder_decoder_attention")}
      layer["pre_mlp_norm"] = norm(f"{p}/pre_mlp_layer_norm")
      layer["mlp"] = mlp(f"{p}/mlp")
      layers[f"layers_{i}"] = layer
    params[stack] = {"layers": layers,
                     "relpos_bias": {"rel_embedding": get(f"{stack}/relpos_bias/rel_embedding")},
                     f"{stack}_norm": norm(f"{stack}/{stack}_norm")}
  if "decoder/logits_dense/kernel" in target:
    params["decoder"]["logits_dense"] = {"kernel": get("decoder/logits_dense/kernel")}
  return params


def load_t5x_params(path: str) -> dict:
  """Our unrolled params tree (numpy float32) from a T5X checkpoint directory.

  T5X checkpoints carry no model config: :func:`moe_jax.checkpoints.formats.
  read_dense_checkpoint` derives it from these shapes.
  """
  return t5x_to_params(read_t5x_arrays(path))
