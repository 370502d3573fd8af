"""Names of the activations a remat policy can save or offload by name.

Layers tag these values with ``jax.ad_checkpoint.checkpoint_name``; the
``"offload"`` remat policy (``moe_jax.models.host_offload``) moves exactly
these to host memory between the forward and the backward pass and
recomputes everything else. A tag changes no value and no parameter path.
"""

# CapacityCompute: the dispatched expert slots ``<float>[E, G, C, D]`` (on
# the ``expert`` axis, the expert matmuls' input).
MOE_DISPATCH = "moe_dispatch"
# CapacityCompute: the combined expert output ``<float>[G, S, D]``.
MOE_COMBINE = "moe_combine"
# MultiHeadAttention: the per-head context ``<float>[b, q, heads, kv]`` (the
# output projection's input).
ATTENTION_OUT = "attention_out"

OFFLOADED_ACTIVATIONS = (MOE_DISPATCH, MOE_COMBINE, ATTENTION_OUT)
