"""Preemption: SIGTERM -> save and exit 0; SIGKILL mid-save -> previous step wins.

The children are this file run as a script:
  ``python tests/test_checkpoint_preemption.py sigterm DIR``: a toy train loop
    (``w_s = w_0 + s``) with a PreemptionHandler, saving every 3 steps; on
    SIGTERM it saves the current step and exits 0. Its commit is slowed down
    so that the test can send a second SIGTERM while the save is running.
  ``python tests/test_checkpoint_preemption.py sigkill DIR``: saves step 1,
    then starts saving step 2 and hangs just before the commit, where the
    test kills it with SIGKILL.
"""

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_HERE)


def _w0():
  return np.random.default_rng(2).standard_normal((8, 4)).astype(np.float32)


def _expected_state(step):
  return {"w": _w0() + np.float32(step), "step": np.asarray(step, np.int32)}


def _slow_commit(seconds):
  """Makes Orbax announce each commit on stdout and pause before it."""
  import asyncio  # pylint: disable=g-import-not-at-top
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top
  original = atomicity.AtomicRenameTemporaryPath.finalize

  async def finalize(self, *args, **kwargs):
    print("FINALIZING", flush=True)
    await asyncio.sleep(seconds)
    return await original(self, *args, **kwargs)

  atomicity.AtomicRenameTemporaryPath.finalize = finalize


def _child_state(step, mesh):
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  ref = _expected_state(step)
  return {"w": jax.device_put(ref["w"], NamedSharding(mesh, P("data", "expert"))),
          "step": jax.device_put(ref["step"], NamedSharding(mesh, P()))}


class _Position:
  """A data iterator whose checkpointed position is one integer."""

  def __init__(self, step):
    self.step = step

  def get_state(self):
    return {"step": self.step}

  def save(self, directory):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "position"), "w") as f:
      f.write(str(self.step))


def _child(mode, directory):
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
  os.environ["JAX_PLATFORMS"] = "cpu"
  from moe_jax import partitioning  # pylint: disable=g-import-not-at-top
  from moe_jax.checkpoints import manager as manager_lib  # pylint: disable=g-import-not-at-top
  from moe_jax.checkpoints import preemption  # pylint: disable=g-import-not-at-top
  mesh = partitioning.make_mesh({"data": 2, "expert": 2})
  ckpt = manager_lib.CheckpointManager(directory, save_interval_steps=3 if mode == "sigterm" else 1)
  if mode == "sigkill":
    ckpt.save(1, _child_state(1, mesh), {"step": 1})
    ckpt.wait_until_finished()
    _slow_commit(3600)
    print("SAVED 1", flush=True)
    # With its data position too: the killed save must not read as good either.
    ckpt.save(2, _child_state(2, mesh), data_iterator=_Position(2))
    ckpt.wait_until_finished()  # never returns: the test kills us first
    return 1
  with preemption.PreemptionHandler() as handler:
    for step in range(1, 10_000):
      state = _child_state(step, mesh)   # "train" one step
      if handler.should_stop(step):
        _slow_commit(3.0)
        assert ckpt.save(step, state, {"step": step}, force=True)
        ckpt.wait_until_finished()
        ckpt.close()
        print(f"EXIT {step} signals={handler.signal_count}", flush=True)
        return 0
      ckpt.save(step, state, {"step": step})   # every 3 steps
      print(f"STEP {step}", flush=True)
      time.sleep(0.05)
  return 1


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] in ("sigterm", "sigkill"):
  sys.path.insert(0, _REPO)
  sys.exit(_child(sys.argv[1], sys.argv[2]))

# ---------------------------------------------------------------------------
# pytest side.

import jax  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

from moe_jax import partitioning  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from moe_jax.checkpoints import manager as manager_lib  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from moe_jax.checkpoints import preemption  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


