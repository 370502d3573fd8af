r"""The MoE methods on the Multi30k reference recipe (``docs/experiments.md``).

  python -m moe_jax.experiments.multi30k_methods --suite regularization --out /tmp/short
  python -m moe_jax.experiments.multi30k_methods --suite upcycling --out /tmp/short
  python -m moe_jax.experiments.multi30k_methods --suite pruning --out /tmp/short \
      --prune_model /tmp/ref/moe_en_de --markdown docs/experiments.md \
      --results docs/multi30k_methods.jsonl

Every run is the reference recipe (``runs/multi30k_reference*.gin``, en->de,
Adafactor, the 6,000-piece vocabulary) at its short length: 1,000 steps with
the cosine schedule ending there, greedy BLEU and cross-entropy on the whole
validation split every 250 steps (a checkpoint at each). The baselines are
the recipe's own runs, ``dense_en_de`` and ``moe_en_de`` of
``multi30k_reference --steps 1000 --eval_period 250`` in the same ``OUT``
(run here when missing).

Suites:
  regularization  the Switch twin with EOM, FOM, gating dropout or
                  conditional routing against it and against dense: train and
                  validation CE curves (does the MoE over-fit?), validation BLEU.
  upcycling       the dense run's step-500 checkpoint (half the budget)
                  upcycled into the Switch twin (Adafactor slots carried) and
                  trained to step 1,000, against the dense run's own steps
                  500..1,000 (the dense continuation) and the MoE from scratch.
  pruning         a trained MoE (``--prune_model``, e.g. the 2,000-step
                  ``moe_en_de``): routing statistics on ``val``, then global
                  expert pruning to 50% and 25% of the experts; each model
                  beam-decodes ``test_2016_flickr``. With ``--directions six``
                  (a ``multi30k_reference --directions six --model moe`` run)
                  also per-language pruning, one pruned model per pair, and
                  every model decodes all six test sets.

Differences between runs are set against the validation set's sampling noise:
a paired bootstrap (sacreBLEU, 1,000 resamples) of each run's step-1,000
validation decode against the MoE baseline's (and the dense one's). Seed
spreads need second seeds (``--seeds 0,1``); only the seed-0 baselines are
beam-decoded on the test split, every other run is compared on validation.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Optional, Sequence

from moe_jax.experiments import multi30k_reference as ref

SHORT_STEPS, SHORT_EVAL_PERIOD = 1000, 250
UPCYCLE_FROM_STEP = 500
PRUNE_KEEP = (0.5, 0.25)
# The schedule every method run was recorded with (docs/multi30k_methods.jsonl):
# the gin's cosine with decay_steps = TRAIN_STEPS, pinned so that a change of
# the reference gin's default schedule leaves the short recipe as measured.
SHORT_SCHEDULE = ("make_schedule.name='cosine'", "make_schedule.total_steps=None",
                  "make_schedule.decay_steps=%TRAIN_STEPS")
SECTION_BEGIN = "<!-- multi30k_methods: begin (written by moe_jax.experiments.multi30k_methods) -->"
SECTION_END = "<!-- multi30k_methods: end -->"

# name -> (model, bindings after the recipe's). Rates as in the 300-step
# suites (multi30k.REGULARIZATION), from the papers.
REGULARIZATION = {
    "dense": ("dense", ()),
    "moe": ("moe", ()),
    "eom": ("moe", ("MoeConfig.expert_output_masking_rate=0.2",)),
    "fom": ("moe", ("MoeConfig.final_output_masking_rate=0.2",)),
    "gating_dropout": ("moe", ("MoeConfig.gating_dropout_rate=0.2",
                               "MoeConfig.gating_dropout_mode='gate_expert_drop'")),
    "cmr": ("moe", ("SparseLayout.conditional_routing=@ConditionalRoutingConfig()",)),
}


def run_name(method: str, seed: int) -> str:
  """``dense``/``moe`` seed 0 are the recipe's own runs (``dense_en_de``)."""
  base = f"{method}_en_de" if method in ("dense", "moe") else method
  return base if seed == 0 else f"{base}_s{seed}"


