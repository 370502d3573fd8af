r"""The Multi30k reference recipe, end to end (``docs/experiments.md``).

  python -m moe_jax.experiments.multi30k_reference --out /tmp/m30k_ref
  python -m moe_jax.experiments.multi30k_reference --out /tmp/m30k_ref --model moe \
      --markdown docs/experiments.md --results docs/multi30k_reference.jsonl

One model (``--model dense``: ``runs/multi30k_reference.gin``; ``moe``: its
Switch twin ``runs/multi30k_reference_moe.gin``; ``both``) goes through:

1. ``moe-train-vocab``: a joint BPE SentencePiece vocabulary trained on the
   training text of the task (skipped when ``OUT`` already has it);
2. ``moe-train``: greedy BLEU on the whole validation split every
   ``EVAL_PERIOD`` steps, a checkpoint at each of those steps;
3. the checkpoint with the best validation BLEU (among those kept), or, with
   ``--average_last N``, the mean of the last N checkpoints (``moe-average``)
   when its validation BLEU is higher still (both decoded by ``moe-eval``);
4. ``moe-eval`` on ``test_2016_flickr`` with beam search (beam 4, GNMT length
   penalty 0.6, T5X's translation defaults);
5. sacreBLEU on the detokenized output against the reference file, printed
   with its signature (cased, 13a: the WMT convention), next to the
   lowercased score (closer to the tokenized, lowercased BLEU of the
   multimodal-MT papers) and chrF.

Each finished stage is a record in ``OUT/results.jsonl`` (a rerun skips it),
``--results`` copies the records into a file in the repository and
``--markdown`` rewrites the recipe's section of that page. ``--directions
six`` trains the same model on the six-direction mixture instead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from typing import Mapping, Optional, Sequence

from moe_jax.experiments import runner as runner_lib

GIN = {"dense": "runs/multi30k_reference.gin", "moe": "runs/multi30k_reference_moe.gin"}
# directions -> (seqio task or mixture, SentencePiece pieces, test tasks).
DIRECTIONS = {
    "en_de": ("multi30k_translate_en_de", 6000, ("multi30k_translate_en_de",)),
    "six": ("multi30k_translate_mix", 8000,
            tuple(f"multi30k_translate_{s}_{t}" for x in ("de", "fr", "cs")
                  for s, t in (("en", x), (x, "en")))),
}
EXTRA_IDS = 100
SECTION_BEGIN = "<!-- multi30k_reference: begin (written by moe_jax.experiments.multi30k_reference) -->"
SECTION_END = "<!-- multi30k_reference: end -->"


def vocab_size_for(pieces: int) -> int:
  """Embedding rows for ``pieces`` + the extra ids, padded to a multiple of 128."""
  return int(math.ceil((pieces + EXTRA_IDS) / 128) * 128)


# --- checkpoint selection -------------------------------------------------------
def validation_bleu(model_dir: str) -> dict[int, float]:
  """``{step: mean BLEU over tasks}`` from the training-time decodes
  (``MODEL_DIR/eval_decode/<step>/metrics.json``)."""
  root = os.path.join(model_dir, "eval_decode")
  out = {}
  for name in os.listdir(root) if os.path.isdir(root) else ():
    path = os.path.join(root, name, "metrics.json")
    if name.isdigit() and os.path.exists(path):
      with open(path) as f:
        metrics = json.load(f)
      bleu = [m["bleu"] for m in metrics.values() if "bleu" in m]
      if bleu:
        out[int(name)] = sum(bleu) / len(bleu)
  return out


def saved_steps(model_dir: str) -> list[int]:
  """Steps with a finished checkpoint (Orbax writes a temporary name first,
  so a half-written one never has a plain step number)."""
  return sorted(int(n) for n in os.listdir(model_dir)
                if n.isdigit() and os.path.isdir(os.path.join(model_dir, n)))


def best_step(bleu_by_step: Mapping[int, float], saved: Sequence[int]) -> int:
  """The saved step with the highest validation BLEU (the later one on ties)."""
  candidates = [s for s in saved if s in bleu_by_step]
  if not candidates:
    raise RuntimeError(
        f"No saved checkpoint has a validation BLEU (decoded steps "
        f"{sorted(bleu_by_step)}, saved {list(saved)}); train with EVAL_PERIOD "
        "equal to CHECKPOINT_PERIOD and train.decode_eval=True.")
  return max(candidates, key=lambda s: (bleu_by_step[s], s))


# --- sacreBLEU on the test decode ------------------------------------------------
def read_predictions(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def validation_predictions(model_dir: str, step: int,
                           task: str = "multi30k_translate_en_de") -> Optional[list[dict]]:
  """The training-time validation decode of ``step`` (``None`` when absent)."""
  path = os.path.join(model_dir, "eval_decode", str(step), "predictions", f"{task}.jsonl")
  return read_predictions(path) if os.path.exists(path) else None


def task_languages(task: str) -> tuple[str, str]:
  """``multi30k_translate_SRC_TGT`` -> ``(SRC, TGT)``."""
  return re.fullmatch(r"multi30k_translate_(\w\w)_(\w\w)", task).groups()


def references_for(records: Sequence[dict], sources: Sequence[str],
                   references: Sequence[str]) -> list[str]:
  """The reference of each decoded record, checked against the source file:
  record ``i`` must be the translation of source line ``i``."""
  if len(records) > len(sources):
    raise ValueError(f"{len(records)} predictions but {len(sources)} source lines.")
  for i, (rec, src) in enumerate(zip(records, sources)):
    if not rec["input"].endswith(src.strip()):
      raise ValueError(f"Prediction {i} is for input {rec['input']!r}, not for source "
                       f"line {i} {src!r}: the decode is not in file order.")
  return list(references[:len(records)])


def sacrebleu_scores(predictions: Sequence[str], references: Sequence[str]) -> dict:
  """sacreBLEU (cased 13a, and lowercased) and chrF, with their signatures."""
  import sacrebleu  # pylint: disable=g-import-not-at-top
  out = {}
  for name, metric in (("bleu", sacrebleu.metrics.BLEU()),
                       ("bleu_lowercase", sacrebleu.metrics.BLEU(lowercase=True)),
                       ("chrf", sacrebleu.metrics.CHRF())):
    score = metric.corpus_score(list(predictions), [list(references)])
    out[name] = round(score.score, 2)
    out[f"{name}_signature"] = str(metric.get_signature())
  return out


def score_test_decode(eval_dir: str, task: str, source_lang: str, target_lang: str,
                      max_examples: Optional[int] = None) -> dict:
  """sacreBLEU of ``eval_dir/predictions/<task>.jsonl`` against the test files."""
  from tasks import multi30k  # pylint: disable=g-import-not-at-top
  columns, _ = multi30k.read_split("test", (source_lang, target_lang))
  records = read_predictions(os.path.join(eval_dir, "predictions", f"{task}.jsonl"))
  if max_examples is None and len(records) != len(columns[target_lang]):
    raise ValueError(f"{len(records)} test predictions for {task}, expected "
                     f"{len(columns[target_lang])}.")
  refs = references_for(records, columns[source_lang], columns[target_lang])
  return {"examples": len(records),
          **sacrebleu_scores([r["prediction"] for r in records], refs)}


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


# --- the pipeline ---------------------------------------------------------------
def base_overrides(r: runner_lib.Runner, directions: str, args) -> list[str]:
  """Trains the vocabulary of ``directions`` (once per ``OUT``), points the
  tasks at it, and returns the bindings every run of the recipe starts from."""
  task, pieces, _ = DIRECTIONS[directions]
  pieces = args.vocab_pieces or pieces
  vocab = os.path.join(r.out_dir, f"{task}_bpe{pieces}.model")
  r.train_vocab(vocab, task, pieces, args.vocab_max_examples)
  r.env["MOE_JAX_MULTI30K_VOCAB"] = vocab
  return [f"T5Config.vocab_size={vocab_size_for(pieces)}", f"MIXTURE_OR_TASK_NAME='{task}'"]


def decode_test_split(r: runner_lib.Runner, name: str, gin_files: Sequence[str],
                overrides: Sequence[str], checkpoint: Optional[str], eval_dir: str,
                directions: str, args, test_tasks: Optional[Sequence[str]] = None) -> dict:
  """Beam-decodes ``test_2016_flickr`` with ``checkpoint`` (``None``: the one
  a gin file names) and scores it: ``{test task: sacreBLEU scores}`` for
  ``test_tasks`` (default: every test task of ``directions``)."""
  eval_overrides = [
      *overrides, *([f"CHECKPOINT_PATH='{checkpoint}'"] if checkpoint else []),
      "EVAL_SPLIT='test'", "DECODE_METHOD='beam'", f"BEAM_SIZE={args.beam_size}",
      f"DECODE_ALPHA={args.alpha}", f"MAX_DECODE_LENGTH={args.max_decode_length}",
      f"EVAL_BATCH_SIZE={args.eval_batch_size}", "COLLECT_ROUTING_STATS=False",
      *([f"EVAL_MAX_EXAMPLES={args.max_test_examples}"] if args.max_test_examples else [])]
  r.evaluate(name, ["runs/eval.gin", *gin_files], eval_overrides, eval_dir)
  if r.dry_run:
    return {}
  tests = {}
  for test_task in test_tasks or DIRECTIONS[directions][2]:
    src, tgt = task_languages(test_task)
    tests[test_task] = score_test_decode(eval_dir, test_task, src, tgt,
                                         args.max_test_examples)
  return tests


def choose_checkpoint(r: runner_lib.Runner, name: str, gin_files: Sequence[str],
                      overrides: Sequence[str], model_dir: str, step: int, args
                      ) -> tuple[str, str, dict]:
  """The best single checkpoint (``step``) or the average of the last
  ``--average_last`` saved ones (``moe-average``), whichever has the higher
  greedy validation BLEU, both decoded by ``moe-eval`` with the same
  settings; returns ``(label, checkpoint path, {label: validation BLEU})``."""
  saved = saved_steps(model_dir)
  n = min(args.average_last, len(saved))
  if n < 2:  # nothing to average
    return f"step {step}", os.path.join(model_dir, str(step)), {}
  average_dir = os.path.join(model_dir, f"average_last{n}")
  r.run_tool(f"{name}_average", "average", [
      f"--model_dir={model_dir}", f"--last={n}", f"--output={average_dir}", "--overwrite"])
  candidates = {f"step {step}": os.path.join(model_dir, str(step)),
                f"average of steps {saved[-n]}-{saved[-1]}": os.path.join(average_dir,
                                                                       "checkpoint")}
  bleu = {}
  for label, path in candidates.items():
    tag = label.replace(" ", "_")
    result = r.evaluate(f"{name}_validation_{tag}", ["runs/eval.gin", *gin_files], [
        *overrides, f"CHECKPOINT_PATH='{path}'", "EVAL_SPLIT='validation'",
        "DECODE_METHOD='greedy'", f"EVAL_BATCH_SIZE={args.eval_batch_size}",
        "COLLECT_ROUTING_STATS=False",
        *([f"EVAL_MAX_EXAMPLES={args.eval_steps * args.eval_batch_size}"]
          if args.eval_steps else [])], os.path.join(model_dir, f"validation_{tag}"))
    bleu[label] = None if r.dry_run else result["mean_bleu"]
  if r.dry_run:
    return f"step {step}", candidates[f"step {step}"], {}
  chosen = max(bleu, key=lambda k: (bleu[k], k.startswith("average")))
  print(f"{name}: greedy validation BLEU {bleu}; test-decoding the {chosen}", flush=True)
  return chosen, candidates[chosen], bleu


def run_model(r: runner_lib.Runner, model: str, directions: str, args, *,
              name: Optional[str] = None, extra: Sequence[str] = (),
              gin_files: Optional[Sequence[str]] = None, model_dir: Optional[str] = None,
              test: bool = True) -> dict:
  """Trains, selects, test-decodes and scores one model; returns its summary.

  ``name`` (default ``MODEL_DIRECTIONS``), ``extra`` bindings after the
  recipe's, ``gin_files`` (default the model's), ``model_dir`` (default
  ``OUT/name``; an existing one is resumed, e.g. an upcycled checkpoint) and
  ``test=False`` (no test decode: validation figures only) serve the methods
  driver (``multi30k_methods``).
  """
  name = name or f"{model}_{directions}"
  gin_files = list(gin_files or [GIN[model]])
  overrides = base_overrides(r, directions, args)
  if args.steps:
    overrides += [f"TRAIN_STEPS={args.steps}"]
  if args.eval_period:
    overrides += [f"EVAL_PERIOD={args.eval_period}", f"CHECKPOINT_PERIOD={args.eval_period}"]
  if args.eval_steps:
    overrides += [f"EVAL_STEPS={args.eval_steps}"]
  overrides += list(args.gin or ()) + list(extra)
  model_dir = model_dir or os.path.join(r.out_dir, name)
  train = r.train(name, gin_files, overrides, model_dir=model_dir)
  if r.dry_run:
    return {}
  bleu_by_step = validation_bleu(model_dir)
  step = best_step(bleu_by_step, saved_steps(model_dir))
  print(f"{name}: validation BLEU by step {dict(sorted(bleu_by_step.items()))}; "
        f"best saved step {step}", flush=True)
  chosen, checkpoint, selection = f"step {step}", os.path.join(model_dir, str(step)), {}
  if args.average_last > 1 and test:
    chosen, checkpoint, selection = choose_checkpoint(r, name, gin_files, overrides,
                                                      model_dir, step, args)
  tests = {}
  if test:
    label = chosen.replace(" ", "")
    tests = decode_test_split(r, f"{name}_test", gin_files, overrides, checkpoint,
                              os.path.join(model_dir, f"test_beam{args.beam_size}_{label}"),
                              directions, args)
  for test_task, s in tests.items():
    print(f"{name} {test_task} test_2016_flickr (beam {args.beam_size}, alpha "
          f"{args.alpha}, {chosen}): BLEU {s['bleu']}  [{s['bleu_signature']}]  "
          f"lowercased {s['bleu_lowercase']}  chrF {s['chrf']}", flush=True)
  summary = {
      "name": f"{name}_summary", "kind": "reference_summary", "run": name, "model": model,
      "directions": directions, "gin": gin_files[0], "overrides": overrides,
      "schedule": schedule_of(model_dir),
      "train_steps": max(s for s, _ in train.get("train_loss_curve", [(0, 0)])),
      "step_time_ms": train.get("step_time_ms"),
      "validation_bleu_by_step": sorted(bleu_by_step.items()), "best_step": step,
      "test_checkpoint": chosen, "selection": selection,
      "train_ce_curve": train.get("train_loss_curve"),
      "validation_ce_curve": train.get("eval_loss_curve"),
      "decode": {"method": "beam", "beam_size": args.beam_size, "alpha": args.alpha,
                 "max_decode_length": args.max_decode_length},
      "test": tests,
  }
  return r.record(summary)  # the newest record of a name wins (Runner.records)


def _decodes(r: runner_lib.Runner, s: dict, task: str) -> dict[str, Optional[list]]:
  """A summary's test and best-step validation predictions in ``OUT`` (``None``
  where absent, e.g. a row copied from an earlier results file)."""
  run_dir = os.path.join(r.out_dir, s["run"])
  label = s["test_checkpoint"].replace(" ", "")
  test = os.path.join(run_dir, f"test_beam{s['decode']['beam_size']}_{label}", "predictions",
                      f"{task}.jsonl")
  return {"test": read_predictions(test) if os.path.exists(test) else None,
          "validation": validation_predictions(run_dir, s["best_step"], task)}


def moe_vs_dense(r: runner_lib.Runner, summaries: Sequence[dict]) -> list[dict]:
  """Paired bootstraps (sacreBLEU, 1,000 resamples) of the Switch twin's
  decodes against the dense model's, for every length and schedule where
  both runs' decodes are in ``OUT``: on the test split and on the validation
  decode of each run's best step. One record per pair and direction."""
  from tasks import multi30k  # pylint: disable=g-import-not-at-top
  by_key = {}
  for s in summaries:
    by_key.setdefault((s["directions"], s["train_steps"], summary_schedule(s)), {})[
        s["model"]] = s
  out = []
  for (directions, steps, schedule), pair in sorted(by_key.items()):
    if set(pair) != {"dense", "moe"}:
      continue
    for task in pair["dense"]["test"]:
      src, tgt = task_languages(task)
      dense, moe = _decodes(r, pair["dense"], task), _decodes(r, pair["moe"], task)
      result = {}
      for split in ("test", "validation"):
        if dense[split] is None or moe[split] is None or len(dense[split]) != len(moe[split]):
          continue
        columns, _ = multi30k.read_split(split, (src, tgt))
        refs = references_for(dense[split], columns[src], columns[tgt])
        references_for(moe[split], columns[src], columns[tgt])  # same sentences, same order
        result[split] = paired_bootstrap([p["prediction"] for p in dense[split]],
                                         {"moe": [p["prediction"] for p in moe[split]]}, refs)
      if result:
        out.append({"name": f"moe_vs_dense_{task}_{steps}_{schedule}", "kind": "moe_vs_dense",
                    "directions": directions, "task": task, "train_steps": steps,
                    "schedule": schedule, **result})
  return out


