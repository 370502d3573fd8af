"""The Multi30k reference recipe (moe_jax/experiments/multi30k_reference.py).

CI cannot run the 90-minute trainings; these tests check the pieces: the
checkpoint choice, the reference alignment, sacreBLEU against a BLEU worked
out independently, the results page, and the whole command with a few steps
on a slice of the data (both gin files parse, init, train, beam-decode and
write their records).
"""

import json
import os
import subprocess
import sys

import pytest

import bleu_by_hand

from moe_jax.experiments import multi30k_reference as ref

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_vocab_size_pads_pieces_and_extra_ids_to_128():
  assert ref.vocab_size_for(6000) == 6144
  assert ref.vocab_size_for(8000) == 8192
  assert ref.vocab_size_for(500) == 640


def _write_decode(model_dir, step, bleu):
  d = model_dir / "eval_decode" / str(step)
  d.mkdir(parents=True)
  (d / "metrics.json").write_text(json.dumps(
      {"multi30k_translate_en_de": {"bleu": bleu, "chrf": 50.0}}))


def test_best_step_is_the_saved_one_with_the_best_validation_bleu(tmp_path):
  for step, bleu in ((500, 30.0), (1000, 34.5), (1500, 34.0), (2000, 33.0)):
    _write_decode(tmp_path, step, bleu)
  for step in (1500, 2000):
    (tmp_path / str(step)).mkdir()
  (tmp_path / "1000.orbax-checkpoint-tmp-1").mkdir()  # half written: not a step
  by_step = ref.validation_bleu(str(tmp_path))
  assert by_step == {500: 30.0, 1000: 34.5, 1500: 34.0, 2000: 33.0}
  assert ref.saved_steps(str(tmp_path)) == [1500, 2000]
  assert ref.best_step(by_step, ref.saved_steps(str(tmp_path))) == 1500
  assert ref.best_step({1: 5.0, 2: 5.0}, [1, 2]) == 2  # ties: the later step
  with pytest.raises(RuntimeError, match="EVAL_PERIOD equal to CHECKPOINT_PERIOD"):
    ref.best_step({500: 1.0}, [400])


def test_references_must_follow_the_source_file_order():
  sources = ["A dog runs.", "Two men talk."]
  refs = ["Ein Hund rennt.", "Zwei Männer reden."]
  records = [{"input": "translate English to German: A dog runs.", "prediction": "x"},
             {"input": "translate English to German: Two men talk.", "prediction": "y"}]
  assert ref.references_for(records, sources, refs) == refs
  with pytest.raises(ValueError, match="not in file order"):
    ref.references_for(records[::-1], sources, refs)


def test_sacrebleu_scores_match_a_hand_computed_bleu_and_carry_signatures():
  # Lowercase words without punctuation: 13a tokenization is a whitespace split.
  hyps = ["the cat sat on the mat today", "a man is riding a red bike down the road"]
  refs = ["the cat sat on a mat today", "a man is riding a bike down the road"]
  scores = ref.sacrebleu_scores(hyps, refs)
  assert scores["bleu"] == pytest.approx(bleu_by_hand.corpus_bleu(hyps, refs), abs=0.01)
  assert scores["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp")
  assert "case:lc" in scores["bleu_lowercase_signature"]
  upper = ref.sacrebleu_scores([h.upper() for h in hyps], refs)
  assert upper["bleu"] < 1.0  # cased: nothing matches
  assert upper["bleu_lowercase"] == pytest.approx(scores["bleu"], abs=0.01)


def test_write_section_replaces_only_the_recipe_section(tmp_path):
  page = tmp_path / "experiments.md"
  page.write_text("# Experiments\n\nintro\n")
  ref.write_section(str(page), f"{ref.SECTION_BEGIN}\nold\n{ref.SECTION_END}")
  page.write_text(page.read_text() + "\n## Later section\n")
  ref.write_section(str(page), f"{ref.SECTION_BEGIN}\nnew\n{ref.SECTION_END}")
  text = page.read_text()
  assert text.startswith("# Experiments\n\nintro\n")
  assert "new" in text and "old" not in text and text.endswith("## Later section\n")
  assert text.count(ref.SECTION_BEGIN) == 1


def test_runs_of_other_lengths_stay_in_the_results(tmp_path):
  def summary(model, steps, bleu):
    return {"name": f"{model}_en_de_summary", "kind": "reference_summary", "model": model,
            "directions": "en_de", "train_steps": steps, "bleu": bleu}
  old = tmp_path / "old.jsonl"
  old.write_text("".join(json.dumps(r) + "\n" for r in (
      {"name": "dense_en_de", "kind": "train"}, summary("dense", 2000, 1.0),
      summary("moe", 2000, 2.0), summary("moe", 2000, 2.5))))  # the newest row wins
  kept = ref.older_runs(str(old), [summary("dense", 3000, 3.0)])
  assert [(k["model"], k["train_steps"], k["bleu"]) for k in kept] == [
      ("dense", 2000, 1.0), ("moe", 2000, 2.5)]
  kept = ref.older_runs(str(old), [summary("dense", 2000, 3.0)])  # a rerun replaces
  assert [(k["model"], k["bleu"]) for k in kept] == [("moe", 2.5)]
  assert ref.older_runs(str(tmp_path / "missing.jsonl"), []) == []


