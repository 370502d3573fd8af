"""Active-parameter counts (the MFU numerator) against hand counts."""

import optax
import pytest

from moe_jax import partitioning
from moe_jax.layers.moe_config import MoeConfig
from moe_jax.models import SparseLayout, T5Config, build_model
from moe_jax.training import experiment, param_counts, train_state

V, D, H, KV, F, B = 64, 16, 2, 8, 32, 32     # vocab, d_model, heads, d_kv, d_ff, buckets


def _layout(config):
  shapes = train_state.dummy_batch(8, {"inputs": 8, "targets": 8})
  return train_state.StateLayout.create(build_model(config), optax.sgd(0.1),
                                        partitioning.Partitioner.create({"data": 8}),
                                        shapes)


def _hand_count(enc_experts, enc_k, dec_experts, dec_k):
  """T5 v1.1 (gated MLP, untied logits), 2+2 layers, layer 1 of each stack MoE."""
  attention = 4 * D * H * KV               # q, k, v [D, H, KV] and out [H, KV, D]
  mlp = 3 * D * F                          # wi_0, wi_1 [D, F], wo [F, D]
  enc = (B * H + D                         # relpos table, final norm
         + 2 * (2 * D + attention)         # per layer: 2 norms + self-attention
         + mlp                             # layer 0: dense MLP
         + D * enc_experts                 # layer 1: router (every token uses all of it)
         + enc_experts * mlp * enc_k / enc_experts)   # k of E experts per token
  dec = (B * H + D + D * V                 # relpos, final norm, logits_dense
         + 2 * (3 * D + 2 * attention)     # 3 norms, self- and cross-attention
         + mlp + D * dec_experts + dec_experts * mlp * dec_k / dec_experts)
  return int(V * D + enc + dec)


def _config(**kw):
  kw.setdefault("encoder_layout", SparseLayout(kind="every"))
  return T5Config(vocab_size=V, d_model=D, num_heads=H, d_kv=KV, d_ff=F,
                  num_encoder_layers=2, num_decoder_layers=2,
                  relative_attention_num_buckets=B,
                  decoder_layout=SparseLayout(kind="every"), **kw)


def test_per_stack_moe_configs_count_each_stacks_k_of_e():
  """Encoder top-1 of 8 experts, decoder top-2 of 2: each stack's own k/E."""
  config = _config(moe=MoeConfig(num_experts=8, num_selected_experts=1, d_ff=F),
                   decoder_moe=MoeConfig(num_experts=2, num_selected_experts=2, d_ff=F))
  layout = _layout(config)
  got = param_counts.active(layout.abstract.params, layout.param_axes, config)
  assert got == _hand_count(8, 1, 2, 2)
  stacks = param_counts.by_stack(layout.abstract.params, layout.param_axes, config)
  assert stacks["shared"] == {"total": V * D, "active": V * D}
  # Reading the shared config for both stacks (the old estimate) is wrong here.
  assert got != _hand_count(8, 1, 2, 1)
  total = param_counts.total(layout.abstract.params)
  assert total == _hand_count(8, 8, 2, 2)   # every expert counted once


def test_pyramid_and_scanned_stacks():
  """Per-layer expert counts (pyramid) and nn.scan's leading layer axis."""
  moe = MoeConfig(num_experts=4, num_selected_experts=2, d_ff=F)
  scanned = _config(moe=moe, scan_layers=True)
  layout = _layout(scanned)
  assert param_counts.active(layout.abstract.params, layout.param_axes,
                             scanned) == _hand_count(4, 2, 4, 2)
  pyramid = _config(moe=moe, encoder_layout=SparseLayout(kind="all", num_experts=(2, 8)))
  layout = _layout(pyramid)
  mlp = 3 * D * F
  # Encoder: layer 0 has 2 experts (k=2: both), layer 1 has 8 (2 of 8).
  enc_moe = D * 2 + 2 * mlp + D * 8 + 2 * mlp
  want = _hand_count(4, 2, 4, 2) - (mlp + D * 4 + 2 * mlp) + enc_moe
  assert param_counts.active(layout.abstract.params, layout.param_axes, pyramid) == want


def test_active_fraction_of_bilevel_axes():
  # [outer G, inner E, d, f] experts: a token reaches 1 of G groups, k of E.
  assert param_counts.active_fraction((2, 4, 16, 32), ("expert_outer", "expert", None, None),
                                      k=2) == pytest.approx(1 / 2 * 2 / 4)
  # The inner routers [G, d, E]: one group's router per token.
  assert param_counts.active_fraction((2, 16, 4), ("expert_outer", "embed", "unmodeled"),
                                      k=2) == pytest.approx(1 / 2)
  assert param_counts.active_fraction((16, 8), ("embed", "unmodeled"), k=1) == 1.0


def test_experiment_reports_the_per_stack_estimate():
  config = _config(moe=MoeConfig(num_experts=8, num_selected_experts=1, d_ff=F),
                   decoder_moe=MoeConfig(num_experts=2, num_selected_experts=2, d_ff=F))
  exp = experiment.build_experiment(config, "synthetic_translate_mix",
                                    {"inputs": 8, "targets": 8}, batch_size=8,
                                    train_steps=1)
  assert exp.active_params() == _hand_count(8, 1, 2, 2)