def run_regularization(r, args, seeds: Sequence[int], only: Sequence[str] = ()) -> None:
  for method, (model, extra) in REGULARIZATION.items():
    if only and method not in only:
      continue
    for seed in seeds:
      seed_binding = () if seed == 0 else (f"SEED={seed}",)
      try:
        ref.run_model(r, model, "en_de", args, name=run_name(method, seed),
                      extra=(*extra, *seed_binding),
                      test=method in ("dense", "moe") and seed == 0)
      except RuntimeError as e:  # report and go on with the other methods
        print(f"!! {method} seed {seed} failed: {str(e)[-1500:]}", flush=True)


def run_upcycling(r, args) -> dict:
  """Upcycles ``dense_en_de`` at step 500 and trains it to the recipe's end."""
  ref.run_model(r, "dense", "en_de", args)  # the dense run and its continuation
  base = ref.base_overrides(r, "en_de", args)
  bindings = [*base, f"TRAIN_STEPS={args.steps}"]
  up_dir = os.path.join(r.out_dir, "upcycled_en_de")
  r.run_tool("upcycle_write", "upcycle", [
      f"--dense_checkpoint={os.path.join(r.out_dir, 'dense_en_de', str(UPCYCLE_FROM_STEP))}",
      "--format=moe_jax", f"--gin_file={ref.GIN['moe']}",
      *[f"--gin_bindings={b}" for b in bindings], f"--output={up_dir}", "--overwrite",
      "--optimizer_state=carry", "--verify"])
  return ref.run_model(r, "moe", "en_de", args, name="upcycled_en_de", model_dir=up_dir,
                       gin_files=[ref.GIN["moe"], os.path.join(up_dir, "upcycled_model.gin")])


def run_pruning(r, args, model_dir: str, fractions: Sequence[float] = PRUNE_KEEP,
                directions: str = "en_de") -> None:
  """Routing statistics of ``model_dir``'s last checkpoint on ``val``, then
  expert pruning to each fraction, and a beam test decode of each pruned
  model on every test set of ``directions``.

  ``en_de``: global pruning (one set of experts for the pair). ``six`` (the
  six-direction model) adds NLLB's per-language pruning: for each pair, the
  encoder keeps the experts its source language uses and the decoder those
  its target language uses (``moe-prune --granularity=language``), and each
  pair's pruned model decodes that pair's test set.
  """
  base = ref.base_overrides(r, directions, args)
  saved = ref.saved_steps(model_dir) if os.path.isdir(model_dir) else []
  if not saved and not r.dry_run:
    raise FileNotFoundError(
        f"No checkpoint under {model_dir}; train it first (multi30k_reference --model moe"
        f" --directions {directions}) or pass --prune_model.")
  step = max(saved, default=0)
  checkpoint = os.path.join(model_dir, str(step))
  gins = [ref.GIN["moe"]]
  stats_dir = os.path.join(r.out_dir, "prune_stats")
  stats = os.path.join(stats_dir, "routing_stats.json")
  r.evaluate("prune_stats", ["runs/eval.gin", *gins], [
      *base, f"CHECKPOINT_PATH='{checkpoint}'", "EVAL_SPLIT='validation'",
      f"EVAL_BATCH_SIZE={args.eval_batch_size}", "COLLECT_ROUTING_STATS=True"], stats_dir)
  rows = [{"keep": 1.0, "granularity": "global", "model_dir": model_dir, "step": step,
           "test": ref.decode_test_split(r, "prune_keep1.0_test", gins, base, checkpoint,
                                         os.path.join(r.out_dir, "prune_keep1.0_test"),
                                         directions, args)}]
  prune_args = [f"--gin_file={gins[0]}", *[f"--gin_bindings={b}" for b in base],
                f"--checkpoint={checkpoint}", f"--stats={stats}"]
  for keep in fractions:
    out = os.path.join(r.out_dir, f"prune_global_{keep}")
    r.run_tool(f"prune_global_{keep}_write", "prune", [
        *prune_args, f"--keep={keep}", "--granularity=global", f"--output={out}"])
    tests = ref.decode_test_split(r, f"prune_global_{keep}_test",
                                  [*gins, os.path.join(out, "pruned.gin")], base, None,
                                  os.path.join(out, "test"), directions, args)
    if not r.dry_run:
      rows.append({"keep": keep, "granularity": "global",
                   **_pruned_sizes([os.path.join(out, "pruning.json")]), "test": tests})
    if directions == "en_de":
      continue
    out = os.path.join(r.out_dir, f"prune_language_{keep}")
    r.run_tool(f"prune_language_{keep}_write", "prune", [
        *prune_args, f"--keep={keep}", "--granularity=language", "--all_pairs",
        f"--output={out}"])
    tests, summaries = {}, []
    for task in ref.DIRECTIONS[directions][2]:
      pair_dir = os.path.join(out, "_".join(ref.task_languages(task)))
      tests.update(ref.decode_test_split(
          r, f"prune_language_{keep}_{os.path.basename(pair_dir)}_test",
          [*gins, os.path.join(pair_dir, "pruned.gin")], [*base, f"MIXTURE_OR_TASK_NAME='{task}'"],
          None, os.path.join(pair_dir, "test"), directions, args, test_tasks=(task,)))
      summaries.append(os.path.join(pair_dir, "pruning.json"))
    if not r.dry_run:
      rows.append({"keep": keep, "granularity": "language", **_pruned_sizes(summaries),
                   "test": tests})
  if not r.dry_run:
    r.record({"name": "pruning_summary" + ("" if directions == "en_de" else f"_{directions}"),
              "kind": "pruning_summary", "directions": directions, "rows": rows})


