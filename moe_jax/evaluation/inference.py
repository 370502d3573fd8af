"""Restoring parameters for inference and sharded, batched decoding.

``Predictor`` owns a model, its (sharded) params, the mesh and a decoding
spec, and turns process-local ``<int>[rows, input_length]`` encoder inputs
into ``<int32>[rows, max_decode_length]`` output tokens. The decode function
is jitted once per input shape, with the params in their training shardings
and the batch sharded over the mesh's batch axes (``data``, ``fsdp``,
``expert``), so it runs on any mesh the model trains on.

Multi-host: every host passes *its* rows of the global batch (as for
training); the result is all-gathered so every host sees the whole batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from moe_jax import partitioning
from moe_jax.models import decoding

DECODE_METHODS = ("greedy", "beam", "sample")


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
  """How to decode (T5X defaults: beam 4, alpha 0.6 for translation).

  Attributes:
    method: ``"greedy"``, ``"beam"`` or ``"sample"``.
    max_decode_length: output length (``None``: the task's ``targets`` length).
    beam_size, alpha: beam search width and GNMT length-penalty exponent.
    temperature, top_k, seed: sampling settings.
  """
  method: str = "greedy"
  max_decode_length: Optional[int] = None
  beam_size: int = 4
  alpha: float = 0.6
  temperature: float = 1.0
  top_k: int = 0
  seed: int = 0

  def __post_init__(self):
    if self.method not in DECODE_METHODS:
      raise ValueError(f"Decoding method {self.method!r} is unknown; use one of "
                       f"{DECODE_METHODS} (gin: DECODE_METHOD).")
    if self.method == "beam" and self.beam_size < 1:
      raise ValueError(f"beam_size={self.beam_size} must be >= 1.")


def abstract_params(model: nn.Module, partitioner: partitioning.Partitioner,
                    input_length: int = 8, target_length: int = 8) -> tuple[Any, Any]:
  """``(abstract params tree, NamedSharding tree)`` of ``model`` on the mesh.

  Shapes do not depend on the dummy lengths used to trace ``init``.
  """
  batch = partitioner.num_batch_shards
  dec = jnp.zeros((batch, target_length), jnp.int32)
  args = (dec, dec) if model.config.decoder_only else (
      jnp.zeros((batch, input_length), jnp.int32), dec, dec)

  def init(rng):
    return model.init({"params": rng}, *args, enable_dropout=False)["params"]

  with partitioner.activate():
    boxed = jax.eval_shape(init, jax.random.PRNGKey(0))
  return nn.unbox(boxed), partitioner.params_shardings(boxed)


def load_params(checkpoint_path: str, model: nn.Module,
                partitioner: partitioning.Partitioner) -> Any:
  """Restores the params of ``model`` from a train-state or params checkpoint,
  placed with their shardings on the partitioner's mesh."""
  from moe_jax.checkpoints import restore  # pylint: disable=g-import-not-at-top
  abstract, shardings = abstract_params(model, partitioner)
  return restore.restore_params(checkpoint_path, abstract, shardings)


def _decode_fn(model, spec: DecodeSpec, max_len: int):
  if spec.method == "beam":
    def fn(params, enc, enc_ids=None, dec_ids=None):
      tokens, _ = decoding.beam_search(model, params, max_decode_length=max_len,
                                       beam_size=spec.beam_size, alpha=spec.alpha,
                                       encoder_input_tokens=enc,
                                       encoder_route_ids=enc_ids,
                                       decoder_route_ids=dec_ids)
      return tokens[:, 0]
  elif spec.method == "sample":
    def fn(params, enc, enc_ids=None, dec_ids=None):
      return decoding.sample_decode(model, params, max_decode_length=max_len,
                                    encoder_input_tokens=enc,
                                    encoder_route_ids=enc_ids,
                                    decoder_route_ids=dec_ids,
                                    temperature=spec.temperature, top_k=spec.top_k,
                                    rng=jax.random.PRNGKey(spec.seed))
  else:
    def fn(params, enc, enc_ids=None, dec_ids=None):
      return decoding.greedy_decode(model, params, max_decode_length=max_len,
                                    encoder_input_tokens=enc,
                                    encoder_route_ids=enc_ids,
                                    decoder_route_ids=dec_ids)
  return fn


class Predictor:
  """Sharded batched decoding of an encoder-decoder model.

  Args:
    model: an ``EncoderDecoderModel``.
    params: its params (sharded, e.g. from :func:`load_params`).
    partitioner: the device mesh and logical-axis rules.
    spec: the decoding settings.
  """

  def __init__(self, model: nn.Module, params: Any,
               partitioner: partitioning.Partitioner, spec: DecodeSpec):
    if model.config.decoder_only:
      raise ValueError("Predictor decodes encoder-decoder models; decoder-only "
                       "models are not supported by moe-eval/moe-infer yet.")
    self.model, self.params, self.partitioner, self.spec = (
        model, params, partitioner, spec)
    self.param_shardings = jax.tree_util.tree_map(lambda x: x.sharding, params)
    self._compiled: dict[int, Any] = {}
    self.batch_shards = partitioner.num_batch_shards

  def _fn(self, max_len: int, routed: bool = False):
    key = (max_len, routed)
    if key not in self._compiled:
      bsh = self.partitioner.batch_sharding
      # Route ids (task-level routing): encoder <int>[b, s], decoder <int>[b].
      route_sh = (bsh, bsh)
      self._compiled[key] = jax.jit(
          _decode_fn(self.model, self.spec, max_len),
          in_shardings=(self.param_shardings, bsh) + (route_sh if routed else ()))
    return self._compiled[key]

  def predict(self, encoder_input_tokens: np.ndarray, max_decode_length: int,
              encoder_route_ids: Optional[np.ndarray] = None,
              decoder_route_ids: Optional[np.ndarray] = None) -> np.ndarray:
    """Decodes this host's rows; returns the *global* batch's outputs.

    Args:
      encoder_input_tokens: <int>[rows, input_length] (this host's rows; the
        global batch, rows * hosts, must divide over data*fsdp*expert).
      max_decode_length: output length.
      encoder_route_ids: <int>[rows, input_length] and decoder_route_ids:
        <int>[rows] (one id per example), for task-level MoE routing; give
        both or neither.

    Returns:
      <int32>[rows * hosts, max_decode_length]: tokens, 1 = EOS, 0 after it.
    """
    enc = np.asarray(encoder_input_tokens, np.int32)
    with self.partitioner.activate():
      feats = {"encoder_input_tokens": enc}
      routed = encoder_route_ids is not None or decoder_route_ids is not None
      if routed:
        if encoder_route_ids is None or decoder_route_ids is None:
          raise ValueError("Give both encoder_route_ids and decoder_route_ids "
                           "(task-level routing) or neither.")
        feats["encoder_route_ids"] = np.asarray(encoder_route_ids, np.int32)
        feats["decoder_route_ids"] = np.asarray(decoder_route_ids, np.int32)
      glob = self.partitioner.global_batch(feats)
      route = ((glob["encoder_route_ids"], glob["decoder_route_ids"])
               if routed else ())
      out = self._fn(max_decode_length, routed)(
          self.params, glob["encoder_input_tokens"], *route)
    if jax.process_count() > 1:
      return np.asarray(multihost_utils.process_allgather(out, tiled=True))
    return np.asarray(jax.device_get(out))


def local_rows(batch: dict, per_host: int) -> dict:
  """This host's rows of a global numpy batch (contiguous blocks by process)."""
  start = jax.process_index() * per_host
  return {k: v[start:start + per_host] for k, v in batch.items()}


def trim_after_eos(tokens: np.ndarray, eos_id: int = decoding.EOS_ID) -> list[list[int]]:
  """Per row, the ids before the first EOS (and no padding)."""
  out = []
  for row in np.asarray(tokens):
    ids = row.tolist()
    if eos_id in ids:
      ids = ids[:ids.index(eos_id)]
    out.append([t for t in ids if t > 0])
  return out


def teacher_forced_batch(encoder_input_tokens: np.ndarray, outputs: np.ndarray) -> dict:
  """Model inputs replaying ``outputs`` (e.g. decoded tokens) under teacher forcing."""
  targets = np.asarray(outputs, np.int32)
  inputs = np.zeros_like(targets)
  inputs[:, 1:] = targets[:, :-1]
  return {"encoder_input_tokens": np.asarray(encoder_input_tokens, np.int32),
          "decoder_input_tokens": inputs, "decoder_target_tokens": targets}
