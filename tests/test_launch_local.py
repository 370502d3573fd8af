"""launch.local: N processes on 127.0.0.1 form one JAX job.

Process handling is checked with trivial Python payloads; the training test
runs the real ``moe-train`` binary as 2 processes x 4 CPU devices and
compares its losses with one process x 8 devices fed the same global
batches, then restarts the job and checks it resumes from its checkpoint.
"""

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# launch/ is run from the checkout, not installed: make it importable however pytest starts.
sys.path.insert(0, REPO)
from launch import local  # noqa: E402  pylint: disable=wrong-import-position
GOLDEN = os.path.join(REPO, "tests", "golden", "launch", "local_dry_run.txt")


def _launch(argv):
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    code = local.main(argv)
  return code, out.getvalue()


def _payload(code):
  return "--program=" + shlex.join([sys.executable, "-c", code])


def test_dry_run_matches_golden(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_thunk_runtime=true "
                     "--xla_force_host_platform_device_count=8")
  code, text = _launch(["--num_processes=2", "--devices_per_process=4", "--port=4321",
                        "--program=python -m moe_jax.train", "--dry_run", "--",
                        "--gin_file=runs/quickstart.gin", "--gin.MODEL_DIR=/tmp/q",
                        "--gin.MESH_EXPERT=4"])
  assert code == 0
  if os.environ.get("MOE_JAX_UPDATE_GOLDEN"):
    with open(GOLDEN, "w") as f:
      f.write(text)
  with open(GOLDEN) as f:
    assert text == f.read()
  # Independent checks of what each process gets.
  lines = [shlex.split(l) for l in text.splitlines()]
  for i, argv in enumerate(lines):
    env = dict(a.split("=", 1) for a in argv[1:7])
    assert env == {"XLA_FLAGS": "--xla_cpu_use_thunk_runtime=true "
                                "--xla_force_host_platform_device_count=4",
                   "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
                   "MOE_JAX_COORDINATOR_ADDRESS": "127.0.0.1:4321",
                   "MOE_JAX_NUM_PROCESSES": "2", "MOE_JAX_PROCESS_ID": str(i)}
    assert argv[7:] == ["python", "-m", "moe_jax.train", "--gin_file=runs/quickstart.gin",
                        "--gin.MODEL_DIR=/tmp/q", "--gin.MESH_EXPERT=4"]


