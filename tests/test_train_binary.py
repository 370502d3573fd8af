"""The moe-train binary: flags, start-up errors, the quickstart run."""

import glob
import math
import os

import numpy as np
import pytest

from moe_jax import gin_utils, train
from moe_jax.training import loop

QUICKSTART = ["--gin_file=runs/quickstart.gin"]


def _main_error(capsys, argv):
  code = train.main(argv)
  err = capsys.readouterr().err
  return code, err


@pytest.mark.parametrize("extra, expected", [
    (["--gin.no_such_thing.x=1"], "No configurable matching 'no_such_thing'"),
    (["--gin.T5Config.no_such=1"], "doesn't have a parameter named 'no_such'"),
    (["--gin.MESH_DATA=3"], "product is 8"),
    (["--gin.MESH_DATA=1", "--gin.MESH_EXPERT=16"], "--gin.MESH_DATA"),
    (["--gin.BATCH_SIZE=12"], "--gin.BATCH_SIZE=8"),
    (["--gin.MESH_DATA=1", "--gin.MESH_EXPERT=8", "--gin.NUM_EXPERTS=4"],
     "use a multiple of 8 experts or a smaller expert axis"),
    (["--gin.NUM_MICROBATCHES=3"], "NUM_MICROBATCHES=3"),
    (["--bogus_flag=1"], "Unknown flags ['--bogus_flag=1']"),
])
def test_bad_configuration_fails_at_start_saying_what_to_change(capsys, tmp_path, extra, expected):
  code, err = _main_error(capsys, QUICKSTART + [f"--gin.MODEL_DIR={tmp_path}"] + extra)
  assert code == 2
  assert expected in err
  assert not glob.glob(str(tmp_path / "*" / "*"))  # nothing trained or written


def test_missing_required_setting_and_file(capsys):
  code, err = _main_error(capsys, ["--gin_file=models/tiny_switch.gin",
                                   "--gin_file=runs/pretrain.gin"])
  assert code == 2 and "MODEL_DIR" in err
  code, err = _main_error(capsys, ["--gin_file=models/no_such_model.gin"])
  assert code == 2 and "--gin_search_paths" in err


def test_flag_values_become_gin_values():
  assert gin_utils.gin_value("/tmp/x") == "'/tmp/x'"
  assert gin_utils.gin_value("12") == "12"
  assert gin_utils.gin_value("'adamw'") == "'adamw'"
  assert gin_utils.gin_value("@make_schedule()") == "@make_schedule()"
  assert gin_utils.gin_value("{'inputs': 8}") == "{'inputs': 8}"
  args = train.parse_flags(["--gin_file=a.gin", "--gin_file=b.gin", "--gin.MODEL_DIR=/tmp/m",
                            "--gin_bindings=TRAIN_STEPS = 3", "--gin_search_paths=/x,/y"])
  assert args.gin_file == ["a.gin", "b.gin"]
  assert args.bindings == ["TRAIN_STEPS = 3", "MODEL_DIR = '/tmp/m'"]
  assert gin_utils.search_paths(args.gin_search_paths)[:2] == ["/x", "/y"]


def test_non_finite_loss_message():
  with pytest.raises(loop.NonFiniteLossError, match="before any checkpoint"):
    loop._check_finite(7, {"loss": np.float32("nan"), "param_norm": np.float32(1)})
  with pytest.raises(loop.NonFiniteLossError, match="parameters became non-finite"):
    loop._check_finite(7, {"loss": np.float32(2.0), "param_norm": np.float32("inf")})
  assert loop._check_finite(7, {"loss": np.float32(2.0)}) == 2.0


def test_quickstart_loss_falls_with_moe_metrics_and_tensorboard(tmp_path):
  """The quickstart config, shortened, on a data=2 x expert=4 mesh."""
  gin_utils.parse_gin(["runs/quickstart.gin"], [
      f"MODEL_DIR = '{tmp_path}'", "TRAIN_STEPS = 30", "LOG_PERIOD = 10",
      "EVAL_PERIOD = 30", "EVAL_STEPS = 1", "CHECKPOINT_PERIOD = None",
      "MESH_EXPERT = 4", "make_schedule.warmup_steps = 5"])
  exp = train.configured_experiment()
  assert dict(exp.mesh.shape) == {"data": 2, "fsdp": 1, "expert": 4, "model": 1}
  lines = []
  result = exp.run(log_fn=lines.append)
  losses = result.losses
  assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
  assert np.mean(losses[-5:]) < losses[0] - 1.0, losses
  text = "\n".join(lines)
  assert "[train] step     30" in text and "tok/s" in text and "mfu" in text
  assert "encoder/layers/layers_1/moe: aux_loss=" in text
  assert "dropped_fraction=" in text and "expert_load_max=" in text
  assert "[eval] step     30" in text
  assert result.eval_history and result.eval_history[0][1]["loss"] < losses[0]
  assert glob.glob(str(tmp_path / "train" / "events.out.tfevents*"))
  assert glob.glob(str(tmp_path / "eval" / "events.out.tfevents*"))


