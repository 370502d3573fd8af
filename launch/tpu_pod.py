r"""Train on a Cloud TPU pod slice (or several slices) with one command.

  python -m launch.tpu_pod --project=my-proj --zone=us-central2-b \
      --accelerator_type=v4-32 --name=switch8 --model_dir=gs://my-bucket/switch8 \
      --gin_file=models/switch_base_8.gin --gin_file=runs/pretrain.gin \
      --gin.MIXTURE_OR_TASK_NAME=c4_span_corruption --gin.MESH_EXPERT=8

What the generated script does (``--dry_run`` prints it, nothing runs):

1. Finds or creates the TPU: one slice is a TPU VM (``gcloud compute tpus
   tpu-vm create``); ``--num_slices=N>1`` is a queued resource of N nodes
   (``NAME-0`` ... ``NAME-{N-1}``), waited for until ACTIVE. A preempted TPU
   (state PREEMPTED / SUSPENDED / FAILED) is deleted and created again.
2. Copies this checkout to every worker of every slice (``--worker=all``) and
   ``pip install``\ s it with ``jax[tpu]``.
3. Starts ``python -m moe_jax.train`` on all workers at once, detached
   (``nohup``; logs in ``~/moe-train.log`` on each worker). Each worker's JAX
   finds its peers itself (``jax.distributed.initialize()`` on a TPU pod).
   With several slices, ``--gin.DCN_MESH_<AXIS>=N`` puts the slice count on
   the ``--dcn_axis`` mesh axis (default ``data``).
4. Streams worker 0's log until training ends, then copies every worker's log
   to ``MODEL_DIR/logs/`` (skipped with ``--detach``).

Preemption: checkpoints live in ``--model_dir`` on GCS and ``moe-train``
resumes from the latest one, so after a preemption run the *same command*
again: the TPU is recreated and training continues from the last checkpoint.
``--delete`` tears the TPU (or queued resource) down and does nothing else.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from typing import Optional, Sequence

if not __package__:  # run as a file (python launch/tpu_pod.py): make `launch` importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from launch import common  # noqa: E402  pylint: disable=wrong-import-position

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REMOTE_DIR = "~/moe_jax"
REMOTE_LOG = "~/moe-train.log"
REMOTE_PID = "~/moe-train.pid"
JAX_TPU_REQUIREMENT = "jax[tpu]>=0.10.2,<0.11"
MESH_AXES = ("data", "fsdp", "expert", "model")

# Default TPU VM software version per TPU generation (accelerator prefix).
_RUNTIME_VERSIONS = (
    ("v6e", "v2-alpha-tpuv6e"),
    ("v5p", "v2-alpha-tpuv5"),
    ("v5litepod", "v2-alpha-tpuv5-lite"),
    ("v4", "tpu-ubuntu2204-base"),
    ("v3", "tpu-ubuntu2204-base"),
    ("v2", "tpu-ubuntu2204-base"),
)
_ACCELERATOR = re.compile(r"^v\d+[a-z]*-\d+$")


def default_runtime_version(accelerator_type: str) -> str:
  """The TPU VM image for an accelerator type such as ``v4-32``."""
  for prefix, version in _RUNTIME_VERSIONS:
    if accelerator_type.startswith(prefix + "-"):
      return version
  raise common.LaunchError(
      f"No default runtime version for --accelerator_type={accelerator_type}; "
      "pass --runtime_version=... (see `gcloud compute tpus versions list`).")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  gin_overrides, rest = common.split_gin_overrides(argv)
  parser = argparse.ArgumentParser(
      prog="launch.tpu_pod", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--project", help="Google Cloud project (required)")
  parser.add_argument("--zone", help="TPU zone, e.g. us-central2-b (required)")
  parser.add_argument("--accelerator_type",
                      help="TPU slice type, e.g. v4-32, v5p-64 (required)")
  parser.add_argument("--name", default="moe-jax",
                      help="TPU VM / queued resource name (also the node prefix)")
  parser.add_argument("--runtime_version", default=None,
                      help="TPU VM image; default chosen from the accelerator type")
  parser.add_argument("--num_slices", type=int, default=1,
                      help="slices; >1 uses a multi-slice queued resource")
  parser.add_argument("--dcn_axis", default="data", choices=MESH_AXES,
                      help="mesh axis spread over slices (its DCN_MESH_* = num_slices)")
  parser.add_argument("--model_dir", help="gs://BUCKET/PATH for checkpoints + logs (required)")
  common.add_gin_file_flag(parser)
  parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                      help="environment variable for moe-train on the workers "
                      "(repeatable), e.g. LIBTPU_INIT_ARGS=...")
  parser.add_argument("--spot", action="store_true", help="request Spot (preemptible) TPUs")
  parser.add_argument("--source_dir", default=REPO_ROOT,
                      help="checkout copied to the workers (default: this one)")
  parser.add_argument("--detach", action="store_true",
                      help="start training and return; do not stream/collect logs")
  parser.add_argument("--delete", action="store_true",
                      help="only tear down the TPU / queued resource")
  parser.add_argument("--dry_run", action="store_true",
                      help="print the commands instead of running them")
  args = parser.parse_args(rest)
  args.gin_overrides = gin_overrides
  return args


def validate(args: argparse.Namespace) -> None:
  """Raises :class:`common.LaunchError` naming missing or malformed settings."""
  required = {"--project": args.project, "--zone": args.zone}
  if not args.delete:
    required.update({"--accelerator_type": args.accelerator_type,
                     "--model_dir": args.model_dir})
  common.require(required, "a TPU job needs a project, a zone, a slice type and "
                 "a gs:// model directory")
  if args.accelerator_type and not _ACCELERATOR.match(args.accelerator_type):
    raise common.LaunchError(
        f"--accelerator_type={args.accelerator_type} is not a TPU type; use the "
        "form v4-32, v5litepod-16, v5p-128, v6e-64.")
  if not re.match(r"^[a-z]([-a-z0-9]*[a-z0-9])?$", args.name):
    raise common.LaunchError(
        f"--name={args.name} is not a valid TPU name: use lower-case letters, "
        "digits and '-', starting with a letter.")
  if args.num_slices < 1:
    raise common.LaunchError(f"--num_slices={args.num_slices} must be >= 1.")
  if args.delete:
    return
  if not args.model_dir.startswith("gs://"):
    raise common.LaunchError(
        f"--model_dir={args.model_dir} must be on GCS (gs://BUCKET/PATH): every "
        "worker writes checkpoints there and a restarted job resumes from it.")
  if not args.gin_file:
    raise common.LaunchError(
        "Missing --gin_file: give the model and run configs, e.g. "
        "--gin_file=models/switch_base_8.gin --gin_file=runs/pretrain.gin.")
  for item in args.env:
    if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", item):
      raise common.LaunchError(
          f"--env={item} must be KEY=VALUE with KEY a shell variable name.")


class _Gcloud:
  """Command lines for one project/zone."""

  def __init__(self, project: str, zone: str):
    self.where = [f"--zone={zone}", f"--project={project}"]

  def tpu_vm(self, verb: str, *args: str) -> str:
    return common.quote(["gcloud", "compute", "tpus", "tpu-vm", verb, *args, *self.where])

  def queued(self, verb: str, *args: str) -> str:
    return common.quote(["gcloud", "compute", "tpus", "queued-resources", verb, *args,
                         *self.where])


def node_names(name: str, num_slices: int) -> list[str]:
  """TPU VM names: ``[name]``, or the queued resource's ``name-0 ... name-{N-1}``."""
  return [name] if num_slices == 1 else [f"{name}-{i}" for i in range(num_slices)]


