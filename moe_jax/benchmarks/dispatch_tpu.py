"""Benchmark: the dispatch strategies compiled for a TPU (compile-only devices).

    python -m moe_jax.benchmarks.dispatch_tpu --json [--topology v5p:2x2x1 \\
        --experts 64 --top_k 2 --d_model 1024 --d_ff 4096 --tokens 32768]

No TPU needed: libtpu's compile-only devices (the ``tpu`` extra). For each
strategy of ``MoeConfig.dispatch`` it compiles the MoE layer's fwd+bwd in
bfloat16 on a data=1 x expert=N mesh of the topology and prints one JSON
line with the compiled FLOPs and HBM bytes accessed per chip (XLA's cost
analysis), the roofline time bound ``max(FLOPs / peak, bytes / HBM
bandwidth)`` with the chip's figures (``moe_jax/aot/chips.py``), the
all-to-all count and the temporaries. The strategy with the lowest bound is
the TPU default of ``dispatch="auto"`` (``layers/dispatch.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

STRATEGIES = ("scatter", "gather", "einsum", "sort")


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--json", action="store_true")
  p.add_argument("--topology", default="v5p:2x2x1")
  p.add_argument("--experts", type=int, default=64)
  p.add_argument("--top_k", type=int, default=2)
  p.add_argument("--d_model", type=int, default=1024)
  p.add_argument("--d_ff", type=int, default=4096)
  p.add_argument("--tokens", type=int, default=32768, help="global tokens per step")
  p.add_argument("--seq", type=int, default=512)
  p.add_argument("--group_size", type=int, default=512)
  p.add_argument("--capacity_factor", type=float, default=1.25)
  p.add_argument("--strategies", default=",".join(STRATEGIES))
  return p.parse_args(argv)


def compile_strategy(name: str, args) -> dict:
  """Compiles the layer's fwd+bwd with dispatch ``name``; its cost figures."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from moe_jax import partitioning  # pylint: disable=g-import-not-at-top
  from moe_jax.aot import hlo, topology  # pylint: disable=g-import-not-at-top
  from moe_jax.layers.moe import MoeConfig, MoeLayer  # pylint: disable=g-import-not-at-top

  topo = topology.parse(args.topology)
  devices = topology.compile_only_devices(topo)
  chip = topo.chip
  mesh = partitioning.make_mesh({"expert": len(devices)}, devices=devices)
  rules = partitioning.standard_logical_rules()
  layer = MoeLayer(MoeConfig(
      num_experts=args.experts, num_selected_experts=args.top_k, d_ff=args.d_ff,
      group_size=args.group_size, capacity_factor_train=args.capacity_factor,
      dispatch=name), dtype=jnp.bfloat16)
  x = jax.ShapeDtypeStruct((args.tokens // args.seq, args.seq, args.d_model), jnp.bfloat16)
  params = partitioning.abstract_params(layer, mesh, rules, x)
  xs = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(
      mesh, P(partitioning.BATCH_MESH_AXES)))

  def loss(p, x):
    y = layer.apply(p, x, deterministic=False, rngs={"jitter": jax.random.key(2)})
    return jnp.mean(jnp.square(y.astype(jnp.float32)))

  t0 = time.perf_counter()
  with partitioning.with_sharding(mesh, rules):
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, xs).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  text = compiled.as_text()
  analysis = hlo.analyze(text)
  flops = float(cost.get("flops", 0.0)) + analysis.loop_extra_flops
  bytes_accessed = float(cost.get("bytes accessed", 0.0)) + analysis.loop_extra_bytes
  bound = max(flops / chip.peak_bf16_flops, bytes_accessed / chip.hbm_bytes_per_s)
  mem = compiled.memory_analysis()
  return dict(dispatch=name, topology=args.topology, chips=len(devices),
              experts=args.experts, top_k=args.top_k, d_model=args.d_model,
              d_ff=args.d_ff, tokens=args.tokens, flops_per_chip=flops,
              hbm_bytes_accessed_per_chip=bytes_accessed,
              roofline_s=bound, compute_s=flops / chip.peak_bf16_flops,
              hbm_s=bytes_accessed / chip.hbm_bytes_per_s,
              all_to_all=analysis.collectives.get("all-to-all", {}).get("count", 0),
              temp_bytes=int(mem.temp_size_in_bytes), compile_s=round(compile_s, 1))


def main(argv=None):
  args = _parse(argv if argv is not None else sys.argv[1:])
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
  rows = [compile_strategy(n, args) for n in args.strategies.split(",")]
  best = min(rows, key=lambda r: r["roofline_s"])
  for r in rows:
    r["roofline_vs_best"] = round(r["roofline_s"] / best["roofline_s"], 3)
    print(json.dumps(r), flush=True)
  return rows


if __name__ == "__main__":
  main()