def _spawn(mode, directory):
  env = dict(os.environ)
  env["PYTHONPATH"] = _REPO + os.pathsep + env.get("PYTHONPATH", "")
  return subprocess.Popen([sys.executable, os.path.abspath(__file__), mode, directory],
                          env=env, cwd=_REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _read_until(proc, prefix, timeout=180):
  """Reads the child's stdout up to a line starting with ``prefix``."""
  watchdog = threading.Timer(timeout, proc.kill)  # a hung child unblocks readline
  watchdog.daemon = True
  watchdog.start()
  lines = []
  try:
    while True:
      line = proc.stdout.readline()
      if not line:
        break
      lines.append(line)
      if line.startswith(prefix):
        return line.strip(), lines
  finally:
    watchdog.cancel()
  proc.kill()
  raise AssertionError(f"child never printed {prefix!r}; stdout={lines} "
                       f"stderr={proc.stderr.read()[-3000:]}")


def _restore(directory):
  mesh = partitioning.make_mesh({"data": 4, "expert": 2})
  abstract = {"w": jax.ShapeDtypeStruct((8, 4), np.float32,
                                        sharding=NamedSharding(mesh, P("data"))),
              "step": jax.ShapeDtypeStruct((), np.int32, sharding=NamedSharding(mesh, P()))}
  ckpt = manager_lib.CheckpointManager(directory, save_interval_steps=1)
  return ckpt, ckpt.restore_or_none(abstract)


def test_handler_sets_flag_and_survives_repeated_signals():
  with preemption.PreemptionHandler() as handler:
    assert not handler.should_stop(0)
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)  # would kill us with the default handler
    deadline = time.time() + 5
    while handler.signal_count < 2 and time.time() < deadline:
      time.sleep(0.01)
    assert handler.should_stop(1) and handler.signal_count == 2
  assert signal.getsignal(signal.SIGTERM) is not handler._on_signal  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="sync_every_steps"):
    preemption.PreemptionHandler(sync_every_steps=0)


def test_sigterm_saves_current_step_and_exits_zero_despite_second_signal(tmp_path):
  directory = str(tmp_path / "model")
  proc = _spawn("sigterm", directory)
  try:
    _read_until(proc, "STEP 4")
    proc.send_signal(signal.SIGTERM)
    _read_until(proc, "FINALIZING")          # the preemption save is committing
    proc.send_signal(signal.SIGTERM)          # a second signal mid-save
    line, _ = _read_until(proc, "EXIT")
    assert proc.wait(timeout=120) == 0, proc.stderr.read()[-3000:]
  finally:
    if proc.poll() is None:
      proc.kill()
  stopped_at = int(line.split()[1])
  assert stopped_at >= 5 and "signals=2" in line
  assert not [d for d in os.listdir(directory) if "tmp" in d]
  ckpt, (state, data_state) = _restore(directory)
  assert ckpt.latest_step() == stopped_at
  assert 3 in ckpt.all_steps()  # the regular interval save before it
  ckpt.close()
  assert data_state == {"step": stopped_at}
  np.testing.assert_array_equal(np.asarray(state["w"]), _expected_state(stopped_at)["w"])


def test_sigkill_mid_save_leaves_previous_checkpoint_and_run_resumes(tmp_path):
  directory = str(tmp_path / "model")
  proc = _spawn("sigkill", directory)
  try:
    _read_until(proc, "SAVED 1")
    _read_until(proc, "FINALIZING")   # step 2 is written, not yet committed
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
  finally:
    if proc.poll() is None:
      proc.kill()
  leftovers = [d for d in os.listdir(directory) if d.startswith("2.") and "tmp" in d]
  assert leftovers, os.listdir(directory)   # the killed save really was in flight
  # ... its data position included (item directories are temporary too).
  assert [d for d in os.listdir(os.path.join(directory, leftovers[0]))
          if d.startswith("data_iterator")]
  assert "2" not in os.listdir(directory)
  # A restart sees step 1 as the latest, restores it, and carries on.
  ckpt, (state, data_state) = _restore(directory)
  assert ckpt.latest_step() == 1 and data_state == {"step": 1}
  np.testing.assert_array_equal(np.asarray(state["w"]), _expected_state(1)["w"])
  mesh = partitioning.make_mesh({"data": 2, "expert": 4})
  w2 = jax.device_put(_expected_state(2)["w"], NamedSharding(mesh, P("data", "expert")))
  assert ckpt.save(2, {"w": w2, "step": jax.device_put(np.int32(2))}, {"step": 2})
  ckpt.close()
  assert not [d for d in os.listdir(directory) if "tmp" in d]
  ckpt, (state, data_state) = _restore(directory)
  assert ckpt.all_steps() == [1, 2] and data_state == {"step": 2}
  np.testing.assert_array_equal(np.asarray(state["w"]), _expected_state(2)["w"])
  ckpt.close()
