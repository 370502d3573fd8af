"""Decoder-only T5 v1.1 language model (causal LM or prefix LM)."""

from __future__ import annotations

from typing import Optional

import flax.linen as nn

from moe_jax.layers.embedding import Embed
from moe_jax.models.config import T5Config
from moe_jax.models.t5 import Decoder


class DecoderOnlyModel(nn.Module):
  """Params: ``token_embedder``, ``decoder`` (no cross-attention).

  ``__call__(decoder_input_tokens, decoder_target_tokens, ...)`` ->
  ``<float32>[batch, length, vocab]``. With ``config.prefix_lm`` pass
  ``decoder_causal_attention <int|bool>[b, l]`` (1 on the input prefix, as
  T5X's prefix-LM feature converter makes): those positions attend to each
  other bidirectionally; the rest is causal. ``decoder_route_ids <int>[b, l]``
  feed task-level MoE routing (``MoeConfig.routing_level="task"``).
  """
  config: T5Config

  def setup(self):
    cfg = self.config
    self.token_embedder = Embed(cfg.vocab_size, cfg.d_model, cfg.jnp_dtype,
                                cfg.jnp_param_dtype)
    self.decoder = Decoder(cfg, self.token_embedder, cross_attention=False)

  def __call__(self, decoder_input_tokens, decoder_target_tokens=None,
               decoder_segment_ids=None, decoder_positions=None,
               decoder_causal_attention=None, decoder_route_ids=None, *,
               enable_dropout: bool = True,
               decode: bool = False, max_decode_length: Optional[int] = None):
    if decoder_causal_attention is not None and not self.config.prefix_lm:
      raise ValueError("decoder_causal_attention was given but config.prefix_lm is "
                       "False; set prefix_lm=True for a prefix LM.")
    return self.decoder(decoder_input_tokens, None, None, decoder_target_tokens,
                        decoder_segment_ids, decoder_positions, None,
                        decoder_causal_attention, decoder_route_ids,
                        deterministic=not enable_dropout,
                        decode=decode, max_decode_length=max_decode_length)
