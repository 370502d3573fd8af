r"""Rehearse a multi-host run on one machine: N processes on 127.0.0.1.

  python -m launch.local --num_processes=2 --devices_per_process=4 -- \
      --gin_file=runs/quickstart.gin --gin.MODEL_DIR=/tmp/quickstart \
      --gin.MESH_EXPERT=4

Everything after ``--`` goes to ``moe-train`` (``python -m moe_jax.train``,
or the program given with ``--program``). Process ``i`` gets
``XLA_FLAGS=--xla_force_host_platform_device_count=M`` (M CPU devices),
``JAX_PLATFORMS=cpu``, ``PYTHONUNBUFFERED=1`` and ``MOE_JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT``,
``MOE_JAX_NUM_PROCESSES=N``, ``MOE_JAX_PROCESS_ID=i``, which
:mod:`moe_jax.training.multihost` turns into ``jax.distributed.initialize``
with gloo collectives: together the processes form one N*M-device mesh.

Every output line is prefixed ``[pI]`` and printed as it comes (and saved to
``--log_dir/process_I.log`` when given). When any process fails, the others
are stopped and the launcher exits with the failed process's code.
``--dry_run`` prints each process's exact command line and starts nothing.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO, Mapping, Optional, Sequence

if not __package__:  # run as a file (python launch/local.py): make `launch` importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from launch import common  # noqa: E402  pylint: disable=wrong-import-position

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def free_port() -> int:
  """An unused TCP port on 127.0.0.1 (for the coordinator)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  argv = list(argv)
  program_args: list[str] = []
  if "--" in argv:
    cut = argv.index("--")
    argv, program_args = argv[:cut], argv[cut + 1:]
  parser = argparse.ArgumentParser(
      prog="launch.local", description=__doc__.split("\n\n")[0],
      usage="python -m launch.local [options] -- <moe-train args>",
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--num_processes", type=int, required=True)
  parser.add_argument("--devices_per_process", type=int, default=1,
                      help="CPU devices each process exposes")
  parser.add_argument("--port", type=int, default=None,
                      help="coordinator port (default: a free one)")
  parser.add_argument("--program", default=None,
                      help="command each process runs (default: "
                      "'<this python> -m moe_jax.train')")
  parser.add_argument("--log_dir", default=None,
                      help="also write process_I.log files here")
  parser.add_argument("--timeout", type=float, default=None,
                      help="seconds before all processes are stopped (exit 124)")
  parser.add_argument("--dry_run", action="store_true",
                      help="print each process's command line; start nothing")
  args = parser.parse_args(argv)
  if args.num_processes < 1 or args.devices_per_process < 1:
    raise common.LaunchError(
        f"--num_processes={args.num_processes} and --devices_per_process="
        f"{args.devices_per_process} must both be >= 1.")
  args.program_args = program_args
  return args


def process_env(base: Mapping[str, str], process_id: int, num_processes: int,
                devices: int, port: int) -> dict[str, str]:
  """The environment of process ``process_id`` (only the keys we change).

  ``XLA_FLAGS`` keeps the caller's other flags and replaces any device count.
  With one process no coordinator is set (plain single-process run).
  """
  kept = [f for f in base.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_COUNT_FLAG)]
  env = {"XLA_FLAGS": " ".join(kept + [f"{DEVICE_COUNT_FLAG}={devices}"]),
         "JAX_PLATFORMS": "cpu",
         "PYTHONUNBUFFERED": "1"}  # lines reach the launcher as they are printed
  if num_processes > 1:
    env.update({"MOE_JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                "MOE_JAX_NUM_PROCESSES": str(num_processes),
                "MOE_JAX_PROCESS_ID": str(process_id)})
  return env


def commands(args: argparse.Namespace, base_env: Mapping[str, str],
             python: str = sys.executable) -> list[tuple[dict[str, str], list[str]]]:
  """``[(env changes, argv)]`` for every process."""
  program = shlex.split(args.program) if args.program else [python, "-m", "moe_jax.train"]
  return [(process_env(base_env, i, args.num_processes, args.devices_per_process, args.port),
           program + list(args.program_args))
          for i in range(args.num_processes)]