# --- the results page -------------------------------------------------------------
def _curve(points, digits=1) -> str:
  return ", ".join(f"{s}: {v:.{digits}f}" for s, v in points)


def render_comparisons(comparisons: Sequence[dict]) -> list[str]:
  """The table of :func:`moe_vs_dense` records (none: no lines)."""
  if not comparisons:
    return []
  lines = ["Switch twin vs dense at equal steps: sacreBLEU paired bootstrap (1,000 "
           "resamples) of the two runs' decodes, the test decode and the greedy "
           "validation decode of each run's best step; ±: half the 95% interval (the "
           "sentence sample's noise, not a seed spread).", "",
           "| directions | steps | schedule | test BLEU dense / Switch | p | "
           "val BLEU dense / Switch | p |", "|---|---|---|---|---|---|---|"]
  def cell(res):
    if not res:
      return "– | –"
    d, m = res["baseline"], res["moe"]
    return (f"{d['bleu']:.2f} / {m['bleu']:.2f} (± {m['ci95']:.1f}) | "
            f"{m['p_value']:.3f}")
  for c in sorted(comparisons, key=lambda c: (c["task"], -c["train_steps"], c["schedule"])):
    lines.append(f"| {c['task'].replace('multi30k_translate_', '')} | {c['train_steps']} | "
                 f"{c['schedule']} | {cell(c.get('test'))} | {cell(c.get('validation'))} |")
  return [*lines, ""]


