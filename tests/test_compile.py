"""moe-compile: the train step compiled for TPU topologies on this CPU machine.

Each TPU compile of the tiny Switch takes seconds to a minute here, so the
JSON of one 4-chip compile is shared by the tests that read it.
"""

import contextlib
import hashlib
import io
import json

import jax
import pytest

from moe_jax import compile as moe_compile
from moe_jax.aot import platforms, report, step
from moe_jax.training import loop, train_step

pytestmark = pytest.mark.skipif(not platforms.libtpu_installed(),
                                reason='libtpu not installed (pip install -e ".[tpu]")')

TINY = ["--gin_file=models/tiny_switch.gin", "--gin_file=runs/pretrain.gin",
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 32}"]


def _main(argv):
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = moe_compile.main(argv)
  return code, out.getvalue(), err.getvalue()


def _json(argv):
  code, out, err = _main(argv + ["--json"])
  assert out.strip(), err
  return code, json.loads(out)


@pytest.fixture(scope="module")
def tiny_v5p():
  """tiny_switch, expert=4 over a v5p-8 slice (4 chips), batch 8 x 32/32."""
  return _json(TINY + ["--gin.MESH_EXPERT=4", "--gin.BATCH_SIZE=8", "--topology=v5p-8"])


def test_json_has_exactly_the_documented_keys(tiny_v5p):
  code, rep = tiny_v5p
  assert code == 0
  assert tuple(rep) == report.KEYS
  assert set(rep["device_bytes"]) == {"argument", "temp", "output", "alias", "total"}
  assert set(rep["host_bytes"]) == {"argument", "temp", "output", "alias", "total"}
  assert set(rep["collectives"]) >= {"all-to-all", "all-gather", "reduce-scatter",
                                     "all-reduce", "collective-permute",
                                     "ragged-all-to-all"}


def test_tiny_switch_fits_on_four_v5p_chips(tiny_v5p):
  _, rep = tiny_v5p
  assert (rep["topology"], rep["chips"], rep["slices"]) == ("v5p:2x2x1", 4, 1)
  assert rep["mesh"] == {"data": 1, "fsdp": 1, "expert": 4, "model": 1}
  assert rep["global_batch"] == 8 and rep["tokens_per_step"] == 8 * (32 + 32)
  dev = rep["device_bytes"]
  assert dev["total"] == dev["argument"] + dev["output"] - dev["alias"] + dev["temp"]
  assert rep["fits"] and rep["hbm_bytes_per_chip"] == 95 * 2**30
  assert rep["headroom_bytes"] == rep["hbm_bytes_per_chip"] - dev["total"]
  assert rep["flops_per_chip"] > 0 and rep["model_flops_per_step"] > 0
  assert rep["roofline_step_s"] > 0 and 0 < rep["mfu_bound"] <= 1


def test_all_to_alls_are_what_the_sharded_moe_layers_emit(tiny_v5p):
  _, rep = tiny_v5p
  # tiny_switch: layer 1 of each 2-layer stack is MoE (SparseLayout every=2).
  # Expert-parallel dispatch and combine are one all-to-all each in the
  # forward pass, and each has a transposed one in the backward pass.
  moe_layers = 2
  assert rep["collectives"]["all-to-all"]["count"] == 4 * moe_layers
  assert rep["collectives"]["all-to-all"]["bytes"] > 0
  assert rep["collectives"]["all-reduce"]["count"] > 0  # gradient reduction


def test_scanned_layers_count_collectives_per_iteration(tiny_v5p):
  """The same model with nn.scan: the HLO holds each MoE layer once inside a
  while loop, but per step the same collectives and FLOPs happen."""
  _, plain = tiny_v5p
  code, scanned = _json(TINY + ["--gin.MESH_EXPERT=4", "--gin.BATCH_SIZE=8",
                                "--gin.T5Config.scan_layers=True", "--topology=v5p-8"])
  assert code == 0
  assert scanned["collectives"]["all-to-all"]["count"] == \
      plain["collectives"]["all-to-all"]["count"]
  assert scanned["flops_per_chip"] == pytest.approx(plain["flops_per_chip"], rel=0.1)


def test_two_slices_reduce_gradients_across_slices():
  code, rep = _json(TINY + ["--gin.MESH_EXPERT=4", "--gin.DCN_MESH_DATA=2",
                            "--gin.BATCH_SIZE=16", "--topology=v5p-8", "--num_slices=2"])
  assert code == 0 and rep["fits"]
  assert (rep["slices"], rep["chips"]) == (2, 8)
  assert rep["mesh"]["data"] == 2 and rep["mesh"]["expert"] == 4
  # The cross-slice (DCN) gradient all-reduce: send/recv over the data-center
  # network, one per reduced buffer.
  assert rep["collectives"]["dcn-all-reduce"]["count"] > 0
  assert rep["collectives"]["dcn-all-reduce"]["bytes"] > 0


HUGE = TINY[:2] + ["--gin.BATCH_SIZE=4096",
                   "--gin.TASK_FEATURE_LENGTHS={'inputs': 512, 'targets': 512}",
                   "--topology=v5litepod-1"]


def test_a_program_that_cannot_fit_is_a_result():
  code, out, err = _main(HUGE)
  assert code == 1
  assert "Traceback" not in out + err
  assert "fits: NO" in out and "GiB over" in out
  assert "remat_policy" in out and "NUM_MICROBATCHES" in out and "MESH_FSDP" in out
  code, rep = _json(HUGE)
  assert code == 1 and rep["fits"] is False
  assert rep["headroom_bytes"] < 0
  assert rep["device_bytes"]["total"] > rep["hbm_bytes_per_chip"]


def test_usage_errors():
  code, _, err = _main(TINY)
  assert code == 2 and "--topology" in err
  code, _, err = _main(TINY + ["--topology=v5p-7"])
  assert code == 2 and "TensorCores" in err
  code, _, err = _main(TINY + ["--topology=v5p-8", "--gin.MESH_EXPERT=3"])
  assert code == 2 and "Mesh sizes" in err
  code, _, err = _main(TINY + ["--topology=v5p-8", "--bogus=1"])
  assert code == 2 and "Unknown flags" in err and "--num_slices" in err


class _Captured(Exception):
  pass


def test_compiled_step_is_the_one_moe_train_runs(monkeypatch):
  """On the 8 CPU devices: the step moe-compile lowers (Experiment.lower_step)
  and the step training/loop.py builds for moe-train lower to the same
  program."""
  step.parse_config(["models/tiny_switch.gin", "runs/pretrain.gin"],
                           ["MESH_EXPERT = 4", "BATCH_SIZE = 8",
                            "TASK_FEATURE_LENGTHS = {'inputs': 32, 'targets': 32}"])
  exp = step.build_experiment(jax.devices())
  ours = step.lower_train_step(exp).as_text()

  captured = {}
  real = train_step.jit_train_step

  def spy(*args, **kwargs):
    captured["step"] = real(*args, **kwargs)
    raise _Captured

  monkeypatch.setattr(train_step, "jit_train_step", spy)
  with pytest.raises(_Captured):
    loop.train(exp.layout, iter(()), exp.loop_config, loss_cfg=exp.loss_config,
               schedule=exp.schedule)
  monkeypatch.undo()
  with exp.partitioner.activate():
    theirs = captured["step"].lower(exp.layout.abstract, exp.batch_shapes).as_text()
  assert "num_partitions = 8" in ours  # the sharded program of 8 devices
  assert hashlib.sha256(ours.encode()).hexdigest() == \
      hashlib.sha256(theirs.encode()).hexdigest()
