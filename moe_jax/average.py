r"""``moe-average``: the mean of several checkpoints of one run, for decoding.

  moe-average --model_dir=/tmp/run --last=4 --output=/tmp/run/average_last4
  moe-average --model_dir=/tmp/run --steps=3000,3500,4000 --output=/tmp/avg
  moe-eval --gin_file=runs/eval.gin --gin.CHECKPOINT_PATH=/tmp/avg/checkpoint ...

Writes ``OUTPUT/checkpoint`` (a params-only Orbax checkpoint: the element-wise
mean of the chosen steps' params, see :mod:`moe_jax.checkpoints.averaging`),
``OUTPUT/config.gin`` and ``model_config.json`` (the run's, so ``moe-eval`` finds the model without a
model gin file) and ``OUTPUT/averaging.json`` (the steps averaged). An
existing ``OUTPUT/checkpoint`` is refused unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import Optional, Sequence

from moe_jax import gin_utils


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="moe-average", description=__doc__.split("\n\n")[0])
  p.add_argument("--model_dir", required=True, help="a moe-train run directory")
  p.add_argument("--last", type=int, default=0, help="average the last N saved steps")
  p.add_argument("--steps", default="", help="or these steps, comma-separated")
  p.add_argument("--output", required=True)
  p.add_argument("--overwrite", action="store_true")
  return p.parse_args(argv)


def run(args: argparse.Namespace, log_fn=print) -> dict:
  from moe_jax.checkpoints import averaging  # pylint: disable=g-import-not-at-top
  try:
    steps = [int(s) for s in args.steps.split(",") if s.strip()]
  except ValueError as e:
    raise gin_utils.UsageError(f"--steps={args.steps!r}: write steps as 3000,3500.") from e
  try:
    steps = averaging.choose_steps(args.model_dir, args.last, steps)
  except ValueError as e:
    raise gin_utils.UsageError(str(e)) from e
  ckpt = os.path.join(args.output, "checkpoint")
  if os.path.exists(ckpt) and not args.overwrite:
    raise gin_utils.UsageError(f"{ckpt} exists; pass --overwrite to replace it.")
  os.makedirs(args.output, exist_ok=True)
  ckpt = averaging.write_average(averaging.step_paths(args.model_dir, steps), ckpt)
  config = gin_utils.find_run_config(os.path.join(args.model_dir, str(steps[-1])))
  if config:  # the run's model for moe-eval / moe-infer without a model gin file
    for name in (os.path.basename(config), "model_config.json"):
      source = os.path.join(os.path.dirname(config), name)
      if os.path.isfile(source):
        shutil.copyfile(source, os.path.join(args.output, name))
  summary = averaging.describe(args.model_dir, steps, ckpt, config)
  with open(os.path.join(args.output, "averaging.json"), "w") as f:
    json.dump(summary, f, indent=1)
  log_fn(f"moe-average: {ckpt}: the mean of steps {steps} of {args.model_dir}")
  return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  def go():
    run(parse_args(argv))
  return gin_utils.run_cli("moe-average", go, errors=(ValueError, FileNotFoundError))


def console_main() -> None:
  sys.exit(main())


if __name__ == "__main__":
  console_main()
