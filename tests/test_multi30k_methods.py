"""The methods driver on the Multi30k reference recipe (moe_jax/experiments/multi30k_methods.py).

The trainings are the reference recipe's (tested end to end in
test_multi30k_reference.py); these tests check what this driver adds: the
command lines of each suite, the paired bootstrap against BLEU worked by
hand, and the results table from records with hand-chosen curves.
"""

import contextlib
import io

import pytest

import bleu_by_hand

from moe_jax.experiments import multi30k_methods as mm
from moe_jax.experiments import multi30k_reference as ref


def test_dry_run_lists_every_suite_with_the_short_recipe(tmp_path, shared_data_dir, monkeypatch):
  monkeypatch.setenv("MOE_JAX_DATA_DIR", shared_data_dir)
  out = tmp_path / "out"
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    assert mm.main([f"--out={out}", "--suite=all", "--dry_run"]) == 0
  lines = [l for l in buf.getvalue().splitlines() if l.startswith("+ ")]
  trains = {l.split("--gin.MODEL_DIR=")[1].split()[0].strip("'").rsplit("/", 1)[1]: l
            for l in lines if "moe_jax.train" in l}
  assert set(trains) == {"dense_en_de", "moe_en_de", "eom", "fom", "gating_dropout", "cmr",
                         "upcycled_en_de"}
  for line in trains.values():
    assert "--gin.TRAIN_STEPS=1000" in line and "--gin.EVAL_PERIOD=250" in line
    # the short recipe's cosine, whatever the reference gin's default schedule
    assert "--gin.make_schedule.name='cosine' --gin.make_schedule.total_steps=None" in line
  assert "runs/multi30k_reference.gin" in trains["dense_en_de"]
  assert "--gin.MoeConfig.expert_output_masking_rate=0.2" in trains["eom"]
  assert "ConditionalRoutingConfig" in trains["cmr"]
  upcycle = next(l for l in lines if "moe_jax.upcycle" in l)
  assert f"--dense_checkpoint={out}/dense_en_de/500" in upcycle
  assert "--optimizer_state=carry" in upcycle and "--verify" in upcycle
  assert "upcycled_model.gin" in trains["upcycled_en_de"]
  prunes = [l for l in lines if "moe_jax.prune" in l]
  assert [p.split("--keep=")[1].split()[0] for p in prunes] == ["0.5", "0.25"]
  assert all("--granularity=global" in p for p in prunes)
  stats = next(l for l in lines if "moe_jax.eval" in l and "COLLECT_ROUTING_STATS=True" in l)
  assert "EVAL_SPLIT='validation'" in stats


def test_paired_bootstrap_scores_and_significance():
  refs = [f"a man number {i} rides a red bike down the long road" for i in range(60)]
  base = [f"a man number {i} rides a bike down the road" for i in range(60)]
  one_better = [refs[0]] + base[1:]   # one sentence of 60 fixed: within the noise
  half_better = refs[:30] + base[30:]  # half of them: beyond it
  res = ref.paired_bootstrap(base, {"one": one_better, "half": half_better}, refs, samples=200)
  assert res["baseline"]["bleu"] == pytest.approx(bleu_by_hand.corpus_bleu(base, refs), abs=0.01)
  assert res["half"]["bleu"] == pytest.approx(bleu_by_hand.corpus_bleu(half_better, refs), abs=0.01)
  assert res["one"]["p_value"] > 0.05
  assert res["half"]["p_value"] < 0.05
  assert res["baseline"]["p_value"] is None and res["half"]["ci95"] > res["one"]["ci95"] > 0


def _summary(run, val_bleu, val_ce, train_ce, test_bleu=None):
  return {"name": f"{run}_summary", "kind": "reference_summary", "run": run,
          "validation_bleu_by_step": list(val_bleu.items()),
          "validation_ce_curve": list(val_ce.items()), "train_ce_curve": list(train_ce.items()),
          "test": {"multi30k_translate_en_de": {"bleu": test_bleu, "chrf": 50.0}}
          if test_bleu is not None else {}}


