r"""``moe-prune``: drop rarely used experts for inference.

  moe-prune --checkpoint=/tmp/run \
      --stats=/tmp/run/eval/routing_stats.json --keep=0.5 \
      --granularity=language --pair=xa-xb --per_layer=fixed --output=/tmp/pruned

The model comes from ``--gin_file`` (e.g. ``models/tiny_switch.gin``), or,
without one, from the ``config.gin`` of the run that wrote ``--checkpoint``
(see :func:`moe_jax.evaluation.gin_setup.parse`).

``--stats`` is repeatable (e.g. one file per host): the files are merged.
``--granularity global|language|pair``; ``language``/``pair`` need ``--pair
SRC-TGT`` or ``--all_pairs`` (one pruned model per pair of the stats, in
``OUTPUT/SRC_TGT``). ``--per_layer fixed|threshold``, ``--score
activity|importance|load``, ``--min_experts`` (floor per layer; never below
the router's k). See :mod:`moe_jax.evaluation.pruning`.

Writes ``OUTPUT/checkpoint`` (params-only Orbax checkpoint, loadable by
``moe-eval --gin.CHECKPOINT_PATH=OUTPUT/checkpoint``), ``OUTPUT/pruned.gin``
(bindings to add after the model gin file) and ``OUTPUT/pruning.json`` (kept
expert ids per layer, parameter counts before/after).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from moe_jax import gin_utils


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="moe-prune", description=__doc__.split("\n\n")[0])
  p.add_argument("--checkpoint", required=True)
  p.add_argument("--stats", action="append", required=True)
  p.add_argument("--keep", type=float, required=True)
  p.add_argument("--granularity", default="global", choices=("global", "language", "pair"))
  p.add_argument("--per_layer", default="fixed", choices=("fixed", "threshold"))
  p.add_argument("--score", default="importance", choices=("activity", "importance", "load"))
  p.add_argument("--min_experts", type=int, default=1)
  p.add_argument("--pair", default=None, help="SRC-TGT, e.g. xa-xb")
  p.add_argument("--all_pairs", action="store_true")
  p.add_argument("--output", required=True)
  gin_utils.add_gin_flags(p)   # no model gin: the run's config.gin beside --checkpoint
  bindings, rest = gin_utils.split_gin_flags(argv)
  args = p.parse_args(rest)
  args.bindings = args.gin_bindings + bindings
  return args


def prune_checkpoint(model_config, params, stats, spec, output: str) -> dict:
  """Prunes ``params`` by ``spec`` and writes OUTPUT/{checkpoint, pruned.gin,
  pruning.json}; returns the summary written to pruning.json."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from moe_jax.checkpoints.params_only import save_params_checkpoint  # pylint: disable=g-import-not-at-top
  from moe_jax.evaluation import pruning  # pylint: disable=g-import-not-at-top
  layers = pruning.moe_layer_paths(params)
  missing = [l for l in layers if l not in stats.layers()]
  if missing:
    raise gin_utils.UsageError(
        f"The statistics have no counts for MoE layers {missing}; collect them "
        "with moe-eval on this model.")
  selection = pruning.choose_experts(stats, spec, layers)
  new_config = pruning.pruned_config(model_config, selection)  # refuses scanned models
  pruned = pruning.prune_params(params, selection)
  os.makedirs(output, exist_ok=True)
  ckpt = save_params_checkpoint(os.path.join(output, "checkpoint"), pruned)
  with open(os.path.join(output, "pruned.gin"), "w") as f:
    f.write(pruning.gin_bindings(new_config, ckpt))
  def count(tree) -> int:
    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(tree)))

  summary = {"spec": {k: v for k, v in vars(spec).items()},
             "kept": {l: [int(e) for e in s] for l, s in selection.items()},
             "params_before": count(params), "params_after": count(pruned),
             "checkpoint": ckpt}
  with open(os.path.join(output, "pruning.json"), "w") as f:
    json.dump(summary, f, indent=1, default=str)
  return summary


def run(args: argparse.Namespace, log_fn=print) -> list[dict]:
  from moe_jax import models  # pylint: disable=g-import-not-at-top
  from moe_jax.evaluation import gin_setup, inference, pruning  # pylint: disable=g-import-not-at-top
  from moe_jax.evaluation import routing_stats as rs_lib  # pylint: disable=g-import-not-at-top
  gin_setup.parse(args.gin_file, args.bindings, args.gin_search_paths,
                  checkpoint=args.checkpoint,
                  log_fn=lambda line: log_fn(f"moe-prune: {line}"))
  config = gin_setup.model_config()
  if not config.has_moe:
    raise gin_utils.UsageError("This model has no MoE layers; nothing to prune.")
  stats = rs_lib.RoutingStats.load_and_merge(args.stats)
  partitioner = gin_setup.partitioner({"data": -1, "fsdp": 1, "expert": 1, "model": 1})
  model = models.build_model(config)
  params = inference.load_params(args.checkpoint, model, partitioner)
  if args.granularity == "global":
    pairs = [None]
  elif args.all_pairs:
    pairs = sorted({(g.source_language, g.target_language) for g in stats.groups.values()
                    if g.source_language and g.target_language})
  elif args.pair:
    if "-" not in args.pair:
      raise gin_utils.UsageError(f"--pair={args.pair!r}: write it as SRC-TGT, e.g. xa-xb.")
    pairs = [tuple(args.pair.split("-", 1))]
  else:
    raise gin_utils.UsageError(f"--granularity={args.granularity} needs --pair=SRC-TGT "
                               "or --all_pairs.")
  out = []
  for pair in pairs:
    spec = pruning.PruneSpec(keep=args.keep, granularity=args.granularity,
                             per_layer=args.per_layer, score=args.score,
                             min_experts=args.min_experts, pair=pair)
    target = args.output if pair is None or not args.all_pairs else os.path.join(
        args.output, f"{pair[0]}_{pair[1]}")
    summary = prune_checkpoint(config, params, stats, spec, target)
    log_fn(f"moe-prune: {target}: {summary['params_before']:,} -> "
           f"{summary['params_after']:,} params; kept {summary['kept']}")
    out.append(summary)
  return out


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  def go():
    args = parse_args(argv)
    gin_utils.setup_logging(args.log_level)
    run(args)
  return gin_utils.run_cli("moe-prune", go, errors=(ValueError, FileNotFoundError))


def console_main() -> None:
  sys.exit(main())


if __name__ == "__main__":
  console_main()
