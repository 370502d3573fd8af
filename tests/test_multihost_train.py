"""Two processes (gloo, 127.0.0.1) x 4 CPU devices train like 1 process x 8.

The reference runs in the test process (8 CPU devices from conftest). Each
of the two workers runs this file as a script (own ``XLA_FLAGS``); it joins
``jax.distributed`` through :mod:`moe_jax.training.multihost`, feeds only
its rows of each global batch, trains a few steps of a tiny Switch model on
a ``data=2, expert=4`` mesh with :func:`moe_jax.training.loop.train`, and
prints the losses as JSON.
"""

import json
import os
import socket
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3
BATCH = 16
LENGTH = 8


def _worker(argv):
  from moe_jax.training import multihost  # pylint: disable=g-import-not-at-top
  coordinator, num_processes, process_id = argv
  assert multihost.initialize(coordinator, int(num_processes), int(process_id))
  print("LOSSES=" + json.dumps(_train_losses()), flush=True)


def _train_losses():
  """Trains STEPS steps on a data=2 x expert=4 mesh; returns the losses."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from moe_jax.training import multihost  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from moe_jax import partitioning  # pylint: disable=g-import-not-at-top
  from moe_jax.layers.moe_config import MoeConfig  # pylint: disable=g-import-not-at-top
  from moe_jax.models import SparseLayout, T5Config, build_model  # pylint: disable=g-import-not-at-top
  from moe_jax.training import loop, optimizers, train_state  # pylint: disable=g-import-not-at-top

  assert jax.device_count() == 8, jax.devices()
  model = build_model(T5Config(
      vocab_size=64, d_model=16, num_heads=2, d_kv=8, d_ff=32, num_encoder_layers=1,
      num_decoder_layers=1, dropout_rate=0.0,
      moe=MoeConfig(num_experts=4, num_selected_experts=1, d_ff=32, group_size=16),
      encoder_layout=SparseLayout(kind="all"), decoder_layout=SparseLayout(kind="all")))
  partitioner = partitioning.Partitioner.create({"data": 2, "expert": 4})
  schedule = optimizers.make_schedule("constant", 0.01, warmup_steps=0)
  tx = optimizers.make_optimizer("adafactor", schedule)
  rows = multihost.process_batch_slice(BATCH)

  def batches():
    for step in range(STEPS):
      rng = np.random.default_rng(step)
      tokens = rng.integers(1, 64, (BATCH, LENGTH)).astype(np.int32)
      full = {"encoder_input_tokens": tokens[:, ::-1].copy(),
              "decoder_input_tokens": np.concatenate(
                  [np.zeros((BATCH, 1), np.int32), tokens[:, :-1]], 1),
              "decoder_target_tokens": tokens,
              "decoder_loss_weights": np.ones((BATCH, LENGTH), np.int32)}
      yield {k: v[rows] for k, v in full.items()}   # this process's rows only

  layout = train_state.StateLayout.create(
      model, tx, partitioner,
      train_state.dummy_batch(BATCH, {"inputs": LENGTH, "targets": LENGTH}))
  result = loop.train(
      layout, batches(),
      loop.LoopConfig(train_steps=STEPS, log_period=STEPS, checkpoint_period=None),
      schedule=schedule, log_fn=lambda _: None)
  return result.losses


def _spawn(devices, args):
  env = dict(os.environ)
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3",
             PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""))
  return subprocess.Popen([sys.executable, os.path.abspath(__file__), *map(str, args)],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, cwd=REPO)


def _losses(proc, timeout=540):
  out, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, out[-3000:]
  line = [l for l in out.splitlines() if l.startswith("LOSSES=")][-1]
  return json.loads(line[len("LOSSES="):])


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_cluster_detection_from_flags_and_environment():
  from moe_jax.training import multihost  # pylint: disable=g-import-not-at-top
  assert multihost.detect_cluster(env={}) is None
  assert multihost.detect_cluster("127.0.0.1:1234", 2, 1, env={}) == {
      "coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 1}
  env = {"MOE_JAX_COORDINATOR_ADDRESS": "10.0.0.1:99", "MOE_JAX_NUM_PROCESSES": "4",
         "MOE_JAX_PROCESS_ID": "3"}
  assert multihost.detect_cluster(env=env)["process_id"] == 3
  assert multihost.detect_cluster(env={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}) == {}
  assert multihost.detect_cluster(env={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None
  with pytest.raises(ValueError, match="missing --process_id"):
    multihost.detect_cluster("127.0.0.1:1234", 2, None, env={})
  with pytest.raises(ValueError, match="must be in"):
    multihost.detect_cluster("127.0.0.1:1234", 2, 2, env={})


def test_two_processes_match_one_process():
  addr = f"127.0.0.1:{_free_port()}"
  procs = [_spawn(4, (addr, 2, i)) for i in range(2)]
  try:
    one = _train_losses()   # this process: 1 process x 8 devices (conftest)
    two = [_losses(p) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert len(one) == STEPS
  assert two[0] == pytest.approx(two[1], rel=0, abs=0)   # both hosts see the same loss
  assert two[0] == pytest.approx(one, rel=1e-5)
  assert one[-1] < one[0]


if __name__ == "__main__":
  _worker(sys.argv[1:])