def _pruned_sizes(summary_paths: Sequence[str]) -> dict:
  """Sizes of pruned models from their ``pruning.json`` (one per language
  pair for per-language pruning; the largest is reported): parameters before
  and after, and the experts kept per MoE layer."""
  summaries = []
  for path in summary_paths:
    with open(path) as f:
      summaries.append(json.load(f))
  largest = max(summaries, key=lambda s: s["params_after"])
  return {"params_before": largest["params_before"], "params_after": largest["params_after"],
          "experts_kept": {l: len(e) for l, e in largest["kept"].items()}}


# --- noise: paired bootstrap on the validation decodes ------------------------------
def validation_noise(r, names: Sequence[str],
                     baselines: Sequence[str] = ("moe_en_de", "dense_en_de"),
                     step: int = SHORT_STEPS) -> dict[str, Optional[dict]]:
  """``{baseline: paired bootstrap of names' step-``step`` validation decodes
  against the baseline's}`` (``None`` where the baseline's decode is missing),
  on the references of the validation file. Each decode is read once."""
  from tasks import multi30k  # pylint: disable=g-import-not-at-top
  decodes = {}
  for n in dict.fromkeys((*baselines, *names)):
    preds = ref.validation_predictions(os.path.join(r.out_dir, n), step)
    if preds is not None:
      decodes[n] = preds
  if not decodes:
    return {b: None for b in baselines}
  columns, _ = multi30k.read_split("validation", ("en", "de"))
  refs = {n: ref.references_for(p, columns["en"], columns["de"])  # checks the order
          for n, p in decodes.items()}
  out = {}
  for baseline in baselines:
    systems = {n: [p["prediction"] for p in decodes[n]] for n in names
               if n in decodes and n != baseline}
    if baseline not in decodes or not systems:
      out[baseline] = None
      continue
    res = ref.paired_bootstrap([p["prediction"] for p in decodes[baseline]], systems,
                           refs[baseline])
    res[baseline] = res.pop("baseline")
    out[baseline] = res
  return out


def recorded_noise(records: dict, step: int) -> tuple[Optional[dict], Optional[dict]]:
  """The last recorded bootstrap of step ``step`` (against the MoE baseline,
  against the dense one), for an ``OUT`` that holds the records of earlier
  runs but not their decodes: runs trained since have no bootstrap entry."""
  rec = records.get("validation_bootstrap")
  if not rec or rec.get("step") != step:
    return None, None
  return rec.get("results"), rec.get("results_vs_dense")


