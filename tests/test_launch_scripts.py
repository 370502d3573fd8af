"""TPU-pod and SLURM launchers: golden dry runs, shell syntax, refusals.

The dry-run text *is* the script a real run executes (``bash -c``), so the
golden files under ``tests/golden/launch/`` pin the exact gcloud / sbatch
commands. Regenerate after an intended change with
``MOE_JAX_UPDATE_GOLDEN=1 python -m pytest tests/test_launch_scripts.py``
and review the diff. No gcloud or sbatch is ever run here.
"""

import contextlib
import io
import os
import shlex
import shutil
import subprocess

import sys

import pytest

# launch/ is run from the checkout, not installed: make it importable however pytest starts.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from launch import common, slurm, tpu_pod  # noqa: E402  pylint: disable=wrong-import-position

GOLDEN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "launch")

TPU_BASE = ["--project=my-project", "--zone=us-central2-b", "--accelerator_type=v4-32",
            "--name=switch8", "--model_dir=gs://my-bucket/switch8", "--source_dir=.",
            "--gin_file=models/switch_base_8.gin", "--gin_file=runs/pretrain.gin",
            "--gin.MIXTURE_OR_TASK_NAME=c4_span_corruption", "--gin.MESH_EXPERT=8"]
SLURM_BASE = ["--nodes=2", "--gpus_per_node=8", "--partition=a100", "--account=research",
              "--model_dir=/shared/runs/switch8", "--workdir=/shared/moe_jax",
              "--venv=/shared/venv", "--gin_file=models/switch_base_8.gin",
              "--gin_file=runs/pretrain.gin", "--gin.MIXTURE_OR_TASK_NAME=c4_span_corruption",
              "--gin.MESH_EXPERT=8"]

CASES = {
    "tpu_pod_single_slice": (tpu_pod, TPU_BASE + ["--dry_run"]),
    "tpu_pod_multislice": (tpu_pod, TPU_BASE + ["--num_slices=2", "--spot", "--dry_run",
                                                "--env=LIBTPU_INIT_ARGS=--xla_tpu_a=1 --b=2"]),
    "tpu_pod_delete": (tpu_pod, ["--project=my-project", "--zone=us-central2-b",
                                 "--name=switch8", "--delete", "--dry_run"]),
    "slurm_per_gpu": (slurm, SLURM_BASE + ["--dry_run"]),
    "slurm_per_node": (slurm, SLURM_BASE + ["--process_per=node", "--job_name=s8",
                                            "--time=02:00:00", "--dry_run"]),
}


def _dry_run(module, argv):
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    assert module.main(argv) == 0
  return out.getvalue()


def _script_of(name, text):
  """The bash script in a dry run's output (SLURM prints a submit line after it)."""
  if name.startswith("slurm"):
    return text.split("# ---- submit ----")[0].split("----\n", 1)[1]
  return text


@pytest.mark.parametrize("name", sorted(CASES))
def test_dry_run_matches_golden(name):
  module, argv = CASES[name]
  text = _dry_run(module, argv)
  path = os.path.join(GOLDEN_DIR, name + ".txt")
  if os.environ.get("MOE_JAX_UPDATE_GOLDEN"):
    os.makedirs(GOLDEN_DIR, exist_ok=True)
    with open(path, "w") as f:
      f.write(text)
  with open(path) as f:
    assert text == f.read(), f"dry run of {name} changed; see the module docstring"


@pytest.mark.parametrize("name", sorted(CASES))
def test_generated_shell_is_valid(name, tmp_path):
  module, argv = CASES[name]
  script = tmp_path / "job.sh"
  script.write_text(_script_of(name, _dry_run(module, argv)))
  check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
  assert check.returncode == 0, check.stderr
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck not installed (apt-get install shellcheck)")
  check = subprocess.run(["shellcheck", "-s", "bash", "-S", "warning", str(script)],
                         capture_output=True, text=True)
  assert check.returncode == 0, check.stdout


def _commands(text):
  """Non-comment lines of a script, split like the shell would split them."""
  return [shlex.split(line) for line in text.splitlines()
          if line.strip() and not line.lstrip().startswith("#")
          and not line.startswith(("if ", "fi", "until ", "done", "state=", "  state="))]


def test_tpu_pod_runs_moe_train_on_every_worker_with_passthrough_flags():
  text = _dry_run(tpu_pod, TPU_BASE + ["--num_slices=2", "--dry_run"])
  ssh = [c for c in _commands(text) if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]]
  starts = [c for c in ssh if any("moe_jax.train" in a for a in c)]
  assert [c[5] for c in starts] == ["switch8-0", "switch8-1"]  # one per slice
  for c in starts:
    assert "--worker=all" in c and "--zone=us-central2-b" in c and "--project=my-project" in c
    remote = shlex.split(next(a for a in c if a.startswith("--command="))[len("--command="):])
    train = remote[remote.index("moe_jax.train") + 1:]
    assert train[:2] == ["--gin_file=models/switch_base_8.gin", "--gin_file=runs/pretrain.gin"]
    assert "--gin.MODEL_DIR=gs://my-bucket/switch8" in train
    assert "--gin.DCN_MESH_DATA=2" in train  # slices -> dcn mesh size
    assert "--gin.MIXTURE_OR_TASK_NAME=c4_span_corruption" in train
    # user overrides come after the launcher's, so they win in gin
    assert train.index("--gin.MESH_EXPERT=8") > train.index("--gin.DCN_MESH_DATA=2")
  for c in ssh:  # what runs on the workers is valid shell too
    remote = next(a for a in c if a.startswith("--command="))[len("--command="):]
    check = subprocess.run(["bash", "-n", "-c", remote], capture_output=True, text=True)
    assert check.returncode == 0, (remote, check.stderr)
  create = [c for c in _commands(text) if "create" in c]
  assert len(create) == 1 and "--node-count=2" in create[0] and "--node-prefix=switch8" in create[0]
  assert "--runtime-version=tpu-ubuntu2204-base" in create[0]


