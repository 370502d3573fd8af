"""Shared experts (DeepSeek-MoE, Dai et al. 2024; Qwen-MoE): always-on experts.

Beside the routed experts, ``N = MoeConfig.num_shared_experts`` experts
process every token, and their output is added to the routed output (not
scaled by the routed scaling factor):

    y = sum_{i in top-k} g_i * expert_i(x) + sum_{j < N} shared_j(x)

``N`` gated MLPs of ``F`` hidden units summed are one gated MLP of ``N * F``
hidden units, so the shared experts are one dense ``MlpBlock`` at
``.../moe/shared_experts/{wi_0, wi_1, wo}`` with the dense MLP's logical axes
(``embed``, ``mlp``): they shard like the model's dense MLPs, not over the
``expert`` axis.
"""

from __future__ import annotations

import jax

from moe_jax.layers import moe_config as cfg_lib
from moe_jax.layers.mlp import MlpBlock

Array = jax.Array


def add_shared_experts(config: cfg_lib.MoeConfig, x: Array, routed: Array,
                       dtype, param_dtype) -> Array:
  """``routed + shared(x)`` (``routed`` unchanged without shared experts).

  Call it inside the MoE layer's compact ``__call__``: the MLP becomes its
  submodule ``shared_experts``.

  Args:
    x, routed: <float>[batch, length, D].
  """
  if not config.num_shared_experts:
    return routed
  d_ff = config.shared_expert_d_ff or config.d_ff
  shared = MlpBlock(config.num_shared_experts * d_ff, config.activations,
                    dtype=dtype, param_dtype=param_dtype, name="shared_experts")
  return routed + shared(x).astype(routed.dtype)