def test_a_run_of_another_schedule_keeps_the_row_of_the_same_length(tmp_path):
  """The schedule is part of a row's key: from the ``schedule`` field, else a
  ``make_schedule.name`` override, else cosine (rows older than the field)."""
  cosine = {"name": "dense_en_de_summary", "kind": "reference_summary", "model": "dense",
            "directions": "en_de", "train_steps": 3000, "overrides": ["TRAIN_STEPS=3000"]}
  wsd_by_override = dict(cosine, overrides=["TRAIN_STEPS=3000", "make_schedule.name='wsd'"])
  wsd_by_field = dict(cosine, schedule="wsd")
  assert [ref.summary_schedule(s) for s in (cosine, wsd_by_override, wsd_by_field)] == [
      "cosine", "wsd", "wsd"]
  old = tmp_path / "old.jsonl"
  old.write_text(json.dumps(cosine) + "\n")
  assert ref.older_runs(str(old), [wsd_by_field]) == [cosine]
  assert ref.older_runs(str(old), [dict(cosine, schedule="cosine")]) == []


def test_schedule_of_reads_the_operative_config(tmp_path):
  (tmp_path / "config.gin").write_text(
      "# Parameters for make_schedule:\nmake_schedule.base_learning_rate = 0.01\n"
      "make_schedule.name = 'wsd'\nmake_schedule.total_steps = %TRAIN_STEPS\n")
  assert ref.schedule_of(str(tmp_path)) == "wsd"
  assert ref.schedule_of(str(tmp_path / "missing")) is None