def test_render_rows_gap_and_pruning_table():
  records = {
      "moe_en_de_summary": _summary("moe_en_de", {500: 20.0, 1000: 25.0},
                                    {500: 2.8, 1000: 2.4}, {900: 2.3, 1000: 2.1}, 26.4),
      "eom_summary": _summary("eom", {500: 19.0, 1000: 25.5}, {500: 2.9, 1000: 2.3},
                              {1000: 2.25}),
      "pruning_summary": {"name": "pruning_summary", "kind": "pruning_summary", "rows": [
          {"keep": 1.0, "test": {"t": {"bleu": 30.9, "chrf": 54.0}}},
          {"keep": 0.5, "params_before": 5_120_000, "params_after": 3_000_000, "experts_kept": {"a": 4, "b": 4},
           "test": {"t": {"bleu": 30.1, "chrf": 53.5}}}]},
  }
  noise = {"moe_en_de": {"bleu": 25.3, "ci95": 1.4, "p_value": None},
           "eom": {"bleu": 25.9, "ci95": 1.4, "p_value": 0.2}}
  text = mm.render(records, noise, steps=1000, period=500,
                   noise_vs_dense={"eom": {"bleu": 25.9, "ci95": 1.4, "p_value": 0.01}})
  rows = {l.split(" | ")[0].strip("| "): l for l in text.splitlines() if l.startswith("| ")}
  # val BLEU 500/1000, val CE 500/1000, train CE at 1000, gap 2.4 - 2.1 = 0.30
  assert rows["moe_en_de"] == ("| moe_en_de | 20.0 / 25.0 | 2.80 / 2.40 | 2.10 | 0.30 | "
                               "25.3 ± 1.4 | – | – | 26.4 |")
  assert "| 0.05 | 25.9 ± 1.4 | 0.200 | 0.010 | – |" in rows["eom"]
  assert text.index("| moe_en_de |") < text.index("| eom |")  # the method table's order
  assert "| 50% | 3.00 M | 4 | 30.1 | 53.5 |" in text and "| 100% | 5.12 M | all | 30.9 |" in text
  assert text.startswith(mm.SECTION_BEGIN) and text.endswith(mm.SECTION_END)


def test_six_direction_pruning_prunes_per_language_and_decodes_each_pair(
    tmp_path, shared_data_dir, monkeypatch):
  monkeypatch.setenv("MOE_JAX_DATA_DIR", shared_data_dir)
  out, model = tmp_path / "out", tmp_path / "ref" / "moe_six"
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    assert mm.main([f"--out={out}", "--suite=pruning", "--directions=six",
                    f"--prune_model={model}", "--dry_run"]) == 0
  lines = [l for l in buf.getvalue().splitlines() if l.startswith("+ ")]
  assert not any("moe_jax.train " in l for l in lines)  # pruning trains nothing
  prunes = [l for l in lines if "moe_jax.prune" in l]
  assert [(p.split("--keep=")[1].split()[0], p.split("--granularity=")[1].split()[0])
          for p in prunes] == [("0.5", "global"), ("0.5", "language"),
                               ("0.25", "global"), ("0.25", "language")]
  assert all("--all_pairs" in p for p in prunes if "language" in p)
  assert all("multi30k_translate_mix" in p for p in prunes)
  tests = [l for l in lines if "moe_jax.eval" in l and "EVAL_SPLIT='test'" in l]
  # the unpruned model and the two global ones decode the mixture (all six test
  # sets); each per-language model decodes its own pair's test set
  language = [l for l in tests if "prune_language_" in l]
  assert len(tests) == 3 + len(language) and len(language) == 12
  pair_tasks = {l.split("prune_language_0.5/")[1].split("/")[0]: l.rsplit(
      "--gin.MIXTURE_OR_TASK_NAME=", 1)[1].split()[0] for l in language if "_0.5/" in l}
  assert pair_tasks == {f"{s}_{t}": f"'multi30k_translate_{s}_{t}'"
                        for x in ("de", "fr", "cs") for s, t in (("en", x), (x, "en"))}
  with pytest.raises(SystemExit):  # the other suites are en->de only
    mm.main([f"--out={out}", "--suite=regularization", "--directions=six", "--dry_run"])