# --- the results page -------------------------------------------------------------
def render_pruning(pruning: dict) -> list[str]:
  """The table of one ``pruning_summary`` record: one row per fraction kept
  and granularity; test BLEU and chrF for one pair, BLEU per test set and
  their mean for the six-direction model."""
  rows = pruning["rows"]
  tasks = list(dict.fromkeys(t for row in rows for t in row["test"]))
  before = next((row["params_before"] for row in rows if "params_before" in row), None)
  if len(tasks) == 1:
    lines = ["Expert pruning (global, importance scores from the routing statistics on "
             "`val`; beam 4 test decode):", "",
             "| experts kept | parameters | experts per MoE layer | test BLEU | chrF |",
             "|---|---|---|---|---|"]
  else:
    lines = [f"Expert pruning of the {pruning.get('directions', '')}-direction model "
             "(importance scores from the routing statistics on `val`; global: one "
             "set of experts for every pair; language: per pair, the encoder keeps "
             "its source language's experts and the decoder its target's, parameters "
             "of the largest pair's model; beam 4 test BLEU):", "",
             "| experts kept | granularity | parameters | experts per MoE layer | "
             + " | ".join("->".join(ref.task_languages(t)) for t in tasks) + " | mean |",
             "|---|---|---|---|" + "---|" * (len(tasks) + 1)]
  for row in rows:
    per_layer = sorted(set(row.get("experts_kept", {}).values()))
    params = row.get("params_after", before)
    head = (f"| {row['keep']:.0%} | "
            + ("" if len(tasks) == 1 else f"{row.get('granularity', 'global')} | ")
            + f"{'–' if params is None else f'{params / 1e6:.2f} M'} | "
            f"{', '.join(map(str, per_layer)) or 'all'} |")
    if len(tasks) == 1:
      test = row["test"].get(tasks[0], {})
      lines.append(f"{head} {_f(test.get('bleu'), 1)} | {_f(test.get('chrf'), 1)} |")
      continue
    bleus = [row["test"].get(t, {}).get("bleu") for t in tasks]
    mean = None if None in bleus else sum(bleus) / len(bleus)
    lines.append(f"{head} " + " | ".join(_f(b, 1) for b in bleus) + f" | {_f(mean, 1)} |")
  return lines


def _at(points: Sequence, step: int) -> Optional[float]:
  return dict((int(s), v) for s, v in points or ()).get(step)


def _f(value: Optional[float], digits: int = 2) -> str:
  return "–" if value is None else f"{value:.{digits}f}"


def _summaries(records: dict) -> dict[str, dict]:
  """``{run: summary}``; a summary written before the ``run`` field was
  named ``RUN_summary``."""
  return {s.get("run", s["name"][:-len("_summary")]): s for s in records.values()
          if s.get("kind") == "reference_summary"}


