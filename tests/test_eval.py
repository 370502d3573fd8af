"""moe-eval: metrics equal sacreBLEU on the same strings; the binary's outputs."""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
import sacrebleu

from moe_jax import eval as eval_bin
from moe_jax import gin_utils
from moe_jax import models
from moe_jax.evaluation import evaluator, gin_setup, inference
from moe_jax.evaluation import routing_stats as rs
from moe_jax.checkpoints.params_only import save_params_checkpoint
import tasks  # noqa: F401  (registers seqio tasks before any gin config is locked)

TASK = "synthetic_translate_xa_xb"
PREDICTIONS = ["the cat sat on the mat", "a dog barks at night", "hello there world",
               "completely wrong output"]
REFERENCES = ["the cat sat on a mat", "a dog barks at night", "hello world",
              "the right answer here"]


def test_task_metrics_equal_sacrebleu_directly():
  from moe_jax.data import pipeline
  task = pipeline.ensure_registered(TASK)
  got = evaluator.task_metrics(task, REFERENCES, PREDICTIONS)
  bleu = sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES], tokenize="intl").score
  chrf = sacrebleu.corpus_chrf(PREDICTIONS, [REFERENCES]).score
  assert bleu > 0
  assert got["bleu"] == pytest.approx(bleu, abs=1e-9)
  assert got["chrf"] == pytest.approx(chrf, abs=1e-9)
  assert got["sequence_accuracy"] == pytest.approx(25.0)  # 1 exact match of 4


def test_decode_spec_rejects_unknown_method():
  with pytest.raises(ValueError, match="greedy"):
    inference.DecodeSpec(method="nucleus")


def test_trim_after_eos_and_teacher_forced_replay():
  out = np.array([[5, 6, 1, 0], [7, 1, 0, 0], [8, 9, 4, 3]])
  assert inference.trim_after_eos(out) == [[5, 6], [7], [8, 9, 4, 3]]
  batch = inference.teacher_forced_batch(np.ones((3, 2)), out)
  np.testing.assert_array_equal(batch["decoder_input_tokens"][0], [0, 5, 6, 1])


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory):
  gin_setup.parse(["models/tiny_switch.gin"], [])
  model = models.build_model(gin_setup.model_config())
  ones = np.ones((8, 8), np.int32)
  from moe_jax import partitioning
  single = partitioning.make_mesh({"data": 1}, devices=jax.devices()[:1])
  with partitioning.with_sharding(single,
                                  partitioning.standard_logical_rules()):
    params = jax.jit(lambda: model.init(jax.random.PRNGKey(0), ones, ones, ones,
                                        enable_dropout=False))()
  path = str(tmp_path_factory.mktemp("ckpt") / "params")
  return save_params_checkpoint(path, jax.device_get(nn.unbox(params["params"])))


