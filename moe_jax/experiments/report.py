r"""Markdown tables from an experiments ``results.jsonl``.

  python -m moe_jax.experiments.report --out /tmp/moe_jax_experiments > tables.md
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
from typing import Iterable

from moe_jax.experiments import multi30k
from moe_jax.experiments.runner import fmt, mean_std

DIRECTIONS = ("en_de", "de_en", "en_fr", "fr_en", "en_cs", "cs_en")


def load(out_dir: str) -> dict[str, dict]:
  rows = {}
  with open(os.path.join(out_dir, "results.jsonl")) as f:
    for line in f:
      if line.strip():
        r = json.loads(line)
        rows[r["name"]] = r
  return rows


def _bleu(row: dict, direction: str):
  return row.get("bleu", {}).get(f"multi30k_translate_{direction}")


def methods_table(rows: dict, methods: Iterable[str], seeds: Iterable[int],
                  with_time: bool, baseline: str = "baseline") -> str:
  """One line per method: eval CE and BLEU as mean ± std over seeds."""
  seeds = list(seeds)
  head = ["method", "seeds", "eval CE", "mean BLEU", *[d.replace("_", "→") for d in DIRECTIONS]]
  if with_time:
    head.append("step time vs baseline")
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  base_time = [rows[f"{baseline}_s{s}"]["step_time_ms"] for s in seeds
               if f"{baseline}_s{s}" in rows]
  for m in methods:
    runs = [rows[f"{m}_s{s}"] for s in seeds if f"{m}_s{s}" in rows]
    if not runs:
      lines.append("| " + " | ".join([m, "0", "not run"] + [""] * (len(head) - 3)) + " |")
      continue
    cells = [m, str(len(runs)), mean_std([r["eval_loss"] for r in runs]),
             mean_std([r["mean_bleu"] for r in runs])]
    cells += [fmt(statistics.mean(v for v in (_bleu(r, d) for r in runs) if v is not None), 1)
              if any(_bleu(r, d) is not None for r in runs) else "n/a" for d in DIRECTIONS]
    if with_time:
      t = [r["step_time_ms"] for r in runs if r.get("step_time_ms")]
      cells.append(fmt(statistics.mean(t) / statistics.mean(base_time), 2)
                   if t and base_time else "n/a")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def upcycling_table(rows: dict) -> str:
  lines = ["| run | steps | eval CE by step | mean BLEU by step |", "|---|---|---|---|"]
  for name in ("dense_pretrain", "dense_continue", "upcycled_continue"):
    r = rows.get(name)
    if not r:
      lines.append(f"| {name} | not run | | |")
      continue
    ce = ", ".join(f"{s}: {v:.3f}" for s, v in r["eval_loss_curve"])
    bleu = ", ".join(f"{s}: {v:.2f}" for s, v in r["bleu_curve"])
    last = max(s for s, _ in r["eval_loss_curve"]) if r["eval_loss_curve"] else "?"
    lines.append(f"| {name} | {last} | {ce} | {bleu} |")
  return "\n".join(lines)


def pruning_table(rows: dict, fractions=(1.0, 0.5, 0.25)) -> str:
  head = ["experts kept", "granularity", "mean BLEU", *[d.replace("_", "→") for d in DIRECTIONS]]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  full = rows.get("prune_keep1.0")
  if full:
    lines.append("| 100% | - | " + fmt(full["mean_bleu"], 1) + " | "
                 + " | ".join(fmt(_bleu(full, d), 1) for d in DIRECTIONS) + " |")
  for keep in fractions[1:]:
    g = rows.get(f"prune_global_{keep}")
    if g:
      lines.append(f"| {keep:.0%} | global | {fmt(g['mean_bleu'], 1)} | "
                   + " | ".join(fmt(_bleu(g, d), 1) for d in DIRECTIONS) + " |")
    per = {d: rows.get(f"prune_language_{keep}_{d}") for d in DIRECTIONS}
    vals = {d: (_bleu(r, d) if r else None) for d, r in per.items()}
    got = [v for v in vals.values() if v is not None]
    if got:
      lines.append(f"| {keep:.0%} | per language | {fmt(statistics.mean(got), 1)} | "
                   + " | ".join(fmt(vals[d], 1) for d in DIRECTIONS) + " |")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser()
  p.add_argument("--out", default="/tmp/moe_jax_experiments")
  p.add_argument("--seeds", default="0,1")
  args = p.parse_args(argv)
  rows = load(args.out)
  seeds = [int(s) for s in args.seeds.split(",")]
  print("### Regularization (issue 10)\n")
  print(methods_table(rows, multi30k.REGULARIZATION, seeds, with_time=False))
  print("\n### Routing and architecture variants (issue 11)\n")
  print(methods_table(rows, multi30k.VARIANTS, seeds[:1], with_time=True,
                      baseline="variants_baseline"))
  print("\n### Sparse upcycling (issue 8)\n")
  print(upcycling_table(rows))
  print("\n### Expert pruning (issue 9)\n")
  print(pruning_table(rows))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