def render(records: dict, noise: Optional[dict], steps: int = SHORT_STEPS,
           period: int = SHORT_EVAL_PERIOD, noise_vs_dense: Optional[dict] = None) -> str:
  """The methods' section of docs/experiments.md from the records of ``OUT``;
  ``noise``: :func:`validation_noise` against the MoE baseline (``BLEU
  (bootstrap)`` and ``p vs moe``), ``noise_vs_dense`` against the dense one."""
  runs = _summaries(records)
  evals = list(range(period, steps + 1, period))
  lines = [SECTION_BEGIN, "",
           f"Short recipe: {steps} steps, validation every {period}. Train CE: the "
           "logged training cross-entropy (dropout on) at that step; gap = validation "
           "CE - train CE at the last step (a growing gap or a validation CE rising from "
           "its minimum is over-fitting). Bootstrap: sacreBLEU paired bootstrap (1,000 "
           "resamples) of the last validation decode against `moe_en_de`'s (p vs dense: "
           "against `dense_en_de`'s); ±: half "
           "the 95% interval (the validation set's sampling noise, not a seed spread).",
           "", "| run | val BLEU " + " / ".join(str(e) for e in evals) + " | val CE "
           + " / ".join(str(e) for e in evals) + " | train CE | gap | BLEU (bootstrap) "
           "| p vs moe | p vs dense | test BLEU |", "|---|---|---|---|---|---|---|---|---|"]
  order = [run_name(m, 0) for m in REGULARIZATION] + ["upcycled_en_de"]
  order += sorted(set(runs) - set(order))
  for name in order:
    s = runs.get(name)
    if s is None:
      continue
    val_ce, train_ce = s["validation_ce_curve"], s["train_ce_curve"]
    last_val, last_train = _at(val_ce, steps), _at(train_ce, steps)
    gap = None if last_val is None or last_train is None else last_val - last_train
    n = (noise or {}).get(name, {})
    test = next(iter((s.get("test") or {}).values()), {})
    lines.append(
        f"| {name} | " + " / ".join(_f(_at(s["validation_bleu_by_step"], e), 1) for e in evals)
        + " | " + " / ".join(_f(_at(val_ce, e)) for e in evals)
        + f" | {_f(last_train)} | {_f(gap)} | "
        + (f"{n['bleu']:.1f} ± {n['ci95']:.1f}" if n.get("ci95") is not None
           else _f(n.get("bleu"), 1))
        + f" | {_f(n.get('p_value'), 3)} | "
        f"{_f((noise_vs_dense or {}).get(name, {}).get('p_value'), 3)} | "
        f"{_f(test.get('bleu'), 1)} |")
  for pruning in sorted((r for r in records.values() if r.get("kind") == "pruning_summary"),
                        key=lambda r: r["name"]):
    lines += ["", *render_pruning(pruning)]
  lines += ["", SECTION_END]
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ref.add_recipe_flags(p, steps=SHORT_STEPS, eval_period=SHORT_EVAL_PERIOD)
  p.add_argument("--suite", required=True,
                 choices=("regularization", "upcycling", "pruning", "report", "all"))
  p.add_argument("--only", default="", help="comma-separated method names")
  p.add_argument("--seeds", default="0")
  p.add_argument("--prune_model", default="",
                 help="model dir of a trained MoE (default: OUT/moe_DIRECTIONS)")
  p.add_argument("--directions", choices=tuple(ref.DIRECTIONS), default="en_de",
                 help="pruning only: the directions the --prune_model was trained on "
                      "(six: global and per-language pruning, all six test sets)")
  args = p.parse_args(argv)
  if args.directions != "en_de" and args.suite not in ("pruning", "report"):
    p.error(f"--directions={args.directions} applies to --suite=pruning only; the "
            "regularization and upcycling suites run on en_de.")
  args.gin = [*SHORT_SCHEDULE, *(args.gin or ())]
  r = ref.make_runner(args)
  only = [s for s in args.only.split(",") if s]
  seeds = [int(s) for s in args.seeds.split(",")]
  if args.suite in ("regularization", "all"):
    run_regularization(r, args, seeds, only)
  if args.suite in ("upcycling", "all"):
    run_upcycling(r, args)
  if args.suite in ("pruning", "all"):
    run_pruning(r, args, args.prune_model or os.path.join(r.out_dir, f"moe_{args.directions}"),
                directions=args.directions)
  if r.dry_run:
    return 0
  records = r.records()
  runs = sorted(_summaries(records))
  noise_by_baseline = validation_noise(r, runs, step=args.steps)
  noise, noise_vs_dense = noise_by_baseline["moe_en_de"], noise_by_baseline["dense_en_de"]
  if noise:
    r.record({"name": "validation_bootstrap", "kind": "bootstrap", "step": args.steps,
              "results": noise, "results_vs_dense": noise_vs_dense})
  else:  # the baselines' decodes are not in OUT (e.g. records copied from docs/)
    noise, noise_vs_dense = recorded_noise(records, args.steps)
  ref.publish(r, args, render(r.records(), noise, args.steps, args.eval_period,
                              noise_vs_dense), SECTION_BEGIN, SECTION_END)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