def _provision(args, g: _Gcloud) -> list[str]:
  spot = ["--spot"] if args.spot else []
  if args.num_slices == 1:
    describe = g.tpu_vm("describe", args.name, "--format=value(state)")
    return [
        "# 1. The TPU VM slice: reuse it, or (re)create it when absent or preempted.",
        f'state="$({describe} 2>/dev/null || true)"',
        'if [ "$state" = PREEMPTED ] || [ "$state" = TERMINATED ]; then',
        f"  {g.tpu_vm('delete', args.name, '--quiet')}",
        '  state=""',
        "fi",
        'if [ -z "$state" ]; then',
        "  " + g.tpu_vm("create", args.name, f"--accelerator-type={args.accelerator_type}",
                        f"--version={args.runtime_version}", *spot),
        "fi",
    ]
  describe = g.queued("describe", args.name, "--format=value(state.state)")
  return [
      f"# 1. A queued resource of {args.num_slices} slices (nodes {args.name}-0 ...): "
      "reuse, or (re)create when absent or preempted.",
      f'state="$({describe} 2>/dev/null || true)"',
      'if [ "$state" = SUSPENDED ] || [ "$state" = FAILED ]; then',
      f"  {g.queued('delete', args.name, '--force', '--quiet')}",
      '  state=""',
      "fi",
      'if [ -z "$state" ]; then',
      "  " + g.queued("create", args.name, f"--node-count={args.num_slices}",
                      f"--node-prefix={args.name}",
                      f"--accelerator-type={args.accelerator_type}",
                      f"--runtime-version={args.runtime_version}", *spot),
      "fi",
      f'until [ "$({describe})" = ACTIVE ]; do',
      f'  echo "waiting for queued resource {args.name} to become ACTIVE ..."',
      "  sleep 30",
      "done",
  ]


