"""Model FLOPs of one training step: the numerator of MFU.

``model_flops_per_step`` counts the work the model *needs*, not what the
compiled program does (no capacity-factor slack, no recomputation from
remat, no optimizer arithmetic):

  6 x (N_enc x T_enc + N_dec x T_dec) + attention

* ``N_enc`` / ``N_dec``: *active* parameters of each stack
  (:func:`moe_jax.training.param_counts.by_stack`: an expert weight counts
  ``k / E``); the token embedding is a lookup, not a matmul, and is left out
  unless it is also the output projection (``logits_via_embedding``).
* ``T_enc = batch x input length``, ``T_dec = batch x target length``: each
  stack's parameters see only that stack's tokens. 6 = 2 (multiply-add) x 3
  (forward, backward for activations, backward for weights).
* attention, per layer: ``12 x heads x d_kv x keys`` per query token (QK^T
  and AV, forward and backward), keys = the attended length: encoder
  self-attention (inputs), decoder self-attention (targets) and
  cross-attention (inputs). The causal mask is not discounted (the kernels
  compute the whole matrix).

``moe-train``'s console MFU uses ``6 x all active params`` per *target*
token and no attention term; for encoder-decoder models with inputs longer
than targets the count here is the larger and truer one.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np


def tokens(batch_shapes: Mapping[str, Any]) -> dict[str, int]:
  """``{"encoder", "decoder", "total"}`` tokens per step of a train batch."""
  dec = int(np.prod(batch_shapes["decoder_target_tokens"].shape))
  enc = (int(np.prod(batch_shapes["encoder_input_tokens"].shape))
         if "encoder_input_tokens" in batch_shapes else 0)
  return {"encoder": enc, "decoder": dec, "total": enc + dec}


def model_flops_per_step(by_stack: Mapping[str, Mapping[str, int]], model_config: Any,
                         batch_shapes: Mapping[str, Any]) -> float:
  """Model FLOPs of one train step over the global batch (see module doc).

  Args:
    by_stack: ``{"encoder"|"decoder"|"shared": {"active": n, ...}}``
      (:func:`moe_jax.training.param_counts.by_stack`).
    model_config: the ``T5Config``.
    batch_shapes: the global batch's shapes (T5X feature names).
  """
  tok = tokens(batch_shapes)
  lengths = {k: v.shape[1] for k, v in batch_shapes.items()}
  len_in = lengths.get("encoder_input_tokens", 0)
  len_out = lengths["decoder_target_tokens"]
  d_attn = model_config.num_heads * model_config.d_kv
  n_dec = by_stack["decoder"]["active"]
  if getattr(model_config, "logits_via_embedding", False):
    n_dec += by_stack.get("shared", {}).get("active", 0)
  flops = 6.0 * (by_stack["encoder"]["active"] * tok["encoder"] + n_dec * tok["decoder"])
  if tok["encoder"]:
    flops += 12.0 * model_config.num_encoder_layers * d_attn * len_in * tok["encoder"]
    flops += 12.0 * model_config.num_decoder_layers * d_attn * len_in * tok["decoder"]
  flops += 12.0 * model_config.num_decoder_layers * d_attn * len_out * tok["decoder"]
  return flops
