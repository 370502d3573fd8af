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
                  beam-decodes ``test_2016_flickr``.

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
from moe_jax.experiments import runner as runner_lib

SHORT_STEPS, SHORT_EVAL_PERIOD = 1000, 250
UPCYCLE_FROM_STEP = 500
PRUNE_KEEP = (0.5, 0.25)
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


def run_pruning(r, args, model_dir: str, fractions: Sequence[float] = PRUNE_KEEP) -> None:
  """Routing statistics of ``model_dir``'s last checkpoint on ``val``, global
  pruning to each fraction, a beam test decode of each pruned model."""
  base = ref.base_overrides(r, "en_de", args)
  saved = ref.saved_steps(model_dir) if os.path.isdir(model_dir) else []
  if not saved and not r.dry_run:
    raise FileNotFoundError(f"No checkpoint under {model_dir}; train it first "
                            "(multi30k_reference --model moe) or pass --prune_model.")
  step = max(saved, default=0)
  checkpoint = os.path.join(model_dir, str(step))
  gins = [ref.GIN["moe"]]
  stats_dir = os.path.join(r.out_dir, "prune_stats")
  r.evaluate("prune_stats", ["runs/eval.gin", *gins], [
      *base, f"CHECKPOINT_PATH='{checkpoint}'", "EVAL_SPLIT='validation'",
      f"EVAL_BATCH_SIZE={args.eval_batch_size}", "COLLECT_ROUTING_STATS=True"], stats_dir)
  rows = [{"keep": 1.0, "model_dir": model_dir, "step": step,
           "test": ref.decode_test_split(r, "prune_keep1.0_test", gins, base, checkpoint,
                                   os.path.join(r.out_dir, "prune_keep1.0_test"), "en_de",
                                   args)}]
  for keep in fractions:
    out = os.path.join(r.out_dir, f"prune_global_{keep}")
    r.run_tool(f"prune_global_{keep}_write", "prune", [
        f"--gin_file={gins[0]}", *[f"--gin_bindings={b}" for b in base],
        f"--checkpoint={checkpoint}", f"--stats={os.path.join(stats_dir, 'routing_stats.json')}",
        f"--keep={keep}", "--granularity=global", f"--output={out}"])
    if r.dry_run:
      continue
    with open(os.path.join(out, "pruning.json")) as f:
      pruning = json.load(f)
    tests = ref.decode_test_split(r, f"prune_global_{keep}_test", [*gins, os.path.join(out, "pruned.gin")],
                            base, None, os.path.join(out, "test"), "en_de", args)
    rows.append({"keep": keep, "params_before": pruning["params_before"],
                 "params_after": pruning["params_after"],
                 "experts_kept": {l: len(e) for l, e in pruning["kept"].items()},
                 "test": tests})
  if not r.dry_run:
    r.record({"name": "pruning_summary", "kind": "pruning_summary", "rows": rows})


# --- noise: paired bootstrap on the validation decodes ------------------------------
def validation_predictions(model_dir: str, step: int,
                           task: str = "multi30k_translate_en_de") -> Optional[list[dict]]:
  """The training-time validation decode of ``step`` (``None`` when absent)."""
  path = os.path.join(model_dir, "eval_decode", str(step), "predictions", f"{task}.jsonl")
  return ref.read_predictions(path) if os.path.exists(path) else None


def paired_bootstrap(baseline: Sequence[str], systems: dict[str, Sequence[str]],
                     references: Sequence[str], samples: int = 1000) -> dict[str, dict]:
  """sacreBLEU's paired bootstrap of each system against ``baseline``:
  ``{name: {"bleu", "ci95", "p_value"}}`` (``ci95``: half the 95% interval
  of the system's own BLEU over resampled sentence sets)."""
  from sacrebleu.metrics import BLEU  # pylint: disable=g-import-not-at-top
  from sacrebleu.significance import PairedTest  # pylint: disable=g-import-not-at-top
  named = [("baseline", list(baseline)), *[(n, list(s)) for n, s in systems.items()]]
  test = PairedTest(named, {"BLEU": BLEU()}, [list(references)], test_type="bs",
                    n_samples=samples)
  _, results = test()
  out = {}
  for (name, _), res in zip(named, results["BLEU"]):
    out[name] = {"bleu": round(float(res.score), 2),
                 "ci95": None if res.ci is None else round(float(res.ci), 2),
                 "p_value": None if res.p_value is None else float(res.p_value)}
  return out


def validation_noise(r, names: Sequence[str],
                     baselines: Sequence[str] = ("moe_en_de", "dense_en_de"),
                     step: int = SHORT_STEPS) -> dict[str, Optional[dict]]:
  """``{baseline: paired bootstrap of names' step-``step`` validation decodes
  against the baseline's}`` (``None`` where the baseline's decode is missing),
  on the references of the validation file. Each decode is read once."""
  from tasks import multi30k  # pylint: disable=g-import-not-at-top
  decodes = {}
  for n in dict.fromkeys((*baselines, *names)):
    preds = validation_predictions(os.path.join(r.out_dir, n), step)
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
    res = paired_bootstrap([p["prediction"] for p in decodes[baseline]], systems,
                           refs[baseline])
    res[baseline] = res.pop("baseline")
    out[baseline] = res
  return out


# --- the results page -------------------------------------------------------------
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
  pruning = next((r for r in records.values() if r.get("kind") == "pruning_summary"), None)
  if pruning:
    lines += ["", "Expert pruning (global, importance scores from the routing statistics on "
              "`val`; beam 4 test decode):", "",
              "| experts kept | parameters | experts per MoE layer | test BLEU | chrF |",
              "|---|---|---|---|---|"]
    before = next((row["params_before"] for row in pruning["rows"] if "params_before" in row),
                  None)
    for row in pruning["rows"]:
      test = next(iter(row["test"].values()))
      per_layer = sorted(set(row.get("experts_kept", {}).values()))
      params = row.get("params_after", before)
      lines.append(
          f"| {row['keep']:.0%} | {'–' if params is None else f'{params / 1e6:.2f} M'} | "
          f"{', '.join(map(str, per_layer)) or 'all'} | {test['bleu']:.1f} | {test['chrf']:.1f} |")
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
                 help="model dir of a trained moe_en_de (default: OUT/moe_en_de)")
  args = p.parse_args(argv)
  r = ref.make_runner(args)
  only = [s for s in args.only.split(",") if s]
  seeds = [int(s) for s in args.seeds.split(",")]
  if args.suite in ("regularization", "all"):
    run_regularization(r, args, seeds, only)
  if args.suite in ("upcycling", "all"):
    run_upcycling(r, args)
  if args.suite in ("pruning", "all"):
    run_pruning(r, args, args.prune_model or os.path.join(r.out_dir, "moe_en_de"))
  if r.dry_run:
    return 0
  records = r.records()
  runs = sorted(_summaries(records))
  noise_by_baseline = validation_noise(r, runs, step=args.steps)
  noise, noise_vs_dense = noise_by_baseline["moe_en_de"], noise_by_baseline["dense_en_de"]
  if noise:
    r.record({"name": "validation_bootstrap", "kind": "bootstrap", "step": args.steps,
              "results": noise, "results_vs_dense": noise_vs_dense})
  ref.publish(r, args, render(r.records(), noise, args.steps, args.eval_period,
                              noise_vs_dense), SECTION_BEGIN, SECTION_END)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