def render(summaries: Sequence[dict], comparisons: Sequence[dict] = ()) -> str:
  """The recipe's section of docs/experiments.md from the summary records
  (and the :func:`moe_vs_dense` records, a table after the first one)."""
  lines = [SECTION_BEGIN, "",
           "| model | directions | steps | schedule | step time | best step (val BLEU) | "
           "test BLEU | lowercased | chrF |", "|---|---|---|---|---|---|---|---|---|"]
  for s in summaries:
    val = dict(s["validation_bleu_by_step"])
    step_ms = s.get("step_time_ms")
    step_time = "n/a" if step_ms is None else f"{step_ms / 1000:.2f} s"
    for task, t in s["test"].items():
      lines.append(
          f"| {s['model']} | {task.replace('multi30k_translate_', '')} | "
          f"{s['train_steps']} | {summary_schedule(s)} | {step_time} | {s['best_step']} "
          f"({val[s['best_step']]:.1f}) | **{t['bleu']:.1f}** | {t['bleu_lowercase']:.1f} | "
          f"{t['chrf']:.1f} |")
  lines.append("")
  lines += render_comparisons(comparisons)
  for s in summaries:
    t0 = next(iter(s["test"].values()))
    step_s = (s.get("step_time_ms") or 0) / 1000
    lines += [
        f"**{s['model']} ({s['directions']}, {s['train_steps']} steps, "
        f"{summary_schedule(s)})**: `{s['gin']}`"
        + (f" + `{' '.join(o for o in s['overrides'] if 'vocab_size' not in o)}`"
           if s["overrides"] else ""),
        f"- validation BLEU (greedy) by step: {_curve(s['validation_bleu_by_step'])}"
        + (f" (step x {step_s:.2f} s = minutes: "
           f"{', '.join(f'{st * step_s / 60:.0f}' for st, _ in s['validation_bleu_by_step'])})"
           if step_s else ""),
        f"- train CE (with dropout) by step: {_curve(s['train_ce_curve'][4::5] or s['train_ce_curve'], 2)}",
        f"- validation CE by step: {_curve(s['validation_ce_curve'], 2)}",
        *([f"- test checkpoint: {s['test_checkpoint']} (greedy validation BLEU "
           f"by moe-eval: {', '.join(f'{k} {v:.2f}' for k, v in s['selection'].items())})"]
          if s.get("selection") else []),
        f"- test decode: beam {s['decode']['beam_size']}, alpha {s['decode']['alpha']}; "
        f"sacreBLEU signature `{t0['bleu_signature']}`", ""]
  lines.append(SECTION_END)
  return "\n".join(lines)


