"""Test helper: a function of (params, x) compiled on a mesh, as a sharded run.

``compile_on_mesh`` places the params by the standard logical-axis rules (from
the boxed init variables), shards ``x``'s batch over every batch axis, jits
``fn`` under the mesh and rules, and returns the compiled function with its
placed arguments, so a test can compare ``compiled(ps, xs)`` with the
unsharded ``fn(params, x)`` and read ``compiled.as_text()``.
"""

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from moe_jax import partitioning


def compile_on_mesh(fn, boxed, params, x, mesh_shape):
  """``(compiled, placed_params, placed_x)`` of ``jax.jit(fn)`` on ``mesh_shape``.

  Args:
    fn: ``fn(params, x)``; boxed: the init variables (logically partitioned
      leaves) giving the params' axes; params: their unboxed values;
    x: ``[batch, ...]`` input; mesh_shape: e.g. ``{"data": 2, "expert": 4}``.
  """
  mesh = partitioning.make_mesh(mesh_shape)
  rules = partitioning.standard_logical_rules()
  with partitioning.with_sharding(mesh, rules):
    shardings = partitioning.params_shardings(mesh, boxed, rules)
    xs = jax.device_put(x, NamedSharding(mesh, P(partitioning.BATCH_MESH_AXES)))
    ps = jax.device_put(params, shardings)
    compiled = jax.jit(fn).lower(ps, xs).compile()
  return compiled, ps, xs
