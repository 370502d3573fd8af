"""Dense checkpoint formats: detection, this project's Orbax reader, shape-derived configs.

``detect_format(path)`` tells the three formats apart by their files:

* ``"hf"``: ``config.json`` + ``*.safetensors`` (Hugging Face ``save_pretrained``);
* ``"t5x"``: a msgpack ``checkpoint`` file (T5X ``checkpoint_<step>/``);
* ``"moe_jax"``: an Orbax train state of this project (a model directory with
  numbered step directories, a step directory, or its ``state/`` item).

``read_dense_checkpoint(path, format)`` -- the one format dispatcher --
returns a :class:`DenseCheckpoint` (params in this project's unrolled naming,
``T5Config``, the step, and for ``moe_jax`` the location of the full train
state so its optimizer state can be carried). The readers of the formats
return params; the config comes from Hugging Face's ``config.json``, or, for
T5X and moe_jax checkpoints (which carry none), from the parameter shapes
(:func:`config_from_params`). ``load_dense_t5`` in ``moe_jax.checkpoints`` is
the thin public ``(params, config)`` view.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from typing import Any, Optional

import numpy as np

from moe_jax.models.config import T5Config

FORMATS = ("auto", "moe_jax", "t5x", "hf")
_LAYER = re.compile(r"^layers_(\d+)$")


class DenseFormatError(ValueError):
  """A checkpoint that is not a dense T5 v1.1 in a known format."""


def detect_format(path: str) -> str:
  """``"hf"``, ``"t5x"`` or ``"moe_jax"`` from the files at ``path``.

  Raises:
    DenseFormatError: none matches (the message lists what each needs).
  """
  if os.path.isdir(path):
    if (os.path.exists(os.path.join(path, "config.json"))
        and glob.glob(os.path.join(path, "*.safetensors"))):
      return "hf"
    if os.path.isfile(os.path.join(path, "checkpoint")):
      return "t5x"
  elif os.path.isfile(path) and os.path.basename(path) == "checkpoint":
    return "t5x"
  from moe_jax.checkpoints import restore  # pylint: disable=g-import-not-at-top
  try:
    restore.resolve_state_dir(path)
    return "moe_jax"
  except FileNotFoundError:
    pass
  raise DenseFormatError(
      f"Cannot tell the checkpoint format of {path!r}: expected config.json + "
      "*.safetensors (--format=hf), a T5X directory with a msgpack 'checkpoint' "
      "file (--format=t5x) or an Orbax checkpoint of moe_jax (a model/step "
      "directory, --format=moe_jax).")


# ----------------------------------------------------------------------------
# Config from parameter shapes
# ----------------------------------------------------------------------------
def _num_layers(stack_params: dict, stack: str) -> int:
  layers = stack_params.get("layers", {})
  idx = sorted(int(m.group(1)) for k in layers for m in [_LAYER.match(k)] if m)
  if not idx or idx != list(range(len(idx))):
    raise DenseFormatError(
        f"{stack}/layers has no layers_0..layers_<n-1> entries (found "
        f"{sorted(layers)[:5]}); is this a T5 v1.1 checkpoint with unrolled layers?")
  return len(idx)


def _need(tree: dict, path: str) -> np.ndarray:
  node: Any = tree
  for part in path.split("/"):
    if not isinstance(node, dict) or part not in node:
      raise DenseFormatError(
          f"The checkpoint lacks the T5 v1.1 parameter {path!r}; it is not a "
          "dense T5 v1.1 encoder-decoder checkpoint.")
    node = node[part]
  return node


def config_from_params(params: dict, **overrides) -> T5Config:
  """A dense ``T5Config`` whose sizes are read off the parameter shapes.

  Args:
    params: unrolled params tree in this project's naming (leaves need only
      ``.shape``).
    **overrides: fields shapes cannot tell (``activations``, ``dropout_rate``,
      ``layer_norm_epsilon``, ``relative_attention_max_distance``, dtypes).

  Raises:
    DenseFormatError: a T5 v1.1 parameter is missing, the model is already
      sparse, or shapes disagree (the message names the parameter).
  """
  enc_layer = "encoder/layers/layers_0"
  for stack in ("encoder", "decoder"):
    for name, layer in _need(params, f"{stack}/layers").items():
      if "moe" in layer:
        raise DenseFormatError(
            f"{stack}/layers/{name} is already an MoE layer; upcycling needs a "
            "dense checkpoint.")
  vocab, d_model = _need(params, "token_embedder/embedding").shape
  d, heads, d_kv = _need(params, f"{enc_layer}/self_attention/query/kernel").shape
  if d != d_model:
    raise DenseFormatError(
        f"{enc_layer}/self_attention/query/kernel has input size {d} but the "
        f"embedding has d_model {d_model}.")
  mlp = _need(params, f"{enc_layer}/mlp")
  gated = "wi_0" in mlp
  wi = _need(params, f"{enc_layer}/mlp/{'wi_0' if gated else 'wi'}/kernel")
  heads_rel, buckets = _need(params, "encoder/relpos_bias/rel_embedding").shape
  if heads_rel != heads:
    raise DenseFormatError(
        f"encoder/relpos_bias/rel_embedding has {heads_rel} heads but attention "
        f"kernels have {heads}.")
  kwargs = dict(
      vocab_size=int(vocab), d_model=int(d_model), num_heads=int(heads),
      d_kv=int(d_kv), d_ff=int(wi.shape[1]),
      num_encoder_layers=_num_layers(params["encoder"], "encoder"),
      num_decoder_layers=_num_layers(_need(params, "decoder"), "decoder"),
      activations=("gelu", "linear") if gated else ("relu",),
      relative_attention_num_buckets=int(buckets),
      logits_via_embedding="logits_dense" not in params["decoder"])
  kwargs.update(overrides)
  if len(kwargs["activations"]) != (2 if gated else 1):
    raise DenseFormatError(
        f"activations={tuple(kwargs['activations'])} do not fit the checkpoint's "
        f"{'gated (wi_0, wi_1)' if gated else 'plain (wi)'} MLP.")
  return T5Config(**kwargs)


# ----------------------------------------------------------------------------
# This project's Orbax format
# ----------------------------------------------------------------------------
def _unscan_stack(stack: dict) -> dict:
  """``layers/layers/layer_j [blocks, ...]`` -> ``layers/layers_i`` (dense stacks)."""
  import jax  # pylint: disable=g-import-not-at-top
  inner = stack.get("layers", {})
  if not any(k.startswith("layer_") for k in inner) or any(
      k.startswith("layers_") for k in inner):
    return stack
  period = len(inner)
  blocks = jax.tree_util.tree_leaves(inner)[0].shape[0]
  out = {k: v for k, v in stack.items() if k != "layers"}
  out["layers"] = {
      f"layers_{b * period + j}": jax.tree_util.tree_map(lambda x, b=b: x[b],
                                                         inner[f"layer_{j}"])
      for b in range(blocks) for j in range(period)}
  return out


def _moe_jax_stored_params(path: str) -> tuple[str, dict[str, Any]]:
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from moe_jax.checkpoints import restore  # pylint: disable=g-import-not-at-top
  item_dir = restore.resolve_state_dir(path)
  stored = restore.stored_metadata(item_dir)
  params = {k[len("params/"):]: v for k, v in stored.items() if k.startswith("params/")}
  if not params:
    raise DenseFormatError(
        f"The Orbax checkpoint at {item_dir} has no 'params' subtree; it is not a "
        "moe_jax train state.")
  return item_dir, traverse_util.unflatten_dict(params, sep="/")


def load_moe_jax_params(path: str) -> tuple[dict, str, int]:
  """Params (numpy), state item dir and step of this project's checkpoint."""
  from moe_jax.checkpoints import params_only  # pylint: disable=g-import-not-at-top
  item_dir, _ = _moe_jax_stored_params(path)  # refuses a tree without params
  stored, _ = params_only.read_stored_params(item_dir)
  params = params_only.unflatten({n: v.astype(np.float32) for n, v in stored.items()})
  for stack in ("encoder", "decoder"):
    if stack in params:
      params[stack] = _unscan_stack(params[stack])
  step_dir = os.path.basename(os.path.dirname(item_dir.rstrip("/")))
  step = int(step_dir) if step_dir.isdigit() else 0
  return params, item_dir, step


