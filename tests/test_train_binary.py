"""The moe-train binary: flags, start-up errors, the quickstart run."""

import glob
import math
import os

import numpy as np
import pytest

from moe_jax import train
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
  assert train._gin_value("/tmp/x") == "'/tmp/x'"
  assert train._gin_value("12") == "12"
  assert train._gin_value("'adamw'") == "'adamw'"
  assert train._gin_value("@make_schedule()") == "@make_schedule()"
  assert train._gin_value("{'inputs': 8}") == "{'inputs': 8}"
  args = train.parse_flags(["--gin_file=a.gin", "--gin_file=b.gin", "--gin.MODEL_DIR=/tmp/m",
                            "--gin_bindings=TRAIN_STEPS = 3", "--gin_search_paths=/x,/y"])
  assert args.gin_file == ["a.gin", "b.gin"]
  assert args.bindings == ["TRAIN_STEPS = 3", "MODEL_DIR = '/tmp/m'"]
  assert train.search_paths(args.gin_search_paths)[:2] == ["/x", "/y"]


def test_non_finite_loss_message():
  with pytest.raises(loop.NonFiniteLossError, match="before any checkpoint"):
    loop._check_finite(7, {"loss": np.float32("nan"), "param_norm": np.float32(1)})
  with pytest.raises(loop.NonFiniteLossError, match="parameters became non-finite"):
    loop._check_finite(7, {"loss": np.float32(2.0), "param_norm": np.float32("inf")})
  assert loop._check_finite(7, {"loss": np.float32(2.0)}) == 2.0


def test_quickstart_loss_falls_with_moe_metrics_and_tensorboard(tmp_path):
  """The quickstart config, shortened, on a data=2 x expert=4 mesh."""
  train.parse_gin(["runs/quickstart.gin"], [
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