def _train_command(args) -> str:
  """The remote shell command that starts moe-train detached on one worker."""
  extra = []
  if args.num_slices > 1:
    extra.append(f"--gin.DCN_MESH_{args.dcn_axis.upper()}={args.num_slices}")
  train_args = common.moe_train_args(
      args.gin_file, extra + [f"--gin.MODEL_DIR={args.model_dir}"] + args.gin_overrides)
  env = " ".join(f"{k}={shlex.quote(v)}" for k, v in (e.split("=", 1) for e in args.env))
  launch = (f"{env + ' ' if env else ''}nohup python3 -m moe_jax.train "
            f"{common.quote(train_args)} > {REMOTE_LOG} 2>&1 < /dev/null &")
  stop_old = (f"if [ -f {REMOTE_PID} ]; then kill \"$(cat {REMOTE_PID})\" 2>/dev/null "
              "|| true; sleep 5; fi")
  # `$!` must be the trainer itself (not a subshell) for the stop/follow steps.
  return f"{stop_old}; cd {REMOTE_DIR} || exit 1; {launch} echo $! > {REMOTE_PID}"


def build_script(args: argparse.Namespace) -> str:
  """The whole job as one bash script (what ``--dry_run`` prints)."""
  g = _Gcloud(args.project, args.zone)
  if args.delete:
    if args.num_slices == 1:
      lines = [g.tpu_vm("delete", args.name, "--quiet")]
    else:
      lines = [g.queued("delete", args.name, "--force", "--quiet")]
    return common.script(["# Tear down.", *lines])

  nodes = node_names(args.name, args.num_slices)
  archive = f"/tmp/{args.name}-moe_jax-src.tgz"
  install = (f"mkdir -p {REMOTE_DIR} && tar -xzf ~/moe_jax-src.tgz -C {REMOTE_DIR} && "
             f"python3 -m pip install --quiet --upgrade {common.quote([JAX_TPU_REQUIREMENT])} "
             f"-e {REMOTE_DIR}")
  lines = _provision(args, g)
  lines += ["", "# 2. This checkout on every worker, installed with jax[tpu].",
            common.quote(["tar", "-czf", archive, "--exclude=./.git", "--exclude=./.venv",
                          "--exclude=*.egg-info", "--exclude=__pycache__",
                          "-C", args.source_dir, "."])]
  for node in nodes:
    lines.append(g.tpu_vm("scp", archive, f"{node}:moe_jax-src.tgz", "--worker=all"))
    lines.append(g.tpu_vm("ssh", node, "--worker=all", f"--command={install}"))
  lines += ["", "# 3. moe-train on all workers at once (resumes from the latest "
            "checkpoint in MODEL_DIR)."]
  for node in nodes:
    lines.append(g.tpu_vm("ssh", node, "--worker=all", f"--command={_train_command(args)}"))
  if not args.detach:
    follow = (f"tail --pid=\"$(cat {REMOTE_PID})\" -n +1 -F {REMOTE_LOG} 2>/dev/null")
    collect = (f"gcloud storage cp {REMOTE_LOG} "
               f"{args.model_dir.rstrip('/')}/logs/\"$(hostname)\".log")
    lines += ["", "# 4. Follow worker 0 until training ends; then every worker's log "
              "goes to MODEL_DIR/logs/.",
              g.tpu_vm("ssh", nodes[0], "--worker=0", f"--command={follow}") + " || true"]
    for node in nodes:
      lines.append(g.tpu_vm("ssh", node, "--worker=all", f"--command={collect}"))
  return common.script(lines)


def _main(argv: Sequence[str]) -> int:
  args = parse_args(argv)
  validate(args)
  if args.runtime_version is None and not args.delete:
    args.runtime_version = default_runtime_version(args.accelerator_type)
  return common.run_script(build_script(args), args.dry_run)


def main(argv: Optional[Sequence[str]] = None) -> int:
  return common.main_wrapper(_main, argv, "launch.tpu_pod")


if __name__ == "__main__":
  sys.exit(main())