def write_section(path: str, section: str, begin: str = SECTION_BEGIN,
                  end: str = SECTION_END) -> None:
  """Replaces the section of ``path`` between ``begin`` and ``end`` (the
  recipe's by default; appends it when missing)."""
  text = open(path).read() if os.path.exists(path) else ""
  if begin in text and end in text:
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    text = head + section + tail
  else:
    text = text.rstrip("\n") + ("\n\n" if text else "") + section + "\n"
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def publish(r: runner_lib.Runner, args, section: str, begin: str = SECTION_BEGIN,
            end: str = SECTION_END, keep: Sequence[dict] = ()) -> None:
  """``--markdown``: rewrites the page's section; ``--results``: writes the
  records there (``keep``: older rows to put first, e.g. other lengths' runs)."""
  if args.markdown:
    write_section(args.markdown, section, begin, end)
    print(f"Wrote the section {begin!r} of {args.markdown}", flush=True)
  if args.results:
    with open(r.results_path) as f:
      new = f.read()
    tmp = args.results + ".tmp"
    with open(tmp, "w") as f:
      f.write("".join(json.dumps(row, sort_keys=True) + "\n" for row in keep) + new)
    os.replace(tmp, args.results)
    print(f"Wrote {r.results_path}'s records to {args.results}", flush=True)