def format_command(env: Mapping[str, str], argv: Sequence[str]) -> str:
  """``env K=V ... argv`` as one shell line."""
  return common.quote(["env", *[f"{k}={v}" for k, v in env.items()], *argv])


def _pump(stream: IO[str], prefix: str, out: IO[str], log: Optional[IO[str]],
          lock: threading.Lock) -> None:
  for line in iter(stream.readline, ""):
    with lock:
      out.write(prefix + line)
      out.flush()
      if log is not None:
        log.write(line)
        log.flush()
  stream.close()


def _stop(procs: Sequence[subprocess.Popen], grace: float = 10.0) -> None:
  """SIGTERM to each still-running process group we started, then SIGKILL."""
  alive = [p for p in procs if p.poll() is None]
  for p in alive:
    try:
      os.killpg(p.pid, signal.SIGTERM)
    except ProcessLookupError:
      pass
  deadline = time.monotonic() + grace
  for p in alive:
    try:
      p.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      try:
        os.killpg(p.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
      p.wait()


class _Terminated(Exception):
  """The launcher got SIGTERM (e.g. from a scheduler or a test)."""


def _on_sigterm(signum, frame):  # pylint: disable=unused-argument
  raise _Terminated()


def run(args: argparse.Namespace, out: Optional[IO[str]] = None) -> int:
  """Starts every process, relays output, returns the job's exit code.

  0 when all succeed; otherwise the exit code of the first process that
  failed (the others are stopped); 124 when ``--timeout`` ran out; 130 / 143
  when the launcher is interrupted / terminated (all processes are stopped).
  """
  out = out or sys.stdout
  base_env = dict(os.environ)
  if args.port is None:
    args.port = free_port()
  cmds = commands(args, base_env)
  if args.dry_run:
    for env, argv in cmds:
      out.write(format_command(env, argv) + "\n")
    return 0
  if args.log_dir:
    os.makedirs(args.log_dir, exist_ok=True)
  lock = threading.Lock()
  procs, threads, logs = [], [], []
  previous_handler = None
  if threading.current_thread() is threading.main_thread():
    previous_handler = signal.signal(signal.SIGTERM, _on_sigterm)
  try:
    for i, (env, argv) in enumerate(cmds):
      log = (open(os.path.join(args.log_dir, f"process_{i}.log"), "w")
             if args.log_dir else None)
      logs.append(log)
      proc = subprocess.Popen(argv, env={**base_env, **env}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              text=True, start_new_session=True)
      procs.append(proc)
      t = threading.Thread(target=_pump, args=(proc.stdout, f"[p{i}] ", out, log, lock),
                           daemon=True)
      t.start()
      threads.append(t)
    code = _wait(procs, args.timeout, out, lock)
  except KeyboardInterrupt:
    code = 130
  except _Terminated:
    code = 143
  finally:
    if previous_handler is not None:
      signal.signal(signal.SIGTERM, previous_handler)
    _stop(procs)
    for t in threads:
      t.join(timeout=5)
    for log in logs:
      if log is not None:
        log.close()
  return code


def _wait(procs: Sequence[subprocess.Popen], timeout: Optional[float], out: IO[str],
          lock: threading.Lock) -> int:
  deadline = None if timeout is None else time.monotonic() + timeout
  while True:
    codes = [p.poll() for p in procs]
    failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
    if failed:
      i, code = failed[0]
      code = code if code > 0 else 128 - code  # killed by signal -code
      with lock:
        out.write(f"[launch.local] process {i} exited with code {code}; stopping "
                  "the others.\n")
      return code
    if all(c == 0 for c in codes):
      return 0
    if deadline is not None and time.monotonic() > deadline:
      with lock:
        out.write(f"[launch.local] timeout after {timeout}s; stopping all processes.\n")
      return 124
    time.sleep(0.2)


def _main(argv: Sequence[str]) -> int:
  return run(parse_args(argv))


def main(argv: Optional[Sequence[str]] = None) -> int:
  return common.main_wrapper(_main, argv, "launch.local")


if __name__ == "__main__":
  sys.exit(main())