@pytest.mark.slow  # end-to-end; pytest -m slow
def test_the_end_to_end_command_on_a_slice(tmp_path, shared_data_dir):
  """The MoE twin through vocabulary, training, selection, beam decode and
  sacreBLEU: 4 steps, 64 validation and 8 test sentences, a 500-piece vocabulary.
  (The dense gin's init and training step: test_gin_configs; both gins' command
  lines: the dry runs here and in test_multi30k_methods.)"""
  out, page, results = tmp_path / "out", tmp_path / "experiments.md", tmp_path / "res.jsonl"
  page.write_text("# Experiments\n")
  env = dict(os.environ, MOE_JAX_DATA_DIR=shared_data_dir, JAX_PLATFORMS="cpu",
             XLA_FLAGS="", MOE_JAX_CACHE_DIR=str(tmp_path / "cache"))
  cmd = [sys.executable, "-m", "moe_jax.experiments.multi30k_reference",
         f"--out={out}", "--model=moe", "--steps=4", "--eval_period=2", "--eval_steps=1",
         "--max_test_examples=8", "--beam_size=2", "--max_decode_length=16",
         "--average_last=2", "--eval_batch_size=16",
         "--vocab_pieces=500", "--vocab_max_examples=2000", "--gin=LOG_PERIOD=2",
         "--gin=BATCH_SIZE=16", f"--markdown={page}", f"--results={results}"]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  rows = [json.loads(line) for line in results.read_text().splitlines()]
  summaries = {r["model"]: r for r in rows if r["kind"] == "reference_summary"}
  assert set(summaries) == {"moe"}
  for model, s in summaries.items():
    assert s["best_step"] in (2, 4) and [st for st, _ in s["validation_bleu_by_step"]] == [2, 4]
    assert s["decode"] == {"method": "beam", "beam_size": 2, "alpha": 0.6,
                           "max_decode_length": 16}
    test = s["test"]["multi30k_translate_en_de"]
    assert test["examples"] == 8
    assert test["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
    # The best step and the average of steps 2 and 4 (moe-average) were both
    # decoded on 16 validation sentences; the better one was test-decoded.
    run_dir = out / f"{model}_en_de"
    assert json.loads((run_dir / "average_last2" / "averaging.json").read_text())[
        "steps"] == [2, 4]
    labels = {f"step {s['best_step']}": f"step{s['best_step']}",
              "average of steps 2-4": "averageofsteps2-4"}
    assert set(s["selection"]) == set(labels)
    for label, bleu in s["selection"].items():
      metrics = json.loads((run_dir / f"validation_{label.replace(' ', '_')}"
                            / "metrics.json").read_text())
      assert metrics["multi30k_translate_en_de"]["bleu"] == pytest.approx(bleu)
    assert s["test_checkpoint"] == max(s["selection"], key=lambda k: (
        s["selection"][k], k.startswith("average")))
    # The decode really was a beam search, from the chosen checkpoint.
    eval_dir = run_dir / f"test_beam2_{labels[s['test_checkpoint']]}"
    preds = [json.loads(x) for x in
             (eval_dir / "predictions" / "multi30k_translate_en_de.jsonl").read_text().splitlines()]
    assert len(preds) == 8
    assert s["test"]["multi30k_translate_en_de"]["bleu"] == pytest.approx(
        _sacrebleu([p["prediction"] for p in preds], shared_data_dir), abs=0.01)
    log = (out / f"{model}_en_de_test.log").read_text()
    chosen = (run_dir / "average_last2" / "checkpoint" if s["test_checkpoint"].startswith(
        "average") else run_dir / str(s["best_step"]))
    assert f"moe-eval: {chosen} on the test split" in log
    assert "beam search (beam 2, alpha 0.6), max length 16" in log
  text = page.read_text()
  assert ref.SECTION_BEGIN in text and "| moe | en_de | 4 |" in text and "tok:13a" in text


def _sacrebleu(predictions, data_dir):
  import gzip  # pylint: disable=g-import-not-at-top
  import sacrebleu  # pylint: disable=g-import-not-at-top
  with gzip.open(os.path.join(data_dir, "test_2016_flickr.de.gz"), "rt") as f:
    refs = [line.rstrip("\n") for line in f][:len(predictions)]
  return sacrebleu.corpus_bleu(predictions, [refs]).score


def test_the_six_direction_variant_trains_on_the_mixture_with_a_larger_vocabulary(
    tmp_path, capsys):
  assert ref.main([f"--out={tmp_path}", "--directions=six", "--model=moe",
                   "--dry_run"]) == 0
  printed = capsys.readouterr().out
  assert "--task=multi30k_translate_mix" in printed
  assert "--vocab_size=8000" in printed
  train_line = next(line for line in printed.splitlines() if "moe_jax.train" in line)
  assert "--gin_file=runs/multi30k_reference_moe.gin" in train_line
  assert "--gin.T5Config.vocab_size=8192" in train_line
  assert "--gin.MIXTURE_OR_TASK_NAME='multi30k_translate_mix'" in train_line
  assert ref.DIRECTIONS["six"][2] == tuple(
      f"multi30k_translate_{s}_{t}" for s, t in (("en", "de"), ("de", "en"), ("en", "fr"),
                                                  ("fr", "en"), ("en", "cs"), ("cs", "en")))


def test_moe_vs_dense_bootstraps_the_two_runs_test_decodes(tmp_path, monkeypatch):
  """Both runs of one length and schedule decoded in OUT: a paired bootstrap
  whose BLEUs match BLEU worked by hand (no punctuation, so sacreBLEU's 13a
  tokens are the whitespace tokens); a length with one model only, or a
  missing validation decode, gives nothing."""
  from tasks import multi30k
  import types
  sources = [f"a man number {i} rides a red bike" for i in range(60)]
  refs = [f"ein mann nummer {i} faehrt ein rotes rad die lange strasse hinab" for i in range(60)]
  base = [f"ein mann nummer {i} faehrt ein rad die strasse" for i in range(60)]
  better = refs[:30] + base[30:]
  monkeypatch.setattr(multi30k, "read_split",
                      lambda split, langs: ({"en": sources, "de": refs}, None))
  task = "multi30k_translate_en_de"
  for run, preds in (("dense_en_de", base), ("moe_en_de", better)):
    d = tmp_path / run / "test_beam4_step3000" / "predictions"
    d.mkdir(parents=True)
    (d / f"{task}.jsonl").write_text("".join(
        json.dumps({"input": f"translate English to German: {s}", "prediction": p}) + "\n"
        for s, p in zip(sources, preds)))
  def summary(model, steps):
    return {"run": f"{model}_en_de", "model": model, "directions": "en_de",
            "train_steps": steps, "schedule": "wsd", "test_checkpoint": "step 3000",
            "best_step": 3000, "decode": {"beam_size": 4}, "test": {task: {}}}
  out = ref.moe_vs_dense(types.SimpleNamespace(out_dir=str(tmp_path)),
                         [summary("dense", 3000), summary("moe", 3000), summary("moe", 5000)])
  assert [c["name"] for c in out] == [f"moe_vs_dense_{task}_3000_wsd"]
  test = out[0]["test"]
  assert test["baseline"]["bleu"] == pytest.approx(bleu_by_hand.corpus_bleu(base, refs), abs=0.01)
  assert test["moe"]["bleu"] == pytest.approx(bleu_by_hand.corpus_bleu(better, refs), abs=0.01)
  assert test["moe"]["p_value"] < 0.05 and "validation" not in out[0]
  text = "\n".join(ref.render_comparisons(out))
  assert (f"| en_de | 3000 | wsd | {test['baseline']['bleu']:.2f} / {test['moe']['bleu']:.2f} "
          f"(± {test['moe']['ci95']:.1f}) | {test['moe']['p_value']:.3f} | – | – |") in text
  # an earlier results file's comparison stays unless it is recomputed
  old = tmp_path / "old.jsonl"
  older = {"name": f"moe_vs_dense_{task}_5000_cosine", "kind": "moe_vs_dense"}
  old.write_text(json.dumps(older) + "\n" + json.dumps(out[0]) + "\n")
  assert ref.older_runs(str(old), [], out) == [older]
