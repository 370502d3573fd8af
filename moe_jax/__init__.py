"""moe_jax: sparse Mixture-of-Experts Transformers in JAX/Flax."""

from moe_jax.aot import platforms as _platforms

# With libtpu installed (the ``tpu`` extra, for moe-compile) on a machine with
# no accelerator, stop jax from probing for TPUs at start-up (see
# moe_jax/aot/platforms.py).
_platforms.default_to_cpu_without_accelerators()
