"""Transformer layers of T5 v1.1 (dense or MoE MLP) and the layer stack.

A layer is pre-norm: ``x + dropout(sublayer(rms_norm(x)))`` for self-attention,
(decoder) encoder-decoder attention and the MLP. The MLP of a layer is

* dense: ``mlp`` (``MlpBlock``),
* sparse: ``moe`` (``MoeLayer``); with ``residual`` also a dense ``mlp`` beside
  it, mixed per token by a learned 2-way softmax gate ``residual_gate``;
  with ``conditional_routing`` (NLLB CMR) also a shared dense ``mlp``, mixed
  by a per-token sigmoid gate ``cmr_gate`` (``layers/conditional.py``);
  with ``extra_dense_mlp`` an extra dense sublayer ``extra_mlp`` follows.

A layer's MoE config is its stack's (``T5Config.stack_moe``): the causal
stack is the decoder, the other the encoder.

``LayerStack`` runs the layers unrolled (``layers_0``, ``layers_1``, ...) or with
``nn.scan`` over blocks of ``period`` layers (params ``layers/layer_j`` with a
leading ``[num_layers // period]`` axis; layer ``i`` is block ``i // period``,
sub-layer ``i % period``), optionally rematerialised.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.layers import conditional
from moe_jax.layers.attention import MultiHeadAttention
from moe_jax.layers.bilevel import BilevelMoeLayer
from moe_jax.layers.dense import DenseGeneral
from moe_jax.layers.mlp import MlpBlock
from moe_jax.layers.moe import MoeLayer
from moe_jax.layers.norms import RMSNorm
from moe_jax.models import host_offload
from moe_jax.models.config import SparseLayout, T5Config

SCANNED_NAME = "layers"
RNG_STREAMS = ("params", "dropout", "jitter", "routing")


def stack_name(causal: bool) -> str:
  """``"decoder"`` for the causal stack, else ``"encoder"``."""
  return "decoder" if causal else "encoder"


def _dropout(config: T5Config, x, deterministic: bool):
  return nn.Dropout(config.dropout_rate, broadcast_dims=(-2,))(
      x, deterministic=deterministic)


class TransformerLayer(nn.Module):
  """One encoder or decoder layer. ``<float>[b, l, embed] -> <float>[b, l, embed]``.

  Attributes:
    config: model config.
    layout: the stack's sparse layout (for residual / extra-dense options).
    num_experts: 0 for a dense MLP, else the MoE expert count of this layer.
    causal: decoder layer (MoE is told ``causal=True``).
    cross_attention: has encoder-decoder attention.
    deterministic: no dropout / router noise (eval capacity for MoE).
    decode: self-attention uses the KV cache.
  """
  config: T5Config
  layout: SparseLayout
  num_experts: int = 0
  causal: bool = False
  cross_attention: bool = False
  deterministic: bool = True
  decode: bool = False

  @nn.compact
  def __call__(self, x, self_bias, encoded=None, cross_bias=None, padding_mask=None,
               decode_position=None, route_ids=None):
    cfg = self.config
    dtype, pdtype = cfg.jnp_dtype, cfg.jnp_param_dtype
    det = self.deterministic
    norm = lambda name: RMSNorm(cfg.layer_norm_epsilon, dtype, pdtype, name=name)  # noqa: E731
    attn = lambda name: MultiHeadAttention(  # noqa: E731
        cfg.num_heads, cfg.d_kv, cfg.dropout_rate, dtype, pdtype, name=name)
    mlp = lambda name: MlpBlock(cfg.d_ff, cfg.activations, cfg.dropout_rate,  # noqa: E731
                                dtype, pdtype, name=name)

    h = norm("pre_self_attention_norm")(x)
    h = attn("self_attention")(h, h, self_bias, deterministic=det, decode=self.decode,
                               decode_position=decode_position)
    x = x + _dropout(cfg, h, det)

    if self.cross_attention:
      h = norm("pre_cross_attention_norm")(x)
      h = attn("encoder_decoder_attention")(h, encoded, cross_bias, deterministic=det)
      x = x + _dropout(cfg, h, det)

    h = norm("pre_mlp_norm")(x)
    if self.num_experts:
      h = self._sparse_mlp(h, padding_mask, mlp, route_ids)
    else:
      h = mlp("mlp")(h, deterministic=det)
    x = x + _dropout(cfg, h, det)

    if self.num_experts and self.layout.extra_dense_mlp:
      h = norm("pre_extra_mlp_norm")(x)
      x = x + _dropout(cfg, mlp("extra_mlp")(h, deterministic=det), det)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))

  def _sparse_mlp(self, h, padding_mask, mlp, route_ids=None):
    cfg = self.config
    moe_cfg = dataclasses.replace(cfg.stack_moe(stack_name(self.causal)),
                                  num_experts=self.num_experts)
    # Bi-level (SMILE) routing is its own layer with the same interface.
    layer_cls = BilevelMoeLayer if moe_cfg.bilevel_outer_size else MoeLayer
    y = layer_cls(config=moe_cfg, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype,
                  name="moe")(h, padding_mask=padding_mask,
                              deterministic=self.deterministic, causal=self.causal,
                              decode=self.decode, route_ids=route_ids)
    if self.layout.residual:
      dense = mlp("mlp")(h, deterministic=self.deterministic)
      gate_logits = DenseGeneral(2, kernel_axes=("embed", "unmodeled"),
                                 dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype,
                                 name="residual_gate")(h)
      gate = jax.nn.softmax(gate_logits.astype(jnp.float32), axis=-1).astype(y.dtype)
      y = y * gate[..., 0:1] + dense * gate[..., 1:2]
    cmr = self.layout.conditional_routing
    if cmr is not None:
      gate = conditional.ConditionalRoutingGate(
          cmr, param_dtype=cfg.jnp_param_dtype, name="cmr_gate")(
              h, padding_mask, deterministic=self.deterministic)
      y = conditional.mix(mlp("mlp")(h, deterministic=self.deterministic), y, gate)
    return y


class _Block(nn.Module):
  """``len(experts)`` consecutive layers: the body scanned by ``LayerStack``."""
  config: T5Config
  layout: SparseLayout
  experts: Sequence[int]
  causal: bool = False
  cross_attention: bool = False
  deterministic: bool = True
  decode: bool = False

  @nn.compact
  def __call__(self, x, self_bias, encoded, cross_bias, padding_mask, decode_position,
               route_ids=None):
    for j, n in enumerate(self.experts):
      x = TransformerLayer(self.config, self.layout, n, self.causal,
                           self.cross_attention, self.deterministic, self.decode,
                           name=f"layer_{j}")(x, self_bias, encoded, cross_bias,
                                              padding_mask, decode_position, route_ids)
    return x, None


def _remat(module_cls, policy_name: str, scanned: bool, stream: bool = False):
  """``module_cls`` rematerialised by ``T5Config.remat_policy`` and, with
  ``stream``, fetching host-memory params itself (``host_offload.streamed``,
  inside the remat so the backward pass fetches them again)."""
  if stream:
    module_cls = host_offload.streamed(module_cls)
  if policy_name == "none":
    return module_cls
  return nn.remat(module_cls, policy=host_offload.remat_policy(policy_name),
                  prevent_cse=not scanned)


class LayerStack(nn.Module):
  """``num_layers`` layers whose MLP kinds follow ``layout``.

  ``__call__(x <float>[b, l, embed], self_bias <float>[b|1, h, l, k], encoded
  <float>[b, s, embed] | None, cross_bias | None, padding_mask <bool>[b, l] | None,
  decode_position <int>[] | None, route_ids <int>[b, l] | None) -> <float>[b, l, embed]``.
  ``route_ids`` (each token's task/language id) reach the MoE layers
  (``MoeConfig.routing_level="task"``).
  """
  config: T5Config
  layout: SparseLayout
  num_layers: int
  causal: bool = False
  cross_attention: bool = False
  deterministic: bool = True
  decode: bool = False

  def experts_per_layer(self) -> list[int]:
    moe = self.config.stack_moe(stack_name(self.causal))
    default = moe.num_experts if moe else 0
    sparse = self.layout.experts_per_layer(self.num_layers, default)
    return [sparse.get(i, 0) for i in range(self.num_layers)]

  @nn.compact
  def __call__(self, x, self_bias, encoded=None, cross_bias=None, padding_mask=None,
               decode_position=None, route_ids=None):
    cfg = self.config
    experts = self.experts_per_layer()
    common = dict(config=cfg, layout=self.layout, causal=self.causal,
                  cross_attention=self.cross_attention,
                  deterministic=self.deterministic, decode=self.decode)
    args = (self_bias, encoded, cross_bias, padding_mask, decode_position, route_ids)
    if not cfg.scan_layers:
      layer_cls = _remat(TransformerLayer, cfg.remat_policy, scanned=False,
                         stream=not self.is_initializing())
      for i, n in enumerate(experts):
        x = layer_cls(num_experts=n, name=f"layers_{i}", **common)(x, *args)
      return x
    moe = cfg.stack_moe(stack_name(self.causal))
    period = self.layout.scan_period(self.num_layers, moe.num_experts if moe else 0)
    block_cls = _remat(_Block, cfg.remat_policy, scanned=True,
                       stream=not self.is_initializing())
    scanned = nn.scan(
        block_cls,
        variable_axes={"params": 0, "cache": 0, "intermediates": 0},
        split_rngs={name: True for name in RNG_STREAMS},
        in_axes=(nn.broadcast,) * len(args),
        length=self.num_layers // period,
        metadata_params={nn.PARTITION_NAME: "layers"})
    x, _ = scanned(experts=tuple(experts[:period]), name=SCANNED_NAME, **common)(x, *args)
    return x


def unrolled_to_scanned(stack_params: dict, num_layers: int, period: int) -> dict:
  """Converts a stack's unrolled params (``layers_i``) to the scanned layout.

  ``{"layers_0": p0, ..., "layers_{n-1}": ...}`` -> ``{"layers": {"layer_j":
  stacked over blocks}}``; other entries are kept. Works for any collection
  whose per-layer trees have the same structure within a sub-layer slot.
  """
  out = {k: v for k, v in stack_params.items() if not k.startswith("layers_")}
  blocks = {}
  for j in range(period):
    per_block = [stack_params[f"layers_{b * period + j}"]
                 for b in range(num_layers // period)]
    blocks[f"layer_{j}"] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *per_block)
  out[SCANNED_NAME] = blocks
  return out
