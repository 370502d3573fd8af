"""Benchmark: jitted forward+backward of the MoE layer vs a dense MLP.

    python -m moe_jax.benchmarks.moe_layer --json [--dense] [--dropless] \\
        [--experts 8 --top_k 2 --d_model 512 --d_ff 2048 --tokens 8192 \\
         --seq 512 --capacity_factor 1.25 --mesh data=1,expert=8 \\
         --dtype float32 --steps 5 --compare --dispatch scatter,gather,einsum,sort]
    python -m moe_jax.benchmarks.moe_layer --json --grid      # default vs one-hot einsum
    python -m moe_jax.benchmarks.moe_layer --json --profile   # where the time goes

Prints one JSON line per configuration with ``median_step_s``,
``tokens_per_s``, ``compile_s``, ``temp_bytes``, ``argument_bytes``
(``memory_analysis()``), ``flops_per_device`` (``cost_analysis()``),
``all_to_all`` (count in the compiled HLO) and ``assignments_dropped``.
``--dense`` runs one dense MLP with ``d_ff * top_k`` hidden units (the same
active FLOPs per token). ``--compare`` runs dense, the capacity MoE with every
``--dispatch`` strategy (kind ``moe`` is the default strategy, ``moe:NAME``
the others) and the dropless MoE in one process, interleaving their timed
steps, and adds ``ratio_vs_dense``. ``--grid`` times the default strategy
against the one-hot einsum one on experts 8/64 x top-1/2 x d_model 512/1024 x
tokens 8192/32768 (d_ff = 2 d_model). ``--profile`` traces the steps with the
JAX profiler and reports, per kind, the device time of each part of the layer
(``moe_jax.benchmarks.hlo_profile``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

STRATEGIES = ("scatter", "gather", "einsum", "sort")


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--json", action="store_true", help="print JSON lines only")
  p.add_argument("--experts", type=int, default=8)
  p.add_argument("--top_k", type=int, default=2)
  p.add_argument("--d_model", type=int, default=512)
  p.add_argument("--d_ff", type=int, default=2048)
  p.add_argument("--tokens", type=int, default=8192)
  p.add_argument("--seq", type=int, default=512)
  p.add_argument("--capacity_factor", type=float, default=1.25)
  p.add_argument("--group_size", type=int, default=512)
  p.add_argument("--router", default="tokens_choose",
                 choices=["tokens_choose", "experts_choose"])
  p.add_argument("--activations", default="gelu,linear",
                 help="comma list: 'gelu,linear' (T5 v1.1 gated) or 'relu'")
  p.add_argument("--mesh", default="data=1,expert=8")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--devices", type=int, default=8,
                 help="CPU devices to emulate (ignored on GPU/TPU)")
  p.add_argument("--dense", action="store_true")
  p.add_argument("--dropless", action="store_true")
  p.add_argument("--dispatch", default="auto",
                 help="comma list of dispatch strategies; with --compare the "
                      f"default is all of {','.join(STRATEGIES)}")
  p.add_argument("--compare", action="store_true",
                 help="dense, MoE (every --dispatch) and dropless MoE, interleaved")
  p.add_argument("--gating", action="store_true",
                 help="capacity MoE vs the same layer with gating dropout forced to "
                      "fire (Gate-Drop and Gate-Expert-Drop), interleaved in one run")
  p.add_argument("--grid", action="store_true",
                 help="default dispatch vs one-hot einsum over a grid of configs")
  p.add_argument("--profile", action="store_true",
                 help="per-part device time of each kind (JAX profiler trace)")
  p.add_argument("--render", default="",
                 help="print the README's markdown table from a JSONL file of "
                      "--compare lines (and the machine line) instead of running")
  return p.parse_args(argv)


def machine() -> dict:
  """The CPU this ran on (``lscpu``'s model name) and its core count."""
  model = ""
  try:
    with open("/proc/cpuinfo") as f:
      model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")),
                   "")
  except OSError:
    pass
  return {"cpu": model, "cores": os.cpu_count()}