def schedule_of(model_dir: str) -> Optional[str]:
  """``make_schedule.name`` in the operative config ``model_dir/config.gin``
  (``None`` when the file or the binding is absent)."""
  path = os.path.join(model_dir, "config.gin")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    match = re.search(r"^make_schedule\.name\s*=\s*['\"](\w+)['\"]", f.read(), re.M)
  return match.group(1) if match else None


def summary_schedule(summary: dict) -> str:
  """The learning-rate schedule a summary's run trained with: its ``schedule``
  field, else a ``make_schedule.name`` override, else ``cosine`` (rows written
  before the field existed trained with the gin's schedule, then cosine)."""
  if summary.get("schedule"):
    return summary["schedule"]
  for o in summary.get("overrides") or ():
    match = re.fullmatch(r"make_schedule\.name\s*=\s*['\"](\w+)['\"]", o.strip())
    if match:
      return match.group(1)
  return "cosine"


def _length_key(summary: dict) -> tuple:
  return (summary["model"], summary["directions"], summary["train_steps"],
          summary_schedule(summary))


def older_runs(results_path: str, summaries: Sequence[dict],
               comparisons: Sequence[dict] = ()) -> list[dict]:
  """The summary rows of an earlier ``--results`` file for recipe runs of
  another length or schedule (model, directions, steps, learning-rate
  schedule) than ``summaries`` (the newest
  row of each): they stay in the table and in the file (a summary holds the
  run's curves, overrides and test scores); so do its :func:`moe_vs_dense`
  rows not recomputed in ``comparisons``."""
  if not results_path or not os.path.exists(results_path):
    return []
  with open(results_path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  done = {_length_key(s) for s in summaries}
  done_names = {c["name"] for c in comparisons}
  newest = {}
  for row in rows:
    if row.get("kind") == "reference_summary" and _length_key(row) not in done:
      newest[_length_key(row)] = row
    elif row.get("kind") == "moe_vs_dense" and row["name"] not in done_names:
      newest[row["name"]] = row
  return list(newest.values())


def add_recipe_flags(p: argparse.ArgumentParser, steps: int = 0, eval_period: int = 0) -> None:
  """The flags of one recipe run (shared with ``multi30k_methods``)."""
  p.add_argument("--out", default="/tmp/moe_jax_multi30k_reference")
  p.add_argument("--steps", type=int, default=steps, help="TRAIN_STEPS (0: the gin's)")
  p.add_argument("--eval_period", type=int, default=eval_period,
                 help="EVAL_PERIOD = CHECKPOINT_PERIOD (0: the gin's)")
  p.add_argument("--eval_steps", type=int, default=0,
                 help="validation batches per decode (default: the whole split)")
  p.add_argument("--average_last", type=int, default=0,
                 help="also try the average of the last N checkpoints (moe-average) "
                      "and test-decode whichever has the better validation BLEU")
  p.add_argument("--beam_size", type=int, default=4)
  p.add_argument("--alpha", type=float, default=0.6)
  p.add_argument("--max_decode_length", type=int, default=64)
  p.add_argument("--eval_batch_size", type=int, default=50)
  p.add_argument("--max_test_examples", type=int, default=0,
                 help="decode only the first N test sentences (smoke tests)")
  p.add_argument("--vocab_pieces", type=int, default=0)
  p.add_argument("--vocab_max_examples", type=int, default=0)
  p.add_argument("--gin", action="append", help="extra gin binding (repeatable)")
  p.add_argument("--markdown", default="", help="page whose section to rewrite")
  p.add_argument("--results", default="", help="copy OUT/results.jsonl here")
  p.add_argument("--dry_run", action="store_true")


def make_runner(args) -> runner_lib.Runner:
  data_dir = runner_lib.default_data_dir()
  os.environ["MOE_JAX_DATA_DIR"] = data_dir  # the test references are read here too
  return runner_lib.Runner(args.out, env={"MOE_JAX_DATA_DIR": data_dir}, dry_run=args.dry_run)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  add_recipe_flags(p)
  p.add_argument("--model", choices=("dense", "moe", "both"), default="dense")
  p.add_argument("--directions", choices=tuple(DIRECTIONS), default="en_de")
  p.add_argument("--report_only", action="store_true",
                 help="train nothing: rewrite --markdown/--results from OUT's records "
                      "(e.g. runs trained in two OUTs at once, one core each)")
  args = p.parse_args(argv)

  r = make_runner(args)
  models = ("dense", "moe") if args.model == "both" else (args.model,)
  for model in models if not args.report_only else ():
    run_model(r, model, args.directions, args)
  if args.dry_run:
    return 0
  summaries = [s for s in r.records().values() if s.get("kind") == "reference_summary"
               and s["name"] == f"{s['model']}_{s['directions']}_summary"]  # not a method's
  comparisons = [r.record(c) for c in moe_vs_dense(r, summaries)]
  keep = older_runs(args.results, summaries, comparisons)
  summaries += [k for k in keep if k["kind"] == "reference_summary"]
  comparisons += [k for k in keep if k["kind"] == "moe_vs_dense"]
  summaries.sort(key=lambda s: (s["directions"], s["model"], -s["train_steps"]))
  publish(r, args, render(summaries, comparisons), keep=keep)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
