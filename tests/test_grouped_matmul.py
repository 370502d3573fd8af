"""Grouped matmul and the fused blocked expert FFN against NumPy, over a small grid."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from np_reference import gelu_tanh as np_gelu

from moe_jax.layers import blocked_ffn
from moe_jax.layers import grouped_matmul as gmm


def layout_and_rows(counts, block, k, seed):
  """Block-aligned rows for groups of `counts` rows (NumPy-built)."""
  rng = np.random.default_rng(seed)
  padded = [-(-c // block) * block for c in counts]
  m = -(-(sum(counts) + len(counts) * (block - 1)) // block) * block
  lhs = np.zeros((m, k), np.float32)
  group_of_row = np.full(m, -1)
  start = 0
  for g, (c, p) in enumerate(zip(counts, padded)):
    lhs[start:start + c] = rng.normal(size=(c, k))
    group_of_row[start:start + c] = g
    start += p
  layout = gmm.make_block_layout(jnp.asarray(counts, jnp.int32), m, block)
  return lhs, group_of_row, layout


@pytest.mark.parametrize("counts", [[5, 0, 9, 3], [0, 0, 1, 0], [8, 8, 8, 8], [17, 2, 0, 30]])
@pytest.mark.parametrize("block", [4, 8])
@pytest.mark.parametrize("backend", ["cpu", "ragged"])
def test_grouped_matmul_matches_numpy(counts, block, backend):
  k, n = 6, 5
  lhs, group_of_row, layout = layout_and_rows(counts, block, k, seed=sum(counts))
  rhs = np.random.default_rng(1).normal(size=(len(counts), k, n)).astype(np.float32)
  out = np.asarray(gmm.grouped_matmul(jnp.asarray(lhs), jnp.asarray(rhs), layout, backend))
  ref = np.zeros((lhs.shape[0], n), np.float32)
  for r, g in enumerate(group_of_row):
    if g >= 0:
      ref[r] = lhs[r] @ rhs[g]
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  assert int(layout.num_blocks) == sum(-(-c // block) for c in counts)

  # Gradients against the dense reference formula.
  dout = np.random.default_rng(2).normal(size=out.shape).astype(np.float32)
  f = lambda a, b: jnp.sum(gmm.grouped_matmul(a, b, layout, backend) * dout)
  da, db = jax.grad(f, argnums=(0, 1))(jnp.asarray(lhs), jnp.asarray(rhs))
  ref_da = np.zeros_like(lhs)
  ref_db = np.zeros_like(rhs)
  for r, g in enumerate(group_of_row):
    if g >= 0:
      ref_da[r] = dout[r] @ rhs[g].T
      ref_db[g] += np.outer(lhs[r], dout[r])
  np.testing.assert_allclose(np.asarray(db), ref_db, rtol=1e-4, atol=1e-4)
  used = group_of_row >= 0
  np.testing.assert_allclose(np.asarray(da)[used], ref_da[used], rtol=1e-4, atol=1e-4)



@pytest.mark.parametrize("counts", [[3, 0, 6], [1, 1, 1]])
def test_blocked_ffn_matches_numpy(counts):
  rng = np.random.default_rng(0)
  t, d, f, block = 7, 4, 6, 4
  e = len(counts)
  x = rng.normal(size=(t, d)).astype(np.float32)
  w0, w1 = (rng.normal(size=(e, d, f)).astype(np.float32) for _ in range(2))
  wo = rng.normal(size=(e, f, d)).astype(np.float32)
  m = -(-(sum(counts) + e * (block - 1)) // block) * block
  row_token = np.full(m, t, np.int32)
  row_weight = np.zeros(m, np.float32)
  start = 0
  for c in counts:
    row_token[start:start + c] = rng.integers(0, t, size=c)
    row_weight[start:start + c] = rng.random(c)
    start += -(-c // block) * block
  layout = gmm.make_block_layout(jnp.asarray(counts, jnp.int32), m, block)
  weights = {"wi_0": jnp.asarray(w0), "wi_1": jnp.asarray(w1), "wo": jnp.asarray(wo)}

  def run(x, row_weight, weights):
    return blocked_ffn.expert_ffn_rows(x, jnp.asarray(row_token), row_weight, layout,
                                       weights, ("gelu", "linear"))

  y = np.asarray(run(jnp.asarray(x), jnp.asarray(row_weight), weights))
  ref = np.zeros((t, d))
  start = 0
  for g, c in enumerate(counts):
    for r in range(start, start + c):
      xt = x[row_token[r]].astype(np.float64)
      ref[row_token[r]] += row_weight[r] * ((np_gelu(xt @ w0[g]) * (xt @ w1[g])) @ wo[g])
    start += -(-c // block) * block
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)

  # Gradients equal those of a plain (unfused, autodiff) formulation.
  def plain(x, row_weight, weights):
    xp = jnp.concatenate([x, jnp.zeros((1, d))])[jnp.asarray(row_token)]
    grp = np.repeat(np.arange(m // block), block)
    g_of_row = np.asarray(layout.block_group)[grp]
    h = jax.nn.gelu(jnp.einsum("md,mdf->mf", xp, weights["wi_0"][g_of_row]), approximate=True)
    h = h * jnp.einsum("md,mdf->mf", xp, weights["wi_1"][g_of_row])
    out = jnp.einsum("mf,mfd->md", h, weights["wo"][g_of_row]) * row_weight[:, None]
    return jnp.zeros((t + 1, d)).at[jnp.asarray(row_token)].add(out)[:t]

  probe = rng.normal(size=(t, d)).astype(np.float32)
  args = (jnp.asarray(x), jnp.asarray(row_weight), weights)
  g1 = jax.grad(lambda *a: jnp.sum(run(*a) * probe), argnums=(0, 1, 2))(*args)
  g2 = jax.grad(lambda *a: jnp.sum(plain(*a) * probe), argnums=(0, 1, 2))(*args)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