# ---------------------------------------------------------------------------
# A run from the command line: quiet start-up, then damaged checkpoints.
# ---------------------------------------------------------------------------
TINY = ["--gin.T5Config.d_model=16", "--gin.T5Config.num_heads=2", "--gin.T5Config.d_kv=8",
        "--gin.T5Config.d_ff=32", "--gin.T5Config.num_encoder_layers=1",
        "--gin.T5Config.num_decoder_layers=1", "--gin.NUM_EXPERTS=4", "--gin.MoeConfig.d_ff=32",
        "--gin.MoeConfig.group_size=64", "--gin.BATCH_SIZE=8", "--gin.EVAL_PERIOD=0",
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 16}", "--gin.LOG_PERIOD=2",
        "--gin.CHECKPOINT_PERIOD=2", "--gin.train.measure_peak_flops=False",
        "--gin.train.tensorboard=False"]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
  """``python -m moe_jax.train`` (a fresh process): 4 steps, checkpoints at 2, 4."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  model_dir = str(tmp_path_factory.mktemp("cli") / "run")
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(
      [sys.executable, "-m", "moe_jax.train", *QUICKSTART, *TINY,
       f"--gin.MODEL_DIR={model_dir}", "--gin.TRAIN_STEPS=4"],
      capture_output=True, text=True, env=env, cwd=repo, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return model_dir, proc.stdout + proc.stderr


def test_start_up_prints_no_library_noise(cli_run):
  _, output = cli_run
  assert "[train] step      4" in output
  for noise in ("Path not found", "oneDNN custom operations", "cuda drivers",
                "uncached FunctionDataset", "rebuild TensorFlow"):
    assert noise not in output, output[:3000]
  assert not [line for line in output.splitlines() if " ERROR " in line or
              line.startswith(("E0000", "ERROR"))], output[:3000]


def _copy_run(cli_run, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  model_dir, _ = cli_run
  target = str(tmp_path / "run")
  shutil.copytree(model_dir, target)
  return target


def _truncate_state_files(step_dir, count=3):
  files = sorted(f for f in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"),
                                      recursive=True) if os.path.isfile(f))
  assert files, step_dir
  for f in files[:count]:
    with open(f, "r+b") as fh:
      fh.truncate(os.path.getsize(f) // 3)


def _tree(directory):
  return {os.path.relpath(os.path.join(d, f), directory): os.path.getsize(os.path.join(d, f))
          for d, _, fs in os.walk(directory) for f in fs}


def test_damaged_newest_checkpoint_falls_back_and_keeps_it(cli_run, tmp_path, capsys):
  model_dir = _copy_run(cli_run, tmp_path)
  _truncate_state_files(os.path.join(model_dir, "4"))
  code = train.main(QUICKSTART + TINY + [f"--gin.MODEL_DIR={model_dir}",
                                         "--gin.TRAIN_STEPS=6"])
  out = capsys.readouterr()
  assert code == 0, out.err[-3000:]
  assert "skipping damaged checkpoint step 4" in out.err
  assert "truncated" in out.err and os.path.join(model_dir, "4") in out.err
  assert f"Resumed from {model_dir} at step 2." in out.out
  assert os.path.isdir(os.path.join(model_dir, "4.damaged"))   # kept, not deleted
  assert {"2", "4", "6"} <= set(os.listdir(model_dir))         # 4 written again


def test_refuse_or_every_checkpoint_damaged_exits_2_changing_nothing(cli_run, tmp_path,
                                                                      capsys):
  model_dir = _copy_run(cli_run, tmp_path)
  _truncate_state_files(os.path.join(model_dir, "4"))
  before = _tree(model_dir)
  code = train.main(QUICKSTART + TINY + [f"--gin.MODEL_DIR={model_dir}",
                                         "--gin.TRAIN_STEPS=6",
                                         "--gin.train.on_damaged_checkpoint='refuse'"])
  err = capsys.readouterr().err
  assert code == 2 and "moe-train: error:" in err and "step 4" in err
  assert "Traceback" not in err and len(err) < 2000
  assert _tree(model_dir) == before
  _truncate_state_files(os.path.join(model_dir, "2"))
  os.remove(os.path.join(model_dir, "4", "data_iterator", "process_0-of-1", "state.json"))
  before = _tree(model_dir)
  code = train.main(QUICKSTART + TINY + [f"--gin.MODEL_DIR={model_dir}",
                                         "--gin.TRAIN_STEPS=6"])
  err = capsys.readouterr().err
  assert code == 2 and "every step is damaged" in err, err[-3000:]
  assert "step 2" in err and "step 4" in err and "Nothing was changed" in err
  assert _tree(model_dir) == before                           # nothing overwritten
