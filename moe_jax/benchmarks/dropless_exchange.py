"""Benchmark: what the dropless exchanges move and hold at pod scale (moe-compile).

    python -m moe_jax.benchmarks.dropless_exchange --json [--rows=NAME,...]

Compiles switch_base_128 (``models/switch_base_128.gin`` + ``runs/pretrain.gin``,
scanned layers, bfloat16 activations) for v5p-128 with moe-compile's
machinery (:func:`moe_jax.benchmarks.pod_scale.compile_row`, each row in its
own process) on two meshes, data=4 x expert=16 and data=1 x expert=64, for

* ``capacity``   -- the capacity path (top-1, capacity factor 1.25);
* ``all_gather`` -- dropless, tokens all-gathered over the expert axis;
* ``ragged``     -- dropless, ``ragged_all_to_all`` routes (``ep_exchange.py``);

and fine-grained top-8 variants with and without device-limited routing
(``fine8_*``); prints one JSON line per row: collective count and bytes per chip per
step by kind (from the compiled HLO), their total, and the per-chip
temporary bytes (``memory_analysis()``). Results are kept in
``docs/dropless_exchange.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from moe_jax.benchmarks import pod_scale

REPO = pod_scale.REPO
JSONL = os.path.join(REPO, "docs", "dropless_exchange.jsonl")
EXCHANGE = {"capacity": (), "all_gather": (
    "MoeConfig.dropless = True", "MoeConfig.dropless_exchange = 'all_gather'"),
            "ragged": ("MoeConfig.dropless = True",
                       "MoeConfig.dropless_exchange = 'ragged'")}
MESHES = {"ep16": {"data": 4, "expert": 16}, "ep64": {"data": 1, "expert": 64}}
# Fine-grained top-8 (128 experts of d_ff 256: the active FLOPs of top-1 at
# 2048) with and without device-limited routing (16 groups = the 16 expert
# shards, at most 2 per token): what the limit does to each exchange.
FINE = ("MoeConfig.num_selected_experts = 8", "MoeConfig.d_ff = 256")
LIMIT = ("MoeConfig.routing_groups = 16", "MoeConfig.routing_groups_per_token = 2")
ROWS = tuple(pod_scale.Row(f"{kind}_{mesh}", "switch_base_128", "v5p-128",
                           MESHES[mesh], 256, extra=EXCHANGE[kind])
             for mesh in MESHES for kind in EXCHANGE) + tuple(
    pod_scale.Row(f"fine8_{kind}{'_m2' if limit else ''}_ep16", "switch_base_128",
                  "v5p-128", MESHES["ep16"], 256,
                  extra=FINE + EXCHANGE[kind] + (LIMIT if limit else ()))
    for kind in ("capacity", "ragged") for limit in (False, True))


def summarize(line: dict) -> dict:
  """The figures the issue asks for, from a compiled row's JSON line."""
  if "error" in line:
    return {"row": line["row"], "error": line["error"]}
  coll = line.get("collectives") or {}
  return {"row": line["row"], "mesh": line["mesh"],
          "collective_bytes_per_chip": sum(c["bytes"] for c in coll.values()),
          "collectives": {k: c for k, c in coll.items() if c["count"]},
          "temp_bytes_per_chip": line["device_bytes"]["temp"],
          "device_bytes_total": line["device_bytes"]["total"],
          "fits": line["fits"], "compile_s": line.get("compile_s")}


def _child(name: str) -> None:
  row = next(r for r in ROWS if r.name == name)
  print(json.dumps(pod_scale.compile_row(row)))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--json", action="store_true")
  p.add_argument("--rows", default="", help="comma list of row names (default all)")
  p.add_argument("--row", default="", help=argparse.SUPPRESS)  # child process
  p.add_argument("--timeout", type=float, default=1800)
  args = p.parse_args(argv)
  if args.row:
    return _child(args.row)
  wanted = [r for r in ROWS if not args.rows or r.name in args.rows.split(",")]
  results = {}
  if os.path.exists(JSONL):
    with open(JSONL) as f:
      results = {d["row"]: d for d in map(json.loads, f) if d}
  for row in wanted:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "moe_jax.benchmarks.dropless_exchange",
                           "--row", row.name], capture_output=True, text=True,
                          timeout=args.timeout, cwd=REPO)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    line = (json.loads(lines[-1]) if lines else
            {"row": row.name, "error": proc.stderr.strip().splitlines()[-1:]})
    line["wall_s"] = round(time.perf_counter() - t0)
    results[row.name] = summarize(line)
    print(json.dumps(results[row.name]), flush=True)
    with open(JSONL, "w") as f:
      for r in ROWS:
        if r.name in results:
          f.write(json.dumps(results[r.name]) + "\n")
  return results


if __name__ == "__main__":
  main()
