"""Shared-core experts: every expert kernel is one shared matrix plus a
low-rank per-expert delta (the smallest useful form of MPOE; Gao et al. 2022,
"Parameter-Efficient Mixture-of-Experts Architecture for Pre-trained Language
Models via Matrix Product Operators").

For each expert kernel name ``k`` in ``wi_0, wi_1`` (or ``wi``) and ``wo``::

    W_e = k_shared + k_a[e] @ k_b[e]

    k_shared  <param>[n_in, n_out]     ('embed', 'mlp')  / ('mlp', 'embed')
    k_a       <param>[E, n_in, r]      ('expert', 'embed', 'unmodeled')
                                       / ('expert', 'mlp', 'unmodeled')
    k_b       <param>[E, r, n_out]     ('expert', 'unmodeled', 'mlp')
                                       / ('expert', 'unmodeled', 'embed')

MPOE shares a large "central tensor" across experts and keeps small
"auxiliary tensors" per expert; here the central tensor is the full shared
matrix and the auxiliary part a rank-``r`` product. The per-expert kernels
are materialised every step (``<dtype>[E, n_in, n_out]``, the same shape
plain experts have), so the capacity, dropless and gating-dropout paths run
unchanged; the saving is in parameters and optimizer state, not in FLOPs or
activation memory.

Initialisation: ``k_shared`` and ``k_a`` use the experts' fan-in truncated
normal; ``k_b`` is zero, so at step 0 every expert is the shared MLP (as
MPOE, whose experts all start from one pre-trained FFN) and the deltas grow
apart as tokens are routed differently.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

SHARED_SUFFIX = "_shared"
DELTA_A_SUFFIX = "_a"
DELTA_B_SUFFIX = "_b"

# logical axes of (input dim, output dim) of each kernel
_KERNEL_AXES = {"wi_0": ("embed", "mlp"), "wi_1": ("embed", "mlp"),
                "wi": ("embed", "mlp"), "wo": ("mlp", "embed")}


def _fan_in(in_axis: int):
  return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                          in_axis=in_axis, out_axis=-1)


def shared_core_kernel(module: nn.Module, name: str, num_experts: int, n_in: int,
                       n_out: int, rank: int, dtype: Any, param_dtype: Any) -> Array:
  """Creates ``name``'s shared core and deltas in ``module``; returns
  ``<dtype>[E, n_in, n_out]`` = ``shared + a @ b`` (call inside a compact
  method of ``module``)."""
  in_ax, out_ax = _KERNEL_AXES[name]
  shared = module.param(
      name + SHARED_SUFFIX,
      nn.with_logical_partitioning(_fan_in(-2), (in_ax, out_ax)),
      (n_in, n_out), param_dtype)
  a = module.param(
      name + DELTA_A_SUFFIX,
      nn.with_logical_partitioning(
          nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                           in_axis=-2, out_axis=-1, batch_axis=(0,)),
          ("expert", in_ax, "unmodeled")),
      (num_experts, n_in, rank), param_dtype)
  b = module.param(
      name + DELTA_B_SUFFIX,
      nn.with_logical_partitioning(nn.initializers.zeros,
                                   ("expert", "unmodeled", out_ax)),
      (num_experts, rank, n_out), param_dtype)
  shared, a, b = (jnp.asarray(x, dtype) for x in (shared, a, b))
  w = shared[None] + jnp.einsum("eir,ero->eio", a, b)
  return nn.with_logical_constraint(w, ("expert", in_ax, out_ax))


def shared_core_weights(module: nn.Module, names, num_experts: int, d_model: int,
                        d_ff: int, rank: int, dtype: Any,
                        param_dtype: Any) -> dict[str, Array]:
  """All materialised expert kernels (``ExpertWeights``' output format)."""
  out = {}
  for name in names:
    out[name] = shared_core_kernel(module, name, num_experts, d_model, d_ff, rank,
                                   dtype, param_dtype)
  out["wo"] = shared_core_kernel(module, "wo", num_experts, d_ff, d_model, rank,
                                 dtype, param_dtype)
  return out


def shared_core_param_ratio(num_experts: int, d_model: int, d_ff: int, rank: int,
                            num_input_kernels: int = 2) -> float:
  """Expert parameters with shared cores over those of plain experts.

  Each of the ``num_input_kernels + 1`` kernels (``wi_*`` and ``wo``) has
  ``d*f + E*r*(d+f)`` parameters instead of ``E*d*f``, so the ratio is
  ``(d*f + E*r*(d+f)) / (E*d*f) = 1/E + r*(d+f)/(d*f)``, independent of the
  number of kernels (kept as an argument for the absolute counts in
  :func:`expert_param_counts`).
  """
  with_core, plain = expert_param_counts(num_experts, d_model, d_ff, rank,
                                         num_input_kernels)
  return with_core / plain


def expert_param_counts(num_experts: int, d_model: int, d_ff: int, rank: int,
                        num_input_kernels: int = 2) -> tuple[int, int]:
  """``(shared-core expert params, plain expert params)`` of one MoE layer."""
  if rank < 1:
    raise ValueError(f"rank={rank}: shared-core experts need rank >= 1.")
  e, d, f, r = num_experts, d_model, d_ff, rank
  kernels = num_input_kernels + 1
  return kernels * (d * f + e * r * (d + f)), kernels * e * d * f