def render(path: str) -> str:
  """Markdown table of a JSONL file of ``--compare`` results."""
  with open(path) as f:
    rows = [json.loads(l) for l in f if l.strip().startswith("{")]
  rows = [r for r in rows if "kind" in r and "median_step_s" in r]
  dense = next(r for r in rows if r["kind"] == "dense")
  head = ("| layer | dispatch | step (fwd+bwd) vs dense | median step | all-to-alls "
          "| FLOPs / device |")
  lines = [head, "|---|---|---|---|---|---|"]
  for r in rows:
    ratio = r["median_step_s"] / dense["median_step_s"]
    lines.append(f"| {r['kind']} | {r.get('dispatch') or '-'} | {ratio:.2f} | "
                 f"{r['median_step_s']:.3f} s | {r['all_to_all']} | "
                 f"{r['flops_per_device']:.2e} |")
  m = rows[0].get("machine") or {}
  lines.append(f"\n{rows[0]['experts']} experts, top-{rows[0]['top_k']}, d_model "
               f"{rows[0]['d_model']}, d_ff {rows[0]['d_ff']}, {rows[0]['tokens']} tokens, "
               f"capacity factor {rows[0]['capacity_factor']}, {rows[0]['dtype']}, mesh "
               f"{rows[0]['mesh']}, {rows[0]['steps']} interleaved steps; "
               f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores.")
  return "\n".join(lines)


def _setup_devices(count: int) -> None:
  if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={count}")


def _dense_mlp_cls():
  """The dense baseline: one MLP, weights sharded like the model's MLPs."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from moe_jax.layers import experts as experts_lib  # pylint: disable=g-import-not-at-top

  class DenseMlp(nn.Module):
    d_ff: int
    activations: tuple = ("gelu", "linear")
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic=True):
      d = x.shape[-1]
      init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
      x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
      pre = []
      for i, _ in enumerate(self.activations):
        w = self.param(f"wi_{i}", nn.with_logical_partitioning(init, ("embed", "mlp")),
                       (d, self.d_ff))
        pre.append(jnp.einsum("bld,df->blf", x, w.astype(self.dtype)))
      h = experts_lib.hidden_activation(pre, self.activations)
      h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
      wo = self.param("wo", nn.with_logical_partitioning(init, ("mlp", "embed")),
                      (self.d_ff, d))
      return jnp.einsum("blf,fd->bld", h, wo.astype(self.dtype))

  return DenseMlp


def build_layer(kind: str, args):
  """The module of ``kind``: ``dense``, ``moe``/``moe:STRATEGY``, ``dropless``,
  ``gate_drop``, ``gate_expert_drop``."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from moe_jax.layers.moe import MoeConfig, MoeLayer  # pylint: disable=g-import-not-at-top
  dtype = jnp.dtype(args.dtype)
  acts = tuple(a for a in args.activations.split(",") if a)
  if kind == "dense":
    return _dense_mlp_cls()(d_ff=args.d_ff * args.top_k, activations=acts, dtype=dtype)
  dispatch = kind.split(":", 1)[1] if kind.startswith("moe:") else args.dispatch.split(",")[0]
  cfg = MoeConfig(num_experts=args.experts, num_selected_experts=args.top_k,
                  d_ff=args.d_ff, router_type=args.router,
                  capacity_factor_train=args.capacity_factor,
                  capacity_factor_eval=args.capacity_factor,
                  group_size=args.group_size, activations=acts, dispatch=dispatch,
                  dropless=(kind == "dropless"),
                  gating_dropout_rate=1.0 if kind.startswith("gate") else 0.0,
                  gating_dropout_mode=("gate_expert_drop" if kind == "gate_expert_drop"
                                       else "gate_drop"))
  return MoeLayer(cfg, dtype=dtype)


def prepare(kind: str, args, mesh, rules, x):
  """Compiles fwd+bwd of ``kind``; returns ``(compiled, params, xs, info)``."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from moe_jax import partitioning  # pylint: disable=g-import-not-at-top
  model = build_layer(kind, args)
  x_sharding = partitioning.logical_sharding(mesh, ("batch", "length", "embed"), rules)
  with partitioning.with_sharding(mesh, rules):
    boxed = jax.eval_shape(model.init, jax.random.key(1), x)
    shardings = partitioning.params_shardings(mesh, boxed, rules)
    init = jax.jit(lambda k: nn.unbox(model.init(k, x)), out_shardings=shardings)
    params = init(jax.random.key(1))

    def loss_fn(p, x):
      y, state = model.apply(p, x, deterministic=False, mutable=["intermediates"],
                             rngs={"dropout": jax.random.key(2),
                                   "jitter": jax.random.key(3),
                                   "routing": jax.random.key(4)})
      dropped = state.get("intermediates", {}).get("dropped_fraction", (0.0,))[0]
      return jnp.mean(jnp.square(y.astype(jnp.float32))), dropped

    step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True),
                   in_shardings=(shardings, x_sharding))
    xs = jax.device_put(x, x_sharding)
    t0 = time.perf_counter()
    compiled = step.lower(params, xs).compile()
    compile_s = time.perf_counter() - t0
    (loss, dropped), _ = compiled(params, xs)  # warm-up
    jax.block_until_ready(loss)
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  hlo = compiled.as_text()
  info = dict(
      kind=kind, compile_s=round(compile_s, 3),
      dispatch=_resolved_dispatch(model),
      temp_bytes=int(getattr(mem, "temp_size_in_bytes", 0)),
      argument_bytes=int(getattr(mem, "argument_size_in_bytes", 0)),
      flops_per_device=float((cost or {}).get("flops", 0.0)),
      all_to_all=hlo.count(" all-to-all("),
      all_gather=hlo.count(" all-gather("),
      assignments_dropped=float(dropped))
  return compiled, params, xs, info


def _default_strategy(args) -> str:
  from moe_jax.layers import dispatch as dispatch_lib  # pylint: disable=g-import-not-at-top
  name = args.dispatch.split(",")[0]
  return dispatch_lib.AUTO["cpu"] if name == "auto" else name


def _resolved_dispatch(model):
  """The strategy a capacity MoE layer runs (``"auto"`` resolved), else None."""
  import jax  # pylint: disable=g-import-not-at-top
  from moe_jax.layers import dispatch as dispatch_lib  # pylint: disable=g-import-not-at-top
  config = getattr(model, "config", None)
  if config is None or config.dropless:
    return None
  if config.dispatch == "auto":
    return dispatch_lib.AUTO.get(jax.default_backend(), "gather")
  return config.dispatch


def _kinds(args) -> list[str]:
  if args.compare:  # "moe" is the default strategy; the others as "moe:NAME"
    names = STRATEGIES if args.dispatch == "auto" else tuple(args.dispatch.split(","))
    return (["dense", "moe"] + [f"moe:{n}" for n in names if n != _default_strategy(args)]
            + ["dropless"])
  if args.gating:
    return ["moe", "gate_drop", "gate_expert_drop"]
  return ["dense" if args.dense else ("dropless" if args.dropless else "moe")]


def time_kinds(kinds, args, mesh, rules, x, log=None) -> dict:
  """Compiles every kind, then interleaves their timed steps (machine noise
  hits all alike); returns ``{kind: result dict}``."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  runs = {k: prepare(k, args, mesh, rules, x) for k in kinds}
  times = {k: [] for k in kinds}
  for _ in range(args.steps):
    for k in kinds:
      compiled, params, xs, _ = runs[k]
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(params, xs))
      times[k].append(time.perf_counter() - t0)
  common = dict(experts=args.experts, top_k=args.top_k, d_model=args.d_model,
                d_ff=args.d_ff, tokens=args.tokens, capacity_factor=args.capacity_factor,
                mesh=args.mesh, dtype=args.dtype, activations=args.activations,
                router=args.router, backend=jax.default_backend(),
                devices=len(jax.devices()), steps=args.steps, machine=machine())
  results = {}
  for k in kinds:
    med = float(np.median(times[k]))
    results[k] = dict(common, **runs[k][3], median_step_s=round(med, 4),
                      tokens_per_s=round(args.tokens / med, 1))
  if log is not None:
    log(runs)
  return results