# ----------------------------------------------------------------------------
# One entry point
# ----------------------------------------------------------------------------
@dataclasses.dataclass
class DenseCheckpoint:
  """A dense T5 v1.1 checkpoint read into this project's naming.

  Attributes:
    params: unrolled params tree (numpy float32 leaves).
    config: dense ``T5Config`` (sizes from the checkpoint).
    format: the format it was read as.
    step: training step of the checkpoint (0 when it has none, e.g. HF).
    state_dir: for ``moe_jax``, the Orbax ``state`` item (full train state,
      used to carry the optimizer state); else ``None``.
  """
  params: dict
  config: T5Config
  format: str
  step: int = 0
  state_dir: Optional[str] = None


def read_dense_checkpoint(path: str, format: str = "auto",  # pylint: disable=redefined-builtin
                          **config_overrides) -> DenseCheckpoint:
  """Reads a dense T5 v1.1 checkpoint in any supported format."""
  if format not in FORMATS:
    raise DenseFormatError(f"Unknown checkpoint format {format!r}; use one of {FORMATS}.")
  if not os.path.exists(path):
    raise FileNotFoundError(f"Dense checkpoint {path!r} does not exist.")
  fmt = detect_format(path) if format == "auto" else format
  if fmt == "hf":
    from moe_jax.checkpoints.hf import load_hf_t5  # pylint: disable=g-import-not-at-top
    params, config = load_hf_t5(path, **config_overrides)
    config_from_params(params)  # refuses sparse / non-T5 trees, naming the parameter
    return DenseCheckpoint(params, config, "hf")
  if fmt == "t5x":
    from moe_jax.checkpoints import t5x_format  # pylint: disable=g-import-not-at-top
    params = t5x_format.load_t5x_params(path)
    return DenseCheckpoint(params, config_from_params(params, **config_overrides),
                           "t5x", step=t5x_format.read_t5x_step(path))
  params, state_dir, step = load_moe_jax_params(path)
  config = config_from_params(params, **config_overrides)
  return DenseCheckpoint(params, config, "moe_jax", step=step, state_dir=state_dir)
