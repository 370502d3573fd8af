"""Attention against a NumPy reference; the KV cache equals full attention."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.layers import attention as attn


def _numpy_attention(params, xq, xkv, bias):
  q = np.einsum("bqe,ehd->bqhd", xq, params["query"]["kernel"])
  k = np.einsum("bke,ehd->bkhd", xkv, params["key"]["kernel"])
  v = np.einsum("bke,ehd->bkhd", xkv, params["value"]["kernel"])
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) + bias      # no 1/sqrt(d) scaling
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  out = np.einsum("bhqk,bkhd->bqhd", w, v)
  return np.einsum("bqhd,hde->bqe", out, params["out"]["kernel"])


def test_matches_numpy_reference_with_padding_mask():
  layer = attn.MultiHeadAttention(num_heads=2, head_dim=3)
  rng = np.random.RandomState(0)
  xq = rng.randn(2, 4, 6).astype(np.float32)
  xkv = rng.randn(2, 5, 6).astype(np.float32)
  valid = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
  bias = np.asarray(attn.mask_to_bias(attn.make_key_mask(jnp.asarray(valid))))
  variables = layer.init(jax.random.PRNGKey(0), xq, xkv, bias)
  params = jax.tree_util.tree_map(np.asarray, nn.unbox(variables)["params"])
  assert params["query"]["kernel"].shape == (6, 2, 3)
  assert params["out"]["kernel"].shape == (2, 3, 6)
  assert "bias" not in params["query"]
  out = np.asarray(jax.jit(layer.apply)(variables, xq, xkv, bias))
  np.testing.assert_allclose(out, _numpy_attention(params, xq, xkv, bias),
                             atol=1e-5)
  # Masked keys have no influence.
  xkv2 = xkv.copy()
  xkv2[0, 3:] = 100.0
  out2 = np.asarray(jax.jit(layer.apply)(variables, xq, xkv2, bias))
  np.testing.assert_allclose(out2[0], out[0], atol=1e-5)


def test_query_init_folds_in_head_dim_scaling():
  layer = attn.MultiHeadAttention(num_heads=4, head_dim=64)
  x = jnp.zeros((1, 1, 256))
  p = nn.unbox(layer.init(jax.random.PRNGKey(0), x, x))["params"]
  q_std, k_std = np.std(p["query"]["kernel"]), np.std(p["key"]["kernel"])
  # key ~ N(0, 1/fan_in); query additionally scaled by head_dim**-0.5 = 1/8.
  np.testing.assert_allclose(k_std, 256 ** -0.5, rtol=0.05)
  np.testing.assert_allclose(q_std / k_std, 1 / 8, rtol=0.05)


def test_kv_cache_prefill_and_steps_equal_full_causal_attention():
  layer = attn.MultiHeadAttention(num_heads=2, head_dim=4)
  length = 6
  x = jax.random.normal(jax.random.PRNGKey(3), (2, length, 8))
  pos = jnp.arange(length)
  causal_bias = attn.mask_to_bias(attn.make_causal_mask(pos, pos))
  variables = layer.init(jax.random.PRNGKey(0), x, x, causal_bias, decode=True)
  full = layer.apply({"params": variables["params"]}, x, x, causal_bias)

  @jax.jit
  def run_cached(params, cache):
    outs = []
    # Prefill 2 tokens, then one step at a time.
    for start, n in [(0, 2)] + [(i, 1) for i in range(2, length)]:
      q_pos = start + jnp.arange(n)
      bias = attn.mask_to_bias(attn.make_causal_mask(q_pos, pos))
      out, mutated = layer.apply({"params": params, "cache": cache},
                                 x[:, start:start + n], x[:, start:start + n], bias,
                                 decode=True, decode_position=jnp.asarray(start),
                                 mutable=["cache"])
      cache = mutated["cache"]
      outs.append(out)
    return jnp.concatenate(outs, axis=1)

  zeros = jax.tree_util.tree_map(jnp.zeros_like, variables["cache"])
  np.testing.assert_allclose(run_cached(variables["params"], zeros), full, atol=1e-5)
