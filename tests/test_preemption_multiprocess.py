"""Multi-host preemption: the JAX preemption service, through the train loop.

Two processes (gloo, 127.0.0.1, 2 CPU devices each) run
:func:`moe_jax.training.loop.train` on a tiny model; SIGTERM goes to process
1 only. With ``jax.distributed`` the JAX runtime owns SIGTERM (no Python
handler is installed) and ``CheckpointManager.reached_preemption`` gives
both processes the same step: both save it -- each its own data position --
and exit 0; restarted, both resume there. (The single-process SIGTERM
handler path is tests/test_checkpoint_resume.py.)

The workers are this file run as a script.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH, LENGTH, VOCAB = 8, 8, 32


class _Positions:
  """This process's rows of a deterministic global batch stream, slowed down
  so that the signal lands mid-run; its position is one integer per process."""

  def __init__(self, process, processes):
    self.process, self.processes, self.position = process, processes, 0

  def __iter__(self):
    return self

  def __next__(self):
    import numpy as np  # pylint: disable=g-import-not-at-top
    time.sleep(0.05)
    rng = np.random.default_rng(self.position)
    tokens = rng.integers(1, VOCAB, (BATCH, LENGTH)).astype(np.int32)
    rows = slice(self.process * BATCH // self.processes,
                 (self.process + 1) * BATCH // self.processes)
    self.position += 1
    print(f"POSITION {self.position} sigterm_handler={signal.getsignal(signal.SIGTERM)}",
          flush=True)
    return {"decoder_input_tokens": np.concatenate(
                [np.zeros((BATCH, 1), np.int32), tokens[:, :-1]], 1)[rows],
            "decoder_target_tokens": tokens[rows],
            "decoder_loss_weights": np.ones((BATCH, LENGTH), np.int32)[rows]}

  def get_state(self):
    return {"position": self.position}

  def save(self, directory):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "position.json"), "w") as f:
      json.dump({"position": self.position, "process": self.process}, f)

  def restore(self, directory):
    with open(os.path.join(directory, "position.json")) as f:
      saved = json.load(f)
    assert saved["process"] == self.process, (saved, self.process)
    self.position = saved["position"]
    print(f"RESTORED {self.position} from {os.path.basename(directory)}", flush=True)


def _worker(coordinator, num_processes, process_id, model_dir, train_steps):
  from moe_jax.training import multihost  # pylint: disable=g-import-not-at-top
  assert multihost.initialize(coordinator, int(num_processes), int(process_id))
  # pylint: disable=g-import-not-at-top
  import jax
  from moe_jax import models, partitioning
  from moe_jax.checkpoints import preemption
  from moe_jax.training import loop, optimizers, train_state
  # pylint: enable=g-import-not-at-top
  print(f"SERVICE {preemption.jax_preemption_service_active()}", flush=True)
  model = models.build_model(models.T5Config(
      vocab_size=VOCAB, d_model=16, num_heads=2, d_kv=8, d_ff=32,
      num_encoder_layers=0, num_decoder_layers=1, dropout_rate=0.0,
      decoder_only=True))
  tx = optimizers.make_optimizer("adamw", optimizers.make_schedule("constant", 1e-3, 0))
  layout = train_state.StateLayout.create(
      model, tx, partitioning.Partitioner.create({"data": jax.device_count()}),
      train_state.dummy_batch(BATCH, {"targets": LENGTH}))
  result = loop.train(
      layout, _Positions(jax.process_index(), jax.process_count()),
      loop.LoopConfig(train_steps=int(train_steps), log_period=10_000,
                      checkpoint_period=10_000),
      model_dir=model_dir, log_fn=lambda line: print(line, flush=True))
  print(f"RESULT step={int(result.state.step)} stopped_early={result.stopped_early}",
        flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__" and len(sys.argv) == 6:
  sys.path.insert(0, REPO)
  _worker(*sys.argv[1:])
  sys.exit(0)

# ---------------------------------------------------------------------------
# pytest side.


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(model_dir, train_steps):
  addr = f"127.0.0.1:{_free_port()}"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), addr, "2", str(i),
                             model_dir, str(train_steps)],
                            env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outputs = [[] for _ in procs]
  readers = []
  for proc, out in zip(procs, outputs):
    t = threading.Thread(target=lambda p=proc, o=out: o.extend(iter(p.stdout.readline, "")),
                         daemon=True)
    t.start()
    readers.append(t)
  return procs, outputs, readers


def _wait_for(outputs, pattern, timeout=400):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if all(any(re.search(pattern, line) for line in out) for out in outputs):
      return
    time.sleep(0.1)
  raise AssertionError(f"not every worker printed {pattern!r}:\n"
                       + "\n----\n".join("".join(o[-40:]) for o in outputs))


def _finish(procs, readers, outputs, timeout=400):
  try:
    for proc in procs:
      proc.wait(timeout=timeout)
    for t in readers:
      t.join(timeout=30)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  texts = ["".join(o) for o in outputs]
  for proc, text in zip(procs, texts):
    assert proc.returncode == 0, text[-4000:]
  return texts


def _result(text):
  m = re.search(r"RESULT step=(\d+) stopped_early=(\w+)", text)
  assert m, text[-3000:]
  return int(m.group(1)), m.group(2) == "True"


@pytest.mark.slow  # end-to-end; pytest -m slow
def test_sigterm_to_one_process_stops_both_at_one_step_and_they_resume(tmp_path):
  model_dir = str(tmp_path / "model")
  procs, outputs, readers = _start(model_dir, 10_000)
  try:
    _wait_for(outputs, r"^POSITION 5 ")
    procs[1].send_signal(signal.SIGTERM)      # one host gets the preemption notice
  except BaseException:
    for p in procs:
      p.kill()
    raise
  texts = _finish(procs, readers, outputs)
  for text in texts:
    assert "SERVICE True" in text
    # The JAX runtime owns SIGTERM: no Python handler was installed.
    assert "sigterm_handler=Handlers.SIG_DFL" in text or "sigterm_handler=0" in text
  (step0, early0), (step1, early1) = _result(texts[0]), _result(texts[1])
  assert early0 and early1 and step0 == step1 >= 5
  assert f"Preempted: saved step {step0}" in texts[0]
  step_dir = os.path.join(model_dir, str(step0))
  for i in range(2):
    with open(os.path.join(step_dir, "data_iterator", f"process_{i}-of-2",
                           "position.json")) as f:
      assert json.load(f) == {"position": step0, "process": i}

  procs, outputs, readers = _start(model_dir, step0 + 3)
  texts = _finish(procs, readers, outputs)
  assert f"Resumed from {model_dir} at step {step0}." in texts[0]
  for i, text in enumerate(texts):
    assert f"RESTORED {step0} from process_{i}-of-2" in text
    assert _result(text) == (step0 + 3, False)
