"""moe_jax.gin_utils: flags, quiet parsing, a run's own config."""

import logging
import os

import gin
import pytest

from moe_jax import gin_utils
from moe_jax.models import config as model_config_lib


def test_split_gin_flags_and_values():
  bindings, rest = gin_utils.split_gin_flags(
      ["--gin.MODEL_DIR=/tmp/m", "--gin_file=a.gin", "--gin.TRAIN_STEPS=3"])
  assert bindings == ["MODEL_DIR = '/tmp/m'", "TRAIN_STEPS = 3"]
  assert rest == ["--gin_file=a.gin"]
  with pytest.raises(gin_utils.UsageError, match="--gin.NAME=VALUE"):
    gin_utils.split_gin_flags(["--gin.MODEL_DIR"])
  args = gin_utils.parse_flags(["--gin_file=a.gin"], prog="moe-eval")
  assert args.log_level == "ERROR" and args.gin_file == ["a.gin"]
  with pytest.raises(gin_utils.UsageError, match="--log_level"):
    gin_utils.setup_logging("LOUD")


def test_includes_resolve_without_path_not_found_errors(caplog):
  """gin probes every search path for an include and logs ERROR for each miss."""
  with caplog.at_level(logging.INFO):
    gin_utils.parse_gin(["runs/quickstart.gin"], ["MODEL_DIR = None"])
  gin.clear_config()
  assert not [r for r in caplog.records if "Path not found" in r.getMessage()]
  assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.fixture
def run_dir(tmp_path):
  """A run directory as moe-train leaves it: config.gin and a step directory."""
  gin_utils.parse_gin(["runs/quickstart.gin"], [f"MODEL_DIR = '{tmp_path}'",
                                                 "T5Config.d_model = 48"])
  (tmp_path / "config.gin").write_text(gin.config_str())
  want = gin_utils.register_configurables()["T5Config"]()
  gin.clear_config()
  (tmp_path / "300" / "state").mkdir(parents=True)
  return tmp_path, want


def test_run_config_is_found_from_run_step_or_item_directory(run_dir):
  root, _ = run_dir
  for where in (root, root / "300", root / "300" / "state"):
    assert gin_utils.find_run_config(str(where)) == str(root / "config.gin")
  assert gin_utils.find_run_config(str(root.parent / "elsewhere")) is None


def test_run_model_config_from_gin_then_json(run_dir):
  root, want = run_dir
  config, used = gin_utils.run_model_config(str(root / "300"))
  assert used == str(root / "config.gin") and config == want and config.d_model == 48
  with pytest.raises(ValueError):     # gin was left clear for the caller's own parse
    gin.query_parameter("MODEL_DIR/macro.value")
  model_config_lib.save_json(want, str(root / model_config_lib.CONFIG_FILE))
  config, used = gin_utils.run_model_config(str(root / "300"))
  assert used == os.path.join(root, model_config_lib.CONFIG_FILE) and config == want
