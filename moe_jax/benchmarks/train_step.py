"""Train-step speed: tiny Switch vs the dense T5 with the same active FLOPs.

  python -m moe_jax.benchmarks.train_step --json
  python -m moe_jax.benchmarks.train_step --json --dtype=bfloat16 --d_model=1024 ...

The Switch model replaces every other MLP with a top-1 MoE whose experts are
as wide as the dense MLP, so a token does the same matmul work in both (plus
the router). Steps of the two models are interleaved, so load on a shared
machine hits both alike. Reports per model the median step time, tokens/s and model
FLOPs utilization (``6 * active params`` per token) against the peak of a
large ``jnp.dot`` measured in the same process, and the MoE/dense step-time
ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def _configs(args):
  from moe_jax.layers.moe_config import MoeConfig  # pylint: disable=g-import-not-at-top
  from moe_jax.models import SparseLayout, T5Config  # pylint: disable=g-import-not-at-top
  common = dict(vocab_size=args.vocab, d_model=args.d_model, num_heads=args.d_model // 64,
                d_kv=64, d_ff=args.d_ff, num_encoder_layers=args.layers,
                num_decoder_layers=args.layers, dropout_rate=0.0, dtype=args.dtype)
  dense = T5Config(**common)
  switch = T5Config(
      **common,
      moe=MoeConfig(num_experts=args.num_experts, num_selected_experts=1, d_ff=args.d_ff,
                    capacity_factor_train=args.capacity_factor,
                    group_size=args.group_size),
      encoder_layout=SparseLayout(kind="every", every=2),
      decoder_layout=SparseLayout(kind="every", every=2))
  return {"dense": dense, "switch": switch}


def prepare(name, config, args, partitioner):
  """Builds, initializes and compiles one model's train step (first step run)."""
  from moe_jax import models  # pylint: disable=g-import-not-at-top
  from moe_jax.training import optimizers, train_state, train_step  # pylint: disable=g-import-not-at-top
  model = models.build_model(config)
  tx = optimizers.make_optimizer("adafactor", optimizers.make_schedule("constant", 1e-3, 0))
  shapes = train_state.dummy_batch(args.batch, {"inputs": args.length, "targets": args.length})
  state, layout = train_state.init_train_state(model, tx, partitioner, shapes)
  step = train_step.jitted_train_step(layout, train_step.LossConfig())
  rng = np.random.default_rng(0)
  batch = {k: rng.integers(1, config.vocab_size, v.shape).astype(np.int32)
           for k, v in shapes.items()}
  batch["decoder_loss_weights"] = np.ones_like(batch["decoder_loss_weights"])
  with partitioner.activate():
    batch = partitioner.global_batch(batch)
    t0 = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m["loss"])
  run = {"name": name, "config": config, "step": step, "state": state,
         "batch": batch, "partitioner": partitioner, "layout": layout, "times": [],
         "compile_s": time.perf_counter() - t0, "metrics": m}
  return run


def time_step(run):
  """One timed step; the state is carried (donated) from step to step."""
  with run["partitioner"].activate():
    t0 = time.perf_counter()
    run["state"], run["metrics"] = run["step"](run["state"], run["batch"])
    jax.block_until_ready(run["metrics"]["loss"])
    run["times"].append(time.perf_counter() - t0)


def summarize(run, args, peak):
  from moe_jax.training import metrics, param_counts  # pylint: disable=g-import-not-at-top
  params = run["state"].params
  active = param_counts.active(params, run["layout"].param_axes, run["config"])
  times = run["times"]
  step_s = statistics.median(times)
  tokens = args.batch * args.length   # decoder target tokens per step
  flops = metrics.train_flops_per_token(active) * tokens
  return {
      "model": run["name"],
      "params": param_counts.total(params),
      "active_params": active,
      "step_time_ms": 1000 * step_s,
      "step_time_ms_min": 1000 * min(times),
      "tokens_per_sec": tokens / step_s,
      "mfu": flops / step_s / peak,
      "first_step_s": run["compile_s"],
      "loss": float(run["metrics"]["loss"]),
  }


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--json", action="store_true", help="print one JSON object")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--length", type=int, default=64)
  p.add_argument("--d_model", type=int, default=256)
  p.add_argument("--d_ff", type=int, default=1024)
  p.add_argument("--layers", type=int, default=2)
  p.add_argument("--vocab", type=int, default=512)
  p.add_argument("--num_experts", type=int, default=8)
  p.add_argument("--capacity_factor", type=float, default=1.25)
  p.add_argument("--group_size", type=int, default=1024)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--peak_matmul_size", type=int, default=2048)
  args = p.parse_args(argv)

  from moe_jax import partitioning  # pylint: disable=g-import-not-at-top
  from moe_jax.training import metrics  # pylint: disable=g-import-not-at-top
  partitioner = partitioning.Partitioner.create({"data": -1})
  if args.batch % partitioner.mesh.size:
    p.error(f"--batch={args.batch} must be a multiple of the "
            f"{partitioner.mesh.size} devices.")
  peak = metrics.measure_matmul_peak(args.peak_matmul_size, jnp.dtype(args.dtype))
  runs = {name: prepare(name, cfg, args, partitioner) for name, cfg in _configs(args).items()}
  for _ in range(args.steps):  # interleaved, so machine noise hits both alike
    for run in runs.values():
      time_step(run)
  results = {name: summarize(run, args, peak) for name, run in runs.items()}
  out = {
      "benchmark": "train_step",
      "device": str(jax.devices()[0].device_kind),
      "num_devices": jax.device_count(),
      "dtype": args.dtype,
      "batch": args.batch, "length": args.length, "d_model": args.d_model,
      "d_ff": args.d_ff, "layers": args.layers, "num_experts": args.num_experts,
      "matmul_peak_gflops": peak / 1e9,
      "dense": results["dense"],
      "switch": results["switch"],
      "switch_over_dense_step_time": (results["switch"]["step_time_ms"]
                                      / results["dense"]["step_time_ms"]),
  }
  if args.json:
    print(json.dumps(out))
  else:
    for name in ("dense", "switch"):
      r = results[name]
      print(f"{name:7s} step {r['step_time_ms']:.1f} ms  {r['tokens_per_sec']:,.0f} tok/s  "
            f"MFU {r['mfu']:.1%}  ({r['active_params']:,} active / {r['params']:,} params)")
    print(f"switch / dense step time: {out['switch_over_dense_step_time']:.2f} "
          f"(matmul peak {out['matmul_peak_gflops']:.1f} GFLOP/s)")
  return out


if __name__ == "__main__":
  main()