def test_render_six_direction_pruning_table_has_a_column_per_pair_and_the_mean():
  def bleus(*values):
    tasks = ["multi30k_translate_en_de", "multi30k_translate_de_en"]
    return {t: {"bleu": b, "chrf": 50.0} for t, b in zip(tasks, values)}
  records = {"pruning_summary_six": {
      "name": "pruning_summary_six", "kind": "pruning_summary", "directions": "six", "rows": [
          {"keep": 1.0, "granularity": "global", "test": bleus(30.0, 34.0)},
          {"keep": 0.5, "granularity": "global", "params_before": 5_000_000,
           "params_after": 3_500_000, "experts_kept": {"a": 4}, "test": bleus(27.0, 30.0)},
          {"keep": 0.5, "granularity": "language", "params_before": 5_000_000,
           "params_after": 3_500_000, "experts_kept": {"a": 4}, "test": bleus(29.5, 33.0)}]}}
  text = mm.render(records, None, steps=1000, period=500)
  assert "| experts kept | granularity | parameters | experts per MoE layer | en->de | de->en | mean |" in text
  assert "| 100% | global | 5.00 M | all | 30.0 | 34.0 | 32.0 |" in text
  assert "| 50% | global | 3.50 M | 4 | 27.0 | 30.0 | 28.5 |" in text
  assert "| 50% | language | 3.50 M | 4 | 29.5 | 33.0 | 31.2 |" in text


def test_report_without_decodes_keeps_the_recorded_bootstrap(tmp_path):
  """An OUT seeded with docs/multi30k_methods.jsonl has the records but not the
  baselines' decodes: the table keeps the recorded p-values, and a run trained
  since (no bootstrap entry) shows dashes."""
  import json
  out = tmp_path / "out"
  out.mkdir()
  records = [_summary("moe_en_de", {500: 20.0, 1000: 25.0}, {500: 2.8, 1000: 2.4}, {1000: 2.1}),
             _summary("eom", {500: 19.0, 1000: 25.5}, {500: 2.9, 1000: 2.3}, {1000: 2.25}),
             {"name": "validation_bootstrap", "kind": "bootstrap", "step": 1000,
              "results": {"moe_en_de": {"bleu": 25.3, "ci95": 1.4, "p_value": None},
                          "eom": {"bleu": 25.9, "ci95": 1.4, "p_value": 0.2}},
              "results_vs_dense": {"eom": {"bleu": 25.9, "ci95": 1.4, "p_value": 0.01}}},
             _summary("fom", {500: 19.5, 1000: 24.0}, {500: 2.9, 1000: 2.5}, {1000: 2.3})]
  (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  page = tmp_path / "page.md"
  page.write_text(f"intro\n\n{mm.SECTION_BEGIN}\nold\n{mm.SECTION_END}\n\nrest\n")
  with contextlib.redirect_stdout(io.StringIO()):
    assert mm.main([f"--out={out}", "--suite=report", "--steps=1000", "--eval_period=500",
                    f"--markdown={page}"]) == 0
  text = page.read_text()
  rows = {l.split(" | ")[0].strip("| "): l for l in text.splitlines() if l.startswith("| ")}
  assert "| 25.9 ± 1.4 | 0.200 | 0.010 | – |" in rows["eom"]
  assert rows["fom"].endswith("| 0.20 | – | – | – | – |")  # 2.5 - 2.3; no bootstrap
  assert text.startswith("intro") and text.rstrip().endswith("rest") and "old" not in text