def _inputs(args):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from moe_jax import partitioning  # pylint: disable=g-import-not-at-top
  mesh = partitioning.make_mesh(partitioning.parse_mesh_spec(args.mesh))
  rules = partitioning.standard_logical_rules()
  x = jax.random.normal(jax.random.key(0), (args.tokens // args.seq, args.seq,
                                           args.d_model), jnp.dtype(args.dtype))
  return mesh, rules, x


def _grid(args) -> list[dict]:
  """Default strategy vs one-hot einsum over the grid of the issue."""
  from moe_jax.layers import dispatch as dispatch_lib  # pylint: disable=g-import-not-at-top
  default = dispatch_lib.AUTO["cpu"]
  rows = []
  for experts, k, d, tokens in itertools.product((8, 64), (1, 2), (512, 1024),
                                                 (8192, 32768)):
    a = argparse.Namespace(**vars(args))
    a.experts, a.top_k, a.d_model, a.d_ff, a.tokens = experts, k, d, 2 * d, tokens
    mesh, rules, x = _inputs(a)
    res = time_kinds([f"moe:{default}", "moe:einsum"], a, mesh, rules, x)
    ours, ref = res[f"moe:{default}"], res["moe:einsum"]
    row = dict(experts=experts, top_k=k, d_model=d, d_ff=2 * d, tokens=tokens,
               default=default, default_s=ours["median_step_s"],
               einsum_s=ref["median_step_s"],
               ratio_default_vs_einsum=round(ours["median_step_s"]
                                             / ref["median_step_s"], 3),
               flops_default=ours["flops_per_device"], flops_einsum=ref["flops_per_device"],
               mesh=args.mesh, steps=args.steps, machine=machine())
    print(json.dumps(row), flush=True)
    rows.append(row)
  return rows


def main(argv=None):
  args = _parse(argv if argv is not None else sys.argv[1:])
  if args.render:
    print(render(args.render))
    return None
  _setup_devices(args.devices)
  if args.grid:
    return _grid(args)
  mesh, rules, x = _inputs(args)
  kinds = _kinds(args)
  if args.profile:
    from moe_jax.benchmarks import hlo_profile  # pylint: disable=g-import-not-at-top
    rows = hlo_profile.profile_kinds(
        {k: prepare(k, args, mesh, rules, x) for k in kinds}, args.steps)
    for row in rows.values():
      print(json.dumps(row))
    return rows
  results = time_kinds(kinds, args, mesh, rules, x)
  if args.compare:
    for k in kinds[1:]:
      results[k]["ratio_vs_dense"] = round(
          results[k]["median_step_s"] / results["dense"]["median_step_s"], 3)
  if args.gating:
    for k in ("gate_drop", "gate_expert_drop"):
      results[k]["ratio_vs_moe"] = round(
          results[k]["median_step_s"] / results["moe"]["median_step_s"], 3)
  for k in kinds:
    print(json.dumps(results[k]))
  return results


if __name__ == "__main__":
  main()