def test_slurm_script_sets_up_jax_distributed_from_slurm():
  text = slurm.render(slurm.parse_args(SLURM_BASE))
  assert "#SBATCH --ntasks-per-node=8" in text and "#SBATCH --nodes=2" in text
  assert ('COORDINATOR_HOST="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"'
          in text)
  assert 'MOE_JAX_NUM_PROCESSES="$SLURM_NTASKS"' in text
  assert 'MOE_JAX_PROCESS_ID="$SLURM_PROCID"' in text
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in text
  assert 'CUDA_VISIBLE_DEVICES="$SLURM_LOCALID"' in text
  per_node = slurm.render(slurm.parse_args(SLURM_BASE + ["--process_per=node"]))
  assert "#SBATCH --ntasks-per-node=1" in per_node and "CUDA_VISIBLE_DEVICES" not in per_node


def test_slurm_script_runs_and_passes_arguments(tmp_path):
  """Runs the generated script with stub srun/scontrol standing in for SLURM."""
  args = slurm.parse_args(SLURM_BASE + [f"--workdir={tmp_path}", "--venv="])
  script = tmp_path / "job.sbatch"
  script.write_text(slurm.render(args))
  bindir = tmp_path / "bin"
  bindir.mkdir()
  (bindir / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-node-7\\ngpu-node-8\\n'\n")
  # Stub srun: run the task command once as task 3 (local id 1) and print its env.
  (bindir / "srun").write_text(
      "#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\n"
      "export SLURM_PROCID=3 SLURM_LOCALID=1\nexec \"$@\"\n")
  (bindir / "python").write_text(
      "#!/bin/sh\necho \"COORD=$MOE_JAX_COORDINATOR_ADDRESS N=$MOE_JAX_NUM_PROCESSES "
      "ID=$MOE_JAX_PROCESS_ID GPU=$CUDA_VISIBLE_DEVICES\"\necho \"ARGS=$*\"\n")
  for f in bindir.iterdir():
    f.chmod(0o755)
  env = {"PATH": f"{bindir}:/usr/bin:/bin", "SLURM_JOB_NODELIST": "gpu-node-[7-8]",
         "SLURM_NTASKS": "16"}
  done = subprocess.run(["bash", str(script), "--gin.TRAIN_STEPS=7"], env=env,
                        capture_output=True, text=True, cwd=tmp_path)
  assert done.returncode == 0, done.stderr
  assert "COORD=gpu-node-7:12345 N=16 ID=3 GPU=1" in done.stdout
  assert ("ARGS=-m moe_jax.train --gin_file=models/switch_base_8.gin "
          "--gin_file=runs/pretrain.gin --gin.MODEL_DIR=/shared/runs/switch8 "
          "--gin.MIXTURE_OR_TASK_NAME=c4_span_corruption --gin.MESH_EXPERT=8 "
          "--gin.TRAIN_STEPS=7") in done.stdout


@pytest.mark.parametrize("module, argv, names", [
    (tpu_pod, ["--gin_file=a.gin"], ["--project", "--zone", "--accelerator_type",
                                     "--model_dir"]),
    (tpu_pod, ["--project=p", "--zone=z", "--gin_file=a.gin"],
     ["--accelerator_type", "--model_dir"]),
    (tpu_pod, ["--project=p", "--zone=z", "--accelerator_type=v4-8",
               "--model_dir=/local/dir", "--gin_file=a.gin"], ["gs://BUCKET/PATH"]),
    (tpu_pod, ["--project=p", "--zone=z", "--accelerator_type=tpu32",
               "--model_dir=gs://b/x", "--gin_file=a.gin"], ["v4-32"]),
    (tpu_pod, ["--project=p", "--zone=z", "--accelerator_type=v4-8",
               "--model_dir=gs://b/x"], ["--gin_file"]),
    (tpu_pod, ["--delete"], ["--project", "--zone"]),
    (slurm, ["--gin_file=a.gin"], ["--model_dir"]),
    (slurm, ["--model_dir=/m"], ["--gin_file"]),
    (slurm, ["--model_dir=/m", "--gin_file=a.gin", "--env=1X=2"], ["KEY=VALUE"]),
])
def test_missing_or_bad_settings_are_refused_by_name(capsys, module, argv, names):
  assert module.main(argv + ["--dry_run"]) == 2
  captured = capsys.readouterr()
  assert captured.out == ""  # nothing printed as if it would run
  for name in names:
    assert name in captured.err


def test_runtime_version_defaults_and_gin_passthrough_parsing():
  assert tpu_pod.default_runtime_version("v5p-128") == "v2-alpha-tpuv5"
  assert tpu_pod.default_runtime_version("v5litepod-16") == "v2-alpha-tpuv5-lite"
  assert tpu_pod.default_runtime_version("v6e-64") == "v2-alpha-tpuv6e"
  with pytest.raises(common.LaunchError, match="--runtime_version"):
    tpu_pod.default_runtime_version("v9z-8")
  overrides, rest = common.split_gin_overrides(["--gin.A=1", "--x", "--gin.B='s t'"])
  assert overrides == ["--gin.A=1", "--gin.B='s t'"] and rest == ["--x"]
  with pytest.raises(common.LaunchError, match="--gin.NAME=VALUE"):
    common.split_gin_overrides(["--gin.A"])