def test_moe_eval_writes_metrics_predictions_and_routing_stats(random_checkpoint, tmp_path):
  out_dir = str(tmp_path / "eval")
  rc = eval_bin.main([
      "--gin_file=models/tiny_switch.gin", "--gin_file=runs/eval.gin",
      f"--gin.CHECKPOINT_PATH={random_checkpoint}", f"--gin.MIXTURE_OR_TASK_NAME={TASK}",
      "--gin.TASK_FEATURE_LENGTHS={'inputs': 24, 'targets': 24}",
      "--gin.EVAL_BATCH_SIZE=8", "--gin.EVAL_MAX_EXAMPLES=8", "--gin.MAX_DECODE_LENGTH=6",
      f"--gin.EVAL_OUTPUT_DIR={out_dir}"])
  assert rc == 0
  with open(os.path.join(out_dir, "metrics.json")) as f:
    metrics = json.load(f)
  assert set(metrics) == {TASK}
  with open(os.path.join(out_dir, "predictions", f"{TASK}.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert len(records) == 8
  preds = [r["prediction"] for r in records]
  refs = [r["target"] for r in records]
  assert metrics[TASK]["bleu"] == pytest.approx(
      sacrebleu.corpus_bleu(preds, [refs], tokenize="intl").score, abs=1e-9)
  assert metrics[TASK]["chrf"] == pytest.approx(
      sacrebleu.corpus_chrf(preds, [refs]).score, abs=1e-9)
  stats = rs.RoutingStats.load(os.path.join(out_dir, "routing_stats.json"))
  enc = stats.pooled("encoder/layers/layers_1/moe")
  assert enc.num_experts == 8 and enc.top1_count.sum() == enc.num_tokens > 0
  dec = stats.pooled("decoder/layers/layers_1/moe")
  assert dec.num_tokens <= 8 * 6
  assert stats.groups[TASK].source_language == "xa"
  assert len(os.listdir(os.path.join(out_dir, "heatmaps"))) == 2
  assert "## Expert usage" in open(os.path.join(out_dir, "report.md")).read()
  assert any(n.startswith("events.out.tfevents") for n in os.listdir(out_dir))


def test_moe_eval_says_what_is_missing(capsys):
  rc = eval_bin.main(["--gin_file=models/tiny_switch.gin", "--gin_file=runs/eval.gin",
                      f"--gin.MIXTURE_OR_TASK_NAME={TASK}"])
  assert rc == 2
  assert "CHECKPOINT_PATH" in capsys.readouterr().err


@pytest.fixture(scope="module")
def run_dir(random_checkpoint, tmp_path_factory):
  """A moe-train-like run directory: ``config.gin`` (gin's operative config of
  the run, as moe-train writes it) and the checkpoint as step 7."""
  import shutil  # pylint: disable=g-import-not-at-top
  import gin  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("run")
  gin_utils.parse_gin(["runs/quickstart.gin"], [f"MODEL_DIR = '{root}'"])
  (root / "config.gin").write_text(gin.config_str())
  gin.clear_config()
  shutil.copytree(random_checkpoint, root / "7" / "state")
  return str(root)


@pytest.mark.parametrize("where", ["run_dir", "step_dir"])
def test_moe_eval_takes_the_model_from_the_runs_config(run_dir, tmp_path, capsys, where):
  checkpoint = run_dir if where == "run_dir" else os.path.join(run_dir, "7")
  out_dir = str(tmp_path / "eval")
  rc = eval_bin.main([
      "--gin_file=runs/eval.gin", f"--gin.CHECKPOINT_PATH={checkpoint}",
      f"--gin.MIXTURE_OR_TASK_NAME={TASK}",
      "--gin.TASK_FEATURE_LENGTHS={'inputs': 24, 'targets': 24}",
      "--gin.EVAL_BATCH_SIZE=8", "--gin.EVAL_MAX_EXAMPLES=8", "--gin.MAX_DECODE_LENGTH=6",
      "--gin.COLLECT_ROUTING_STATS=False", f"--gin.EVAL_OUTPUT_DIR={out_dir}"])
  out = capsys.readouterr()
  assert rc == 0, out.err
  assert f"moe-eval: model and data settings from {os.path.join(run_dir, 'config.gin')}" in out.out
  with open(os.path.join(out_dir, "metrics.json")) as f:
    assert set(json.load(f)) == {TASK}


def test_explicit_model_gin_wins_over_the_runs_config(run_dir):
  bindings = [f"CHECKPOINT_PATH = '{run_dir}'", f"MIXTURE_OR_TASK_NAME = '{TASK}'"]
  assert gin_setup.parse(["models/tiny_dense.gin", "runs/eval.gin"], bindings) is None
  assert gin_setup.model_config().moe is None            # tiny_dense, not the run's MoE
  used = gin_setup.parse(["runs/eval.gin"], bindings)
  assert used == os.path.join(run_dir, "config.gin")
  assert gin_setup.model_config().moe.num_experts == 8   # the run's (tiny_switch)


def test_no_model_and_no_run_config_says_what_to_give(random_checkpoint, capsys):
  rc = eval_bin.main(["--gin_file=runs/eval.gin", f"--gin.CHECKPOINT_PATH={random_checkpoint}",
                      f"--gin.MIXTURE_OR_TASK_NAME={TASK}", "--gin.EVAL_OUTPUT_DIR=/tmp/x"])
  err = capsys.readouterr().err
  assert rc == 2 and "No model" in err and "--gin_file=models/" in err
