"""T5 v1.1 encoder, decoder and encoder-decoder model (T5X call signature).

Inputs are int32 ``[batch, length]`` token ids with 0 as padding. Padding is
masked on the *key* side only (as Hugging Face does; T5X also masks padded
query rows): outputs at padded positions are then finite and equal HF's, and
never reach real positions or the loss (which weights them 0). Packed
sequences pass ``*_segment_ids`` (attention stays within a segment) and
``*_positions`` (position of each token in its segment, used by the relative
position bias). The relative position bias is computed once per stack
(``relpos_bias``) and shared by all its layers.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.layers import attention as attn_lib
from moe_jax.layers.dense import DenseGeneral
from moe_jax.layers.embedding import Embed
from moe_jax.layers.norms import RMSNorm
from moe_jax.layers.relative_position import RelativePositionBias
from moe_jax.models.blocks import LayerStack
from moe_jax.models.config import T5Config


def _positions(tokens: jax.Array, positions: Optional[jax.Array]) -> jax.Array:
  if positions is not None:
    return positions
  return jnp.arange(tokens.shape[1], dtype=jnp.int32)


def _relpos(config: T5Config, bidirectional: bool) -> RelativePositionBias:
  return RelativePositionBias(
      config.num_heads, bidirectional, config.relative_attention_num_buckets,
      config.relative_attention_max_distance, config.jnp_dtype,
      config.jnp_param_dtype, name="relpos_bias")


class Encoder(nn.Module):
  """``<int>[b, s] -> <float>[b, s, embed]`` (bidirectional self-attention)."""
  config: T5Config
  shared_embedding: nn.Module

  @nn.compact
  def __call__(self, encoder_input_tokens, encoder_segment_ids=None,
               encoder_positions=None, encoder_route_ids=None, *,
               deterministic: bool = True):
    cfg = self.config
    tokens = encoder_input_tokens
    valid = tokens > 0
    x = self.shared_embedding(tokens.astype(jnp.int32))
    x = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(x, deterministic=deterministic)
    positions = _positions(tokens, encoder_positions)
    bias = _relpos(cfg, bidirectional=True)(positions, positions)
    mask = attn_lib.make_key_mask(valid)
    if encoder_segment_ids is not None:
      mask = mask & attn_lib.make_segment_mask(encoder_segment_ids, encoder_segment_ids)
    bias = bias + attn_lib.mask_to_bias(mask, bias.dtype)
    x = LayerStack(cfg, cfg.encoder_layout, cfg.num_encoder_layers, causal=False,
                   cross_attention=False, deterministic=deterministic,
                   name="layers")(x, bias, padding_mask=valid,
                                  route_ids=encoder_route_ids)
    x = RMSNorm(cfg.layer_norm_epsilon, cfg.jnp_dtype, cfg.jnp_param_dtype,
                name="encoder_norm")(x)
    return nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(x, deterministic=deterministic)


class Decoder(nn.Module):
  """Causal stack + logits. ``<int>[b, l] -> <float>[b, l, vocab]``.

  With ``cross_attention`` it attends to ``encoded <float>[b, s, embed]``
  (encoder-decoder); without, it is a decoder-only LM, where
  ``decoder_causal_attention <bool>[b, l]`` marks prefix-LM inputs that attend
  bidirectionally among themselves.

  ``decode=True``: the first call creates the KV cache (sized by its inputs,
  which must span ``max_decode_length``) and ``cache/position``; later calls
  process their tokens (a prefill of several, or one step) at that position.
  """
  config: T5Config
  shared_embedding: nn.Module
  cross_attention: bool = True

  @nn.compact
  def __call__(self, decoder_input_tokens, encoded=None, encoder_valid=None,
               decoder_target_tokens=None, decoder_segment_ids=None,
               decoder_positions=None, encoder_segment_ids=None,
               decoder_causal_attention=None, decoder_route_ids=None, *,
               deterministic: bool = True,
               decode: bool = False, max_decode_length: Optional[int] = None):
    cfg = self.config
    tokens = decoder_input_tokens.astype(jnp.int32)
    batch, length = tokens.shape
    x = self.shared_embedding(tokens)
    x = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(x, deterministic=deterministic)
    relpos = _relpos(cfg, bidirectional=False)

    stepping = decode and self.has_variable("cache", "position")
    decode_position = None
    if stepping:
      if max_decode_length is None:
        raise ValueError("Decoding with a filled cache needs max_decode_length "
                         "(the cache length) to be passed.")
      position_var = self.variable("cache", "position", jnp.zeros, (), jnp.int32)
      decode_position = position_var.value
      q_pos = decode_position + jnp.arange(length, dtype=jnp.int32)
      k_pos = jnp.arange(max_decode_length, dtype=jnp.int32)
      bias = relpos(q_pos, k_pos)
      mask = attn_lib.make_causal_mask(q_pos, k_pos)
      if decoder_causal_attention is not None:
        prefix = jnp.pad(decoder_causal_attention.astype(bool),
                         ((0, 0), (0, max_decode_length - length)))
        prefix_q = jax.lax.dynamic_slice_in_dim(prefix, decode_position, length, 1)
        mask = mask | attn_lib.make_attention_mask(prefix_q, prefix)
      position_var.value = decode_position + length
      query_valid = None
    else:
      if decode:  # first call: create the cache (and the position counter).
        self.variable("cache", "position", jnp.zeros, (), jnp.int32)
      positions = _positions(tokens, decoder_positions)
      bias = relpos(positions, positions)
      pos2d = jnp.broadcast_to(jnp.atleast_2d(positions), (batch, length))
      mask = attn_lib.make_causal_mask(pos2d, pos2d) if decoder_positions is not None \
          else attn_lib.make_causal_mask(positions, positions)
      if decoder_causal_attention is not None:
        prefix = decoder_causal_attention.astype(bool)
        mask = mask | attn_lib.make_attention_mask(prefix, prefix)
      query_valid = None
      if decoder_target_tokens is not None:
        query_valid = decoder_target_tokens > 0
        mask = mask & attn_lib.make_key_mask(query_valid)
      if decoder_segment_ids is not None:
        mask = mask & attn_lib.make_segment_mask(decoder_segment_ids, decoder_segment_ids)
    self_bias = bias + attn_lib.mask_to_bias(mask, bias.dtype)

    cross_bias = None
    if self.cross_attention:
      cross_mask = attn_lib.make_key_mask(encoder_valid)
      if decoder_segment_ids is not None and encoder_segment_ids is not None and not stepping:
        cross_mask = cross_mask & attn_lib.make_segment_mask(decoder_segment_ids,
                                                             encoder_segment_ids)
      cross_bias = attn_lib.mask_to_bias(cross_mask, cfg.jnp_dtype)

    x = LayerStack(cfg, cfg.decoder_layout, cfg.num_decoder_layers, causal=True,
                   cross_attention=self.cross_attention, deterministic=deterministic,
                   decode=decode, name="layers")(
                       x, self_bias, encoded, cross_bias, query_valid, decode_position,
                       decoder_route_ids)
    x = RMSNorm(cfg.layer_norm_epsilon, cfg.jnp_dtype, cfg.jnp_param_dtype,
                name="decoder_norm")(x)
    x = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(x, deterministic=deterministic)
    if cfg.logits_via_embedding:
      logits = self.shared_embedding.attend(x) / jnp.sqrt(jnp.asarray(cfg.d_model, x.dtype))
    else:
      logits = DenseGeneral(cfg.vocab_size, kernel_axes=("embed", "vocab"),
                            dtype=jnp.float32, param_dtype=cfg.jnp_param_dtype,
                            name="logits_dense")(x)
    logits = logits.astype(jnp.float32)
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))


class EncoderDecoderModel(nn.Module):
  """T5 v1.1 encoder-decoder. Params: ``token_embedder``, ``encoder``, ``decoder``."""
  config: T5Config

  def setup(self):
    cfg = self.config
    self.token_embedder = Embed(cfg.vocab_size, cfg.d_model, cfg.jnp_dtype,
                                cfg.jnp_param_dtype)
    self.encoder = Encoder(cfg, self.token_embedder)
    self.decoder = Decoder(cfg, self.token_embedder, cross_attention=True)

  def encode(self, encoder_input_tokens, encoder_segment_ids=None,
             encoder_positions=None, encoder_route_ids=None, *,
             enable_dropout: bool = True):
    """``<int>[b, s] -> <float>[b, s, embed]``."""
    return self.encoder(encoder_input_tokens, encoder_segment_ids, encoder_positions,
                        encoder_route_ids, deterministic=not enable_dropout)

  def decode(self, encoded, encoder_input_tokens, decoder_input_tokens,
             decoder_target_tokens=None, encoder_segment_ids=None,
             decoder_segment_ids=None, decoder_positions=None,
             decoder_route_ids=None, *,
             enable_dropout: bool = True, decode: bool = False,
             max_decode_length: Optional[int] = None):
    """Decoder logits ``<float>[b, l, vocab]`` given the encoder output."""
    return self.decoder(decoder_input_tokens, encoded, encoder_input_tokens > 0,
                        decoder_target_tokens, decoder_segment_ids, decoder_positions,
                        encoder_segment_ids, None, decoder_route_ids,
                        deterministic=not enable_dropout,
                        decode=decode, max_decode_length=max_decode_length)

  def __call__(self, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
               encoder_segment_ids=None, decoder_segment_ids=None,
               encoder_positions=None, decoder_positions=None,
               encoder_route_ids=None, decoder_route_ids=None, *,
               enable_dropout: bool = True, decode: bool = False,
               max_decode_length: Optional[int] = None):
    """T5X signature -> logits ``<float32>[batch, decoder_length, vocab]``.

    ``encoder_route_ids`` / ``decoder_route_ids`` <int>[batch, length]: each
    token's task/language id, for ``MoeConfig.routing_level="task"``.
    """
    encoded = self.encode(encoder_input_tokens, encoder_segment_ids, encoder_positions,
                          encoder_route_ids, enable_dropout=enable_dropout)
    return self.decode(encoded, encoder_input_tokens, decoder_input_tokens,
                       decoder_target_tokens, encoder_segment_ids, decoder_segment_ids,
                       decoder_positions, decoder_route_ids,
                       enable_dropout=enable_dropout, decode=decode,
                       max_decode_length=max_decode_length)
