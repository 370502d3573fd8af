"""Every sparse-layout option places MoE layers exactly where it says."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.layers.moe_config import MoeConfig
from moe_jax.models import SparseLayout, T5Config, build_model

MOE = MoeConfig(num_experts=4, num_selected_experts=1, d_ff=8, group_size=64)
BASE = T5Config(vocab_size=16, d_model=8, num_heads=1, d_kv=4, d_ff=8,
                num_encoder_layers=6, num_decoder_layers=4, dropout_rate=0.0,
                relative_attention_num_buckets=4, relative_attention_max_distance=8,
                moe=MOE)


@pytest.mark.parametrize("layout, n, expected", [
    (SparseLayout("none"), 6, ()),
    (SparseLayout("all"), 4, (0, 1, 2, 3)),
    (SparseLayout("every", every=2), 6, (1, 3, 5)),       # Switch
    (SparseLayout("every", every=4), 8, (3, 7)),          # ST-MoE
    (SparseLayout("every", every=3), 7, (2, 5)),
    (SparseLayout("top", count=2), 6, (4, 5)),
    (SparseLayout("bottom", count=2), 6, (0, 1)),
    (SparseLayout("explicit", layers=(5, 0, 2)), 6, (0, 2, 5)),
])
def test_sparse_layer_indices(layout, n, expected):
  assert layout.sparse_layers(n) == expected


def test_layout_errors_say_how_to_fix():
  with pytest.raises(ValueError, match="use one of"):
    SparseLayout("sometimes")
  with pytest.raises(ValueError, match="outside"):
    SparseLayout("explicit", layers=(9,)).sparse_layers(4)
  with pytest.raises(ValueError, match="one count per sparse layer"):
    SparseLayout("all", num_experts=(2, 4)).sparse_layers(3)
  with pytest.raises(ValueError, match="moe=MoeConfig"):
    T5Config(moe=None, encoder_layout=SparseLayout("all"))
  with pytest.raises(ValueError, match="pyramid"):
    dataclasses.replace(BASE, scan_layers=True,
                        encoder_layout=SparseLayout("all", num_experts=(2,) * 5 + (4,)))


def _param_shapes(config):
  model = build_model(config)
  tokens = jnp.ones((1, 4), jnp.int32)
  args = (tokens, tokens) if config.decoder_only else (tokens, tokens, tokens)
  abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args,
                                               enable_dropout=False))
  return nn.unbox(abstract["params"])


def _moe_layers(stack_params):
  layers = stack_params["layers"]
  return tuple(sorted(int(k.split("_")[1]) for k, v in layers.items() if "moe" in v))


@pytest.mark.parametrize("layout", [
    SparseLayout("none"), SparseLayout("all"), SparseLayout("every", every=2),
    SparseLayout("every", every=3), SparseLayout("top", count=1),
    SparseLayout("bottom", count=2), SparseLayout("explicit", layers=(0, 4)),
])
def test_model_params_follow_layout(layout):
  config = dataclasses.replace(BASE, encoder_layout=layout,
                               decoder_layout=SparseLayout("explicit", layers=(2,)))
  params = _param_shapes(config)
  assert _moe_layers(params["encoder"]) == layout.sparse_layers(6)
  assert _moe_layers(params["decoder"]) == (2,)
  for i, layer in params["encoder"]["layers"].items():
    # A layer has either the dense MLP or the MoE, never both (no residual here).
    assert ("mlp" in layer) != ("moe" in layer), i


def test_pyramid_residual_and_extra_dense():
  layout = SparseLayout("every", every=2, num_experts=(2, 4, 8), residual=True,
                        extra_dense_mlp=True)
  config = dataclasses.replace(BASE, encoder_layout=layout)
  params = _param_shapes(config)
  layers = params["encoder"]["layers"]
  for i, n in zip((1, 3, 5), (2, 4, 8)):
    moe = layers[f"layers_{i}"]["moe"]
    expert_dims = {leaf.shape[0] for leaf in jax.tree_util.tree_leaves(moe)
                   if leaf.ndim == 3}
    assert expert_dims == {n}, (i, expert_dims)
    # Residual MoE: dense MLP beside it and a 2-way gate; ST-MoE extra dense MLP.
    assert {"mlp", "residual_gate", "extra_mlp", "pre_extra_mlp_norm"} <= set(
        layers[f"layers_{i}"])
    assert layers[f"layers_{i}"]["residual_gate"]["kernel"].shape == (8, 2)
  for i in (0, 2, 4):
    assert not {"moe", "extra_mlp", "residual_gate"} & set(layers[f"layers_{i}"])


def test_decoder_only_layout_and_scan_blocks():
  config = dataclasses.replace(BASE, decoder_only=True, scan_layers=True,
                               decoder_layout=SparseLayout("every", every=2))
  params = _param_shapes(config)
  assert set(params) == {"token_embedder", "decoder"}
  block = params["decoder"]["layers"]["layers"]
  # Scanned over blocks of 2 layers: sub-layer 1 of each block is the MoE.
  assert "moe" not in block["layer_0"] and "moe" in block["layer_1"]
  assert block["layer_1"]["pre_mlp_norm"]["scale"].shape == (2, 8)


def test_residual_gate_mixes_moe_and_dense():
  """With the gate kernel zero the output is the mean of both branches."""
  from moe_jax.layers.mlp import MlpBlock
  from moe_jax.layers.moe import MoeLayer
  from moe_jax.models.blocks import TransformerLayer

  layout = SparseLayout("all", residual=True)
  config = dataclasses.replace(BASE, encoder_layout=layout)
  layer = TransformerLayer(config, layout, num_experts=4)
  x = jax.random.normal(jax.random.PRNGKey(1), (1, 4, 8))
  bias = jnp.zeros((1, 1, 4, 4))
  params = nn.unbox(jax.jit(layer.init)(jax.random.PRNGKey(0), x, bias)["params"])
  params["residual_gate"]["kernel"] = jnp.zeros_like(params["residual_gate"]["kernel"])
  # Zero attention output so the layer is x + mix(pre_mlp_norm(x)).
  params["self_attention"]["out"]["kernel"] *= 0
  normed = x / np.sqrt(np.mean(np.square(np.asarray(x)), -1, keepdims=True) + 1e-6)

  @jax.jit
  def run(params):
    out = layer.apply({"params": params}, x, bias)
    moe_out = MoeLayer(config=MOE).apply({"params": params["moe"]}, normed)
    mlp_out = MlpBlock(8, ("gelu", "linear")).apply({"params": params["mlp"]}, normed)
    return out, moe_out, mlp_out

  out, moe_out, mlp_out = run(params)
  np.testing.assert_allclose(out, x + 0.5 * moe_out + 0.5 * mlp_out, atol=1e-5)
