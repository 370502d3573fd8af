"""moe-train continues from a moe-upcycle checkpoint without a loss jump.

The whole user path through the three binaries: ``moe-train`` trains a tiny
dense T5 on the embedded synthetic mixture, ``moe-upcycle --verify`` turns
its checkpoint into a top-1 Switch model (8 experts in every other MLP), and
``moe-train`` resumes from the upcycled directory. The reference levels are
the dense run's own losses: the first upcycled steps must sit at the dense
model's final level, far below the loss of a freshly initialised model, and
keep falling.
"""

import os

import numpy as np
import pytest

from moe_jax import train, upcycle
from moe_jax.models import config as model_config_lib
from moe_jax.experiments import runner

DENSE_STEPS = 60
TOTAL_STEPS = 90
COMMON = ["--gin_file=runs/quickstart.gin", "--gin.LOG_PERIOD=10", "--gin.EVAL_PERIOD=0",
          f"--gin.make_schedule.decay_steps={TOTAL_STEPS}"]
DENSE = ["--gin.T5Config.moe=None", "--gin.SparseLayout.kind='none'"]


def _train_ce(model_dir):
  curve = runner.read_scalars(os.path.join(model_dir, "train"))["cross_entropy"]
  return dict(sorted(curve.items()))


@pytest.mark.slow  # end-to-end; pytest -m slow
def test_training_continues_from_upcycled_checkpoint(tmp_path, capsys):
  dense_dir = str(tmp_path / "dense")
  assert train.main(COMMON + DENSE + [f"--gin.MODEL_DIR={dense_dir}",
                                      f"--gin.TRAIN_STEPS={DENSE_STEPS}",
                                      f"--gin.CHECKPOINT_PERIOD={DENSE_STEPS}"]) == 0
  dense = _train_ce(dense_dir)
  # The run's model, readable without gin (a distillation teacher reads it).
  written = model_config_lib.load_json(os.path.join(dense_dir, "model_config.json"))
  assert written.moe is None and written.d_model == 64
  random_level, dense_level = dense[10], dense[DENSE_STEPS]
  assert random_level - dense_level > 1.5, dense  # the dense run learned something

  moe_dir = str(tmp_path / "moe")
  code = upcycle.main(["--dense_checkpoint", os.path.join(dense_dir, str(DENSE_STEPS)),
                       "--gin_file", "runs/quickstart.gin", "--output", moe_dir,
                       "--router_init", "zeros", "--verify"])
  out = capsys.readouterr().out
  assert code == 0, out
  assert "upcycled_model.gin" in os.listdir(moe_dir)

  assert train.main(COMMON + [f"--gin_file={os.path.join(moe_dir, 'upcycled_model.gin')}",
                              f"--gin.MODEL_DIR={moe_dir}",
                              f"--gin.TRAIN_STEPS={TOTAL_STEPS}",
                              f"--gin.CHECKPOINT_PERIOD={TOTAL_STEPS}"]) == 0
  moe = _train_ce(moe_dir)
  assert min(moe) == DENSE_STEPS + 10, moe  # resumed at the dense step, not at 0
  first, last = moe[DENSE_STEPS + 10], moe[TOTAL_STEPS]
  # No jump back toward a fresh model's loss: the first upcycled window is at
  # the dense level (within a small margin), far from the random-init level.
  assert first < dense_level + 0.25 * (random_level - dense_level), (dense, moe)
  assert last < first + 0.05, moe  # and it keeps falling (within noise)
  assert np.isfinite(list(moe.values())).all()
