r"""Train on a GPU cluster: write a SLURM batch script and submit it.

  python -m launch.slurm --nodes=4 --gpus_per_node=8 --partition=a100 \
      --model_dir=/shared/runs/switch8 \
      --gin_file=models/switch_base_8.gin --gin_file=runs/pretrain.gin \
      --gin.MIXTURE_OR_TASK_NAME=c4_span_corruption --gin.MESH_EXPERT=8

The script runs one ``moe-train`` process per GPU (``--process_per=gpu``,
each task sees only ``CUDA_VISIBLE_DEVICES=$SLURM_LOCALID``) or one per node
(``--process_per=node``, all the node's GPUs). Every task learns the
coordinator (the first host of ``$SLURM_JOB_NODELIST``), the process count
(``$SLURM_NTASKS``) and its id (``$SLURM_PROCID``) through the
``MOE_JAX_*`` variables that :mod:`moe_jax.training.multihost` reads, and
``jax.distributed.initialize`` connects them. XLA flags that help GPU
collectives (latency-hiding scheduler, collective combining) are set;
replace them with ``--xla_flags``.

The job is ``--requeue``-able: ``moe-train`` resumes from the latest
checkpoint in ``--model_dir`` (a file system every node sees, or gs://), so a
preempted or requeued job, or the same script submitted again, continues.
Arguments given to ``sbatch SCRIPT ...`` after the script are passed on to
``moe-train`` (e.g. ``--gin.TRAIN_STEPS=2000``). ``--dry_run`` prints the
script and the ``sbatch`` command and writes nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from typing import Optional, Sequence

if not __package__:  # run as a file (python launch/slurm.py): make `launch` importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from launch import common  # noqa: E402  pylint: disable=wrong-import-position

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Flags commonly used for collective performance on NVIDIA GPUs.
DEFAULT_XLA_FLAGS = (
    "--xla_gpu_enable_latency_hiding_scheduler=true "
    "--xla_gpu_all_reduce_combine_threshold_bytes=134217728 "
    "--xla_gpu_all_gather_combine_threshold_bytes=134217728 "
    "--xla_gpu_reduce_scatter_combine_threshold_bytes=67108864")
DEFAULT_ENV = (("NCCL_DEBUG", "WARN"), ("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9"))


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  gin_overrides, rest = common.split_gin_overrides(argv)
  parser = argparse.ArgumentParser(
      prog="launch.slurm", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--job_name", default="moe-train")
  parser.add_argument("--nodes", type=int, default=1)
  parser.add_argument("--gpus_per_node", type=int, default=8)
  parser.add_argument("--process_per", choices=("gpu", "node"), default="gpu",
                      help="one moe-train process per GPU or per node")
  parser.add_argument("--partition", default=None)
  parser.add_argument("--account", default=None)
  parser.add_argument("--time", default="24:00:00", help="wall-clock limit HH:MM:SS")
  parser.add_argument("--cpus_per_task", type=int, default=None)
  parser.add_argument("--port", type=int, default=12345, help="coordinator port")
  parser.add_argument("--model_dir", help="checkpoints; shared by all nodes (required)")
  common.add_gin_file_flag(parser)
  parser.add_argument("--workdir", default=REPO_ROOT,
                      help="checkout the job runs in (default: this one)")
  parser.add_argument("--venv", default=None,
                      help="virtual environment to activate on every node")
  parser.add_argument("--xla_flags", default=DEFAULT_XLA_FLAGS)
  parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                      help="extra environment variable (repeatable)")
  parser.add_argument("--script_out", default=None,
                      help="where the batch script is written (default JOB_NAME.sbatch)")
  parser.add_argument("--dry_run", action="store_true",
                      help="print the script and the sbatch command; write/submit nothing")
  args = parser.parse_args(rest)
  args.gin_overrides = gin_overrides
  args.script_out = args.script_out or f"{args.job_name}.sbatch"
  return args


def validate(args: argparse.Namespace) -> None:
  common.require({"--model_dir": args.model_dir},
                 "a directory every node can read and write, for checkpoints")
  if not args.gin_file:
    raise common.LaunchError(
        "Missing --gin_file: give the model and run configs, e.g. "
        "--gin_file=models/switch_base_8.gin --gin_file=runs/pretrain.gin.")
  if args.nodes < 1 or args.gpus_per_node < 1:
    raise common.LaunchError(
        f"--nodes={args.nodes} and --gpus_per_node={args.gpus_per_node} must be >= 1.")
  if not re.match(r"^\d+(-\d+)?(:\d+){0,2}$", args.time):
    raise common.LaunchError(f"--time={args.time} is not a SLURM time; use HH:MM:SS.")
  for item in args.env:
    if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", item):
      raise common.LaunchError(
          f"--env={item} must be KEY=VALUE with KEY a shell variable name.")


def render(args: argparse.Namespace) -> str:
  """The batch script (``#SBATCH`` header + body)."""
  per_gpu = args.process_per == "gpu"
  header = [f"#SBATCH --job-name={args.job_name}",
            f"#SBATCH --nodes={args.nodes}",
            f"#SBATCH --ntasks-per-node={args.gpus_per_node if per_gpu else 1}",
            f"#SBATCH --gpus-per-node={args.gpus_per_node}"]
  if args.cpus_per_task:
    header.append(f"#SBATCH --cpus-per-task={args.cpus_per_task}")
  if args.partition:
    header.append(f"#SBATCH --partition={args.partition}")
  if args.account:
    header.append(f"#SBATCH --account={args.account}")
  header += [f"#SBATCH --time={args.time}", "#SBATCH --exclusive", "#SBATCH --requeue",
             "#SBATCH --output=%x-%j.out"]

  env = list(DEFAULT_ENV) + [tuple(e.split("=", 1)) for e in args.env]
  train_args = common.moe_train_args(
      args.gin_file, [f"--gin.MODEL_DIR={args.model_dir}"] + args.gin_overrides)
  task = ['export MOE_JAX_PROCESS_ID="$SLURM_PROCID"']
  if per_gpu:
    task.append('export CUDA_VISIBLE_DEVICES="$SLURM_LOCALID"')
  task.append('exec python -m moe_jax.train "$@"')
  lines = [
      "# The coordinator is the first node; every task connects to it.",
      'COORDINATOR_HOST="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
      f'export MOE_JAX_COORDINATOR_ADDRESS="$COORDINATOR_HOST:{args.port}"',
      'export MOE_JAX_NUM_PROCESSES="$SLURM_NTASKS"',
      "",
      "# GPU collectives.",
      f"export XLA_FLAGS={shlex.quote(args.xla_flags)}",
      *[f"export {k}={shlex.quote(v)}" for k, v in env],
      "",
      f"cd {shlex.quote(args.workdir)}",
  ]
  if args.venv:
    lines.append(f"source {shlex.quote(os.path.join(args.venv, 'bin', 'activate'))}")
  lines += [
      "",
      f"# {'One process per GPU' if per_gpu else 'One process per node'}; a failed "
      "task ends the job step. Extra sbatch arguments go to moe-train.",
      "srun --kill-on-bad-exit=1 --label bash -c "
      + shlex.quote("; ".join(task)) + " moe-train \\",
      f"  {common.quote(train_args)} \"$@\"",
  ]
  return common.script(lines, header="\n".join(header))


def _main(argv: Sequence[str]) -> int:
  args = parse_args(argv)
  validate(args)
  text = render(args)
  submit = common.quote(["sbatch", args.script_out])
  if args.dry_run:
    sys.stdout.write(f"# ---- {args.script_out} ----\n{text}# ---- submit ----\n{submit}\n")
    return 0
  with open(args.script_out, "w") as f:
    f.write(text)
  os.chmod(args.script_out, 0o755)
  print(f"Wrote {args.script_out}; submitting.")
  return common.run_script(submit, dry_run=False)


def main(argv: Optional[Sequence[str]] = None) -> int:
  return common.main_wrapper(_main, argv, "launch.slurm")


if __name__ == "__main__":
  sys.exit(main())