def test_default_program_is_moe_train_and_one_process_has_no_coordinator():
  args = local.parse_args(["--num_processes=1", "--devices_per_process=8", "--port=1",
                           "--", "--gin_file=a.gin"])
  [(env, argv)] = local.commands(args, {})
  assert argv == [sys.executable, "-m", "moe_jax.train", "--gin_file=a.gin"]
  assert env == {"XLA_FLAGS": "--xla_force_host_platform_device_count=8",
                 "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
  assert _launch(["--num_processes=0", "--dry_run"])[0] == 2


def test_processes_run_with_prefixed_output_and_logs(tmp_path):
  code, text = _launch([
      "--num_processes=2", "--devices_per_process=3", f"--log_dir={tmp_path}",
      _payload("import os; print('id', os.environ['MOE_JAX_PROCESS_ID'], 'of', "
               "os.environ['MOE_JAX_NUM_PROCESSES'], os.environ['XLA_FLAGS'].split()[-1])")])
  assert code == 0
  flag = "--xla_force_host_platform_device_count=3"
  assert f"[p0] id 0 of 2 {flag}" in text.splitlines()
  assert f"[p1] id 1 of 2 {flag}" in text.splitlines()
  assert (tmp_path / "process_1.log").read_text() == f"id 1 of 2 {flag}\n"


def test_one_failure_stops_the_others_and_sets_the_exit_code(tmp_path):
  pid_file = tmp_path / "p0.pid"
  code, text = _launch([
      "--num_processes=2", "--timeout=240",
      _payload("import os, sys, time\n"
               f"path = {str(pid_file)!r}\n"
               "if os.environ['MOE_JAX_PROCESS_ID'] == '0':\n"
               "  open(path + '.tmp', 'w').write(str(os.getpid())); os.rename(path + '.tmp', path)\n"
               "  time.sleep(600)\n"
               "while not os.path.exists(path): time.sleep(0.1)\n"
               "print('failing'); sys.exit(3)\n")])
  assert code == 3
  assert "[p1] failing" in text and "process 1 exited with code 3" in text
  pid = int(pid_file.read_text())
  with pytest.raises(ProcessLookupError):  # process 0 was stopped, not left running
    os.kill(pid, 0)


def test_terminating_the_launcher_stops_its_processes(tmp_path):
  code = ("import os, time\n"
          f"d = {str(tmp_path)!r}\n"
          "p = os.path.join(d, os.environ['MOE_JAX_PROCESS_ID'])\n"
          "open(p + '.tmp', 'w').write(str(os.getpid())); os.rename(p + '.tmp', p + '.pid')\n"
          "time.sleep(600)\n")
  launcher = subprocess.Popen(
      [sys.executable, "-m", "launch.local", "--num_processes=2", _payload(code)],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    pid_files = [tmp_path / "0.pid", tmp_path / "1.pid"]
    for _ in range(1200):
      if all(f.exists() for f in pid_files) or launcher.poll() is not None:
        break
      time.sleep(0.1)
    assert all(f.exists() for f in pid_files)
  finally:
    launcher.terminate()
    launcher.communicate(timeout=60)
  assert launcher.returncode == 143
  for f in pid_files:
    with pytest.raises(ProcessLookupError):
      os.kill(int(f.read_text()), 0)


def test_timeout_stops_everything():
  code, text = _launch(["--num_processes=2", "--timeout=1",
                        _payload("import time; time.sleep(600)")])
  assert code == 124 and "timeout" in text


# ---------------------------------------------------------------------------
# The real binary: 2 x 4 devices vs 1 x 8, then a restart that resumes.

BINDINGS = {
    "BATCH_SIZE": "8", "TASK_FEATURE_LENGTHS": "{'inputs': 16, 'targets': 16}",
    "LOG_PERIOD": "1", "EVAL_PERIOD": "0", "CHECKPOINT_PERIOD": "100", "MESH_EXPERT": "4",
    "train.measure_peak_flops": "False", "train.tensorboard": "False",
    # The schedule must not depend on TRAIN_STEPS, which the restart changes.
    "make_schedule.warmup_steps": "2", "make_schedule.decay_steps": "100",
}
_LOSS_LINE = re.compile(r"^\[p0\] \[train\] step\s+(\d+)\s+loss (\S+)")


def _train_flags(model_dir, steps):
  return (["--gin_file=runs/quickstart.gin", f"--gin.MODEL_DIR={model_dir}",
           f"--gin.TRAIN_STEPS={steps}"]
          + [f"--gin.{k}={v}" for k, v in BINDINGS.items()])


def _start_launcher(model_dir, steps):
  # No persistent compilation cache: a cache hit in one process and a miss in
  # the other skews them past gloo's 30 s rendezvous timeout.
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.Popen(
      [sys.executable, "-m", "launch.local", "--num_processes=2", "--devices_per_process=4",
       "--timeout=900", "--", *_train_flags(model_dir, steps)],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc):
  out, _ = proc.communicate(timeout=1000)
  assert proc.returncode == 0, out[-4000:]
  losses = {int(m.group(1)): float(m.group(2))
            for m in map(_LOSS_LINE.match, out.splitlines()) if m}
  return losses, out


def _reference_losses(steps):
  """One process, 8 devices, the same global batches (both data shards stacked)."""
  from moe_jax import gin_utils, train  # pylint: disable=g-import-not-at-top
  from moe_jax.data import train_iterator  # pylint: disable=g-import-not-at-top
  from moe_jax.training import loop  # pylint: disable=g-import-not-at-top
  gin_utils.parse_gin(["runs/quickstart.gin"], ["MODEL_DIR = None", f"TRAIN_STEPS = {steps}"] + [
      f"{k} = {v}" for k, v in BINDINGS.items()])
  exp = train.configured_experiment()
  shards = [train_iterator.get_train_iterator(
      exp.mixture_or_task_name, exp.task_feature_lengths, exp.batch_size,
      seed=exp.data_seed, pack=exp.pack, model_type=exp.model_type,
      shard_index=i, num_shards=2) for i in range(2)]

  def global_batches():  # process i supplies rows [4i, 4i + 4) of each batch
    while True:
      parts = [next(s) for s in shards]
      yield {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  result = loop.train(exp.layout, global_batches(), exp.loop_config,
                      loss_cfg=exp.loss_config, schedule=exp.schedule, model_dir=None,
                      log_fn=lambda _: None, step_factory=exp._jitted_step)  # pylint: disable=protected-access
  return result.losses


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
  """A 3-step 2 x 4 job launched while the 1 x 8 reference (5 steps) trains."""
  model_dir = tmp_path_factory.mktemp("launch_local") / "model"
  first = _start_launcher(model_dir, 3)
  try:
    reference = _reference_losses(5)
  except BaseException:
    first.terminate()                       # the launcher stops its processes
    first.communicate(timeout=60)
    raise
  losses, out = _finish(first)
  return model_dir, losses, out, reference


@pytest.mark.slow  # end-to-end; pytest -m slow
def test_two_processes_train_like_one(first_run):
  model_dir, losses, out, reference = first_run
  assert sorted(losses) == [1, 2, 3], out[-3000:]
  np.testing.assert_allclose([losses[s] for s in (1, 2, 3)], reference[:3], atol=2e-3)
  assert os.path.isdir(model_dir) and "Resumed" not in out


@pytest.mark.slow  # end-to-end; pytest -m slow
def test_restarted_job_resumes_from_its_checkpoint(first_run):
  model_dir, _, _, reference = first_run
  losses, out = _finish(_start_launcher(model_dir, 5))   # restart, longer run
  assert f"Resumed from {model_dir} at step 3." in out, out[-3000:]
  assert sorted(losses) == [4, 5], out[-3000:]
  np.testing.assert_allclose([losses[4], losses[5]], reference[3:5], atol=2e-3)
