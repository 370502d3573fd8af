"""moe-average: the mean of a run's checkpoints, against NumPy's mean."""

import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest

from moe_jax import average
from moe_jax.checkpoints import averaging, restore
from moe_jax.checkpoints.params_only import save_params_checkpoint


def _params(seed):
  rng = np.random.default_rng(seed)
  return {"encoder": {"layers_0": {"mlp": {"wi": {"kernel": rng.normal(size=(4, 6)).astype(np.float32)}}}},
          "token_embedder": {"embedding": rng.normal(size=(10, 4)).astype(ml_dtypes.bfloat16)},
          "decoder": {"count": np.arange(3, dtype=np.int32)}}


@pytest.fixture
def run_dir(tmp_path):
  """A run directory laid out like moe-train's: STEP/state, config.gin."""
  for step, seed in ((100, 0), (200, 1), (300, 2)):
    save_params_checkpoint(str(tmp_path / str(step) / "state"), _params(seed))
  os.makedirs(tmp_path / "400.orbax-checkpoint-tmp-1")  # a save cut short: never listed
  (tmp_path / "config.gin").write_text("MODEL_CONFIG = None\n")
  return tmp_path


def _mean(seeds, *keys):
  arrays = []
  for seed in seeds:
    leaf = _params(seed)
    for k in keys:
      leaf = leaf[k]
    arrays.append(np.asarray(leaf, np.float64))
  return np.mean(arrays, axis=0)


def test_choose_steps(run_dir):
  assert averaging.run_steps(str(run_dir)) == [100, 200, 300]
  assert averaging.choose_steps(str(run_dir), last=2) == [200, 300]
  assert averaging.choose_steps(str(run_dir), steps=[300, 100]) == [100, 300]
  with pytest.raises(ValueError, match=r"last 4 .* has 3 committed: \[100, 200, 300\]"):
    averaging.choose_steps(str(run_dir), last=4)
  with pytest.raises(ValueError, match=r"no committed checkpoint for steps \[400\]"):
    averaging.choose_steps(str(run_dir), steps=[400])
  with pytest.raises(ValueError, match="not both or neither"):
    averaging.choose_steps(str(run_dir))


def test_average_is_the_elementwise_mean_in_stored_dtypes(run_dir):
  got = averaging.average_params(averaging.step_paths(str(run_dir), [100, 200, 300]))
  kernel = got["encoder/layers_0/mlp/wi/kernel"]
  assert kernel.dtype == np.float32
  np.testing.assert_allclose(kernel, _mean((0, 1, 2), "encoder", "layers_0", "mlp", "wi",
                                           "kernel"), rtol=1e-6)
  emb = got["token_embedder/embedding"]
  assert emb.dtype == ml_dtypes.bfloat16
  # float64 mean of the stored bfloat16 values, rounded once to bfloat16.
  np.testing.assert_array_equal(
      emb, _mean((0, 1, 2), "token_embedder", "embedding").astype(ml_dtypes.bfloat16))
  np.testing.assert_array_equal(got["decoder/count"], [0, 1, 2])


def test_refuses_checkpoints_of_another_model(run_dir, tmp_path_factory):
  other = tmp_path_factory.mktemp("other")
  params = _params(3)
  params["encoder"]["layers_0"]["mlp"]["wi"]["kernel"] = np.zeros((4, 8), np.float32)
  save_params_checkpoint(str(other / "ckpt"), params)
  with pytest.raises(restore.CheckpointMismatchError,
                     match=r"encoder/layers_0/mlp/wi/kernel: .* float32\[4, 8\], .* float32\[4, 6\]"):
    averaging.average_params([str(run_dir / "100"), str(other / "ckpt")])
  params = _params(3)
  params["decoder"]["count"] = np.array([0, 1, 5], np.int32)
  save_params_checkpoint(str(other / "ints"), params)
  with pytest.raises(restore.CheckpointMismatchError, match="decoder/count: the integer"):
    averaging.average_params([str(run_dir / "100"), str(other / "ints")])


def test_cli_writes_a_loadable_params_checkpoint(run_dir, tmp_path_factory, capsys):
  out = tmp_path_factory.mktemp("avg")
  assert average.main([f"--model_dir={run_dir}", "--last=2", f"--output={out}"]) == 0
  summary = json.loads((out / "averaging.json").read_text())
  assert summary["steps"] == [200, 300]
  assert (out / "config.gin").read_text() == "MODEL_CONFIG = None\n"
  abstract = {"encoder": {"layers_0": {"mlp": {"wi": {
      "kernel": jax.ShapeDtypeStruct((4, 6), np.float32)}}}}}
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  loaded = restore.restore_params(str(out / "checkpoint"), abstract,
                                  jax.tree_util.tree_map(lambda _: dev, abstract))
  np.testing.assert_allclose(np.asarray(loaded["encoder"]["layers_0"]["mlp"]["wi"]["kernel"]),
                             _mean((1, 2), "encoder", "layers_0", "mlp", "wi", "kernel"),
                             rtol=1e-6)
  # A second run to the same output is refused (exit 2, the fix named).
  assert average.main([f"--model_dir={run_dir}", "--last=2", f"--output={out}"]) == 2
  assert "pass --overwrite" in capsys.readouterr().err
  assert average.main([f"--model_dir={run_dir}", "--steps=1x", f"--output={out}"]) == 2
