r"""The Multi30k experiments of ``docs/experiments.md``.

  python -m moe_jax.experiments.multi30k --suite regularization --out /tmp/exp
  python -m moe_jax.experiments.multi30k --suite all --markdown docs/experiments_results.md

Every run is ``moe-train --gin_file=runs/multi30k_tiny.gin`` (a tiny top-2
MoE T5 v1.1 on the six Multi30k directions) plus the gin overrides of one
method, so each row of a table is reproduced by one command line (printed as
it runs and stored in ``OUT/results.jsonl``). A 2,000-piece SentencePiece
vocabulary trained on the Multi30k training text (``moe-train-vocab``) keeps
a run at a few minutes on a 2-core CPU.

Suites:
  regularization  issue 10: baseline vs each regularization method, 2 seeds.
  variants        issue 11: baseline vs each routing/architecture variant.
  upcycling       issue 8: dense continuation vs sparse upcycling, same extra steps.
  pruning         issue 9: BLEU vs fraction of experts kept, global vs per-language.
  modern          issue 17: aux-loss-free balancing, shared + fine-grained experts,
                  device-limited routing vs the top-2 baseline (3 seeds).
"""

from __future__ import annotations

import argparse
import os
import shutil
from typing import Sequence

from moe_jax.experiments import runner as runner_lib

GIN = "runs/multi30k_tiny.gin"
VOCAB_PIECES = 2000
# 2,000 pieces + 100 extra ids, padded to a multiple of 128.
BASE = ("T5Config.vocab_size=2176",)
STEPS = 300
UPCYCLE_DENSE_STEPS, UPCYCLE_EXTRA_STEPS = 600, 300
PRUNING_MODEL_STEPS = 1200
EVAL_STEPS = 4  # x batch 32 = 128 examples per direction for loss and BLEU

# name -> (extra gin files, overrides). Paper defaults where the paper has one.
REGULARIZATION = {
    "baseline": ((), ()),
    "expert_dropout": ((), ("T5Config.dropout_rate=0.1", "MoeConfig.expert_dropout_rate=0.4")),
    "gating_dropout": ((), ("MoeConfig.gating_dropout_rate=0.2",
                            "MoeConfig.gating_dropout_mode='gate_expert_drop'")),
    "eom": ((), ("MoeConfig.expert_output_masking_rate=0.2",)),
    "fom": ((), ("MoeConfig.final_output_masking_rate=0.2",)),
    "random_token_selection": ((), ("MoeConfig.priority='random'",)),
    "moec": ((), ("MoeConfig.num_expert_clusters=2",
                  "MoeConfig.cluster_expert_dropout_rate=0.1",
                  "LossConfig.cluster_loss_factor=0.01")),
    "cmr": ((), ("SparseLayout.conditional_routing=@ConditionalRoutingConfig()",)),
    # en<->de and en<->fr first; the Czech pairs join for the last third.
    "curriculum": (("runs/multi30k_curriculum.gin",), ("CURRICULUM_LATE_START=200",)),
}

MOS_STUDENT = ("NUM_EXPERTS=4", "T5Config.d_ff=128", "MoeConfig.d_ff=128")

VARIANTS = {
    # The same run as baseline_s0, repeated next to the variants so that the
    # step-time ratios compare runs taken in one quiet stretch of the machine.
    "variants_baseline": ((), ()),
    # Anneal over the first half of the run (the paper anneals over its warm-up).
    "dense_to_sparse_gate": ((), ("MoeConfig.router_type='dense_to_sparse'",
                                  "MoeConfig.dts_anneal_steps=150")),
    "bilevel": ((), ("MoeConfig.bilevel_outer_size=2",)),
    "residual_moe": ((), ("SparseLayout.residual=True", "MoeConfig.num_selected_experts=1")),
    "pyramid": ((), ("SparseLayout.kind='all'", "encoder/SparseLayout.num_experts=(4, 8)",
                     "decoder/SparseLayout.num_experts=(4, 8)")),
    # Encoder experts chosen by the source language, decoder experts by the target.
    "task_routing": ((), ("MoeConfig.routing_level='task'", "MoeConfig.num_route_ids=7",
                          "MoeConfig.dropless=True", "RouteIdTable.level='language'")),
    "shared_core_experts": ((), ("MoeConfig.shared_core_rank=16",)),
    # Mixture-of-Students: a half-width student (4 experts, d_ff 128) trained
    # alone vs distilled from the baseline (teacher) for the first 2/3 of the run.
    "mos_student": ((), MOS_STUDENT),
    "mos_student_distilled": ((), MOS_STUDENT + (
        "train.distillation=@DistillationConfig()",
        "DistillationConfig.teacher_checkpoint='$OUT/baseline_s0'",
        "DistillationConfig.stop_step=200")),
}


# Issue 17: the routing of today's models against the top-2 baseline, at equal
# active FLOPs (baseline 8 experts x d_ff 256, top-2 = 512 hidden units per
# token; fine-grained 32 x 64, top-6 + one shared 128 = 512). LOG_PERIOD 25
# records the max-expert-load curve; "no_balancing" (no aux loss, no bias)
# is the curve aux-loss-free balancing must beat.
MODERN = {
    "modern_baseline": ((), ("LOG_PERIOD=25",)),
    "no_balancing": ((), ("LOG_PERIOD=25", "LossConfig.aux_loss_factor=0.0")),
    "aux_loss_free": ((), ("LOG_PERIOD=25", "LossConfig.aux_loss_factor=0.0",
                           "MoeConfig.expert_bias_update_rate=0.001")),
    "shared_fine_grained": ((), ("LOG_PERIOD=25", "NUM_EXPERTS=32", "MoeConfig.d_ff=64",
                                 "MoeConfig.num_selected_experts=6",
                                 "MoeConfig.num_shared_experts=1",
                                 "MoeConfig.shared_expert_d_ff=128")),
    "device_limited": ((), ("LOG_PERIOD=25", "NUM_EXPERTS=32", "MoeConfig.d_ff=64",
                            "MoeConfig.num_selected_experts=6",
                            "MoeConfig.num_shared_experts=1",
                            "MoeConfig.shared_expert_d_ff=128",
                            "MoeConfig.routing_groups=8",
                            "MoeConfig.routing_groups_per_token=3")),
}


def _runner(out: str, dry_run: bool) -> runner_lib.Runner:
  vocab = os.path.join(out, f"multi30k_bpe{VOCAB_PIECES}.model")
  r = runner_lib.Runner(out, env={"MOE_JAX_DATA_DIR": runner_lib.default_data_dir(),
                                  "MOE_JAX_MULTI30K_VOCAB": vocab}, dry_run=dry_run)
  if not dry_run:
    r.train_vocab(vocab, "multi30k_translate_mix", VOCAB_PIECES)
  return r


def _train_overrides(seed: int, steps: int, extra: Sequence[str] = (),
                     eval_period: int = 0) -> list[str]:
  return [*BASE, f"SEED={seed}", f"TRAIN_STEPS={steps}", f"EVAL_PERIOD={eval_period or steps}",
          f"EVAL_STEPS={EVAL_STEPS}", f"CHECKPOINT_PERIOD={steps}", *extra]


def run_methods(r: runner_lib.Runner, methods: dict, seeds: Sequence[int], steps: int,
                only: Sequence[str] = ()) -> list[dict]:
  rows = []
  for name, (gins, overrides) in methods.items():
    if only and name not in only:
      continue
    for seed in seeds:
      try:
        overrides = [o.replace("$OUT", r.out_dir) for o in overrides]
        rows.append(r.train(f"{name}_s{seed}", [GIN, *gins],
                            _train_overrides(seed, steps, overrides)))
      except RuntimeError as e:  # report and go on with the other methods
        print(f"!! {name} seed {seed} failed: {str(e)[-1500:]}", flush=True)
  return rows


def run_upcycling(r: runner_lib.Runner, dense_steps: int, extra_steps: int) -> None:
  total = dense_steps + extra_steps
  dense = ["T5Config.moe=None", "SparseLayout.kind='none'",
           f"make_schedule.decay_steps={total}"]
  period = extra_steps // 2
  r.train("dense_pretrain", [GIN], _train_overrides(0, dense_steps, dense, period))
  dense_dir = os.path.join(r.out_dir, "dense_pretrain")
  cont_dir = os.path.join(r.out_dir, "dense_continue")
  if "dense_continue" not in r.records() and not r.dry_run:
    shutil.rmtree(cont_dir, ignore_errors=True)
    shutil.copytree(dense_dir, cont_dir)
  r.train("dense_continue", [GIN], _train_overrides(0, total, dense, period),
          model_dir=cont_dir)
  up_dir = os.path.join(r.out_dir, "upcycled")
  r.run_tool("upcycle", "upcycle", [
      f"--dense_checkpoint={os.path.join(dense_dir, str(dense_steps))}",
      "--format=moe_jax", f"--gin_file={GIN}", *[f"--gin_bindings={b}" for b in BASE],
      f"--output={up_dir}", "--overwrite", "--optimizer_state=reset", "--verify"])
  r.train("upcycled_continue", [GIN, os.path.join(up_dir, "upcycled_model.gin")],
          _train_overrides(0, total, [f"make_schedule.decay_steps={total}"], period),
          model_dir=up_dir)


def run_pruning(r: runner_lib.Runner, model_run: str, steps: int,
                fractions: Sequence[float] = (0.5, 0.25)) -> None:
  model_dir = os.path.join(r.out_dir, model_run)
  stats = os.path.join(model_dir, "eval_decode", str(steps), "routing_stats.json")
  eval_gin = ["runs/eval.gin", GIN]
  common = [*BASE, f"EVAL_MAX_EXAMPLES={EVAL_STEPS * 32}", "EVAL_BATCH_SIZE=32"]
  r.evaluate("prune_keep1.0", eval_gin, [*common, f"CHECKPOINT_PATH='{model_dir}'",
                                          "MIXTURE_OR_TASK_NAME='multi30k_translate_mix'"],
             os.path.join(r.out_dir, "prune_keep1.0"))
  for keep in fractions:
    out = os.path.join(r.out_dir, f"prune_global_{keep}")
    r.run_tool(f"prune_global_{keep}_write", "prune", [
        f"--gin_file={GIN}", *[f"--gin_bindings={b}" for b in BASE],
        f"--checkpoint={model_dir}", f"--stats={stats}", f"--keep={keep}",
        "--granularity=global", f"--output={out}"])
    r.evaluate(f"prune_global_{keep}", [*eval_gin, os.path.join(out, "pruned.gin")],
               [*common, "MIXTURE_OR_TASK_NAME='multi30k_translate_mix'"],
               os.path.join(out, "eval"))
    out = os.path.join(r.out_dir, f"prune_language_{keep}")
    r.run_tool(f"prune_language_{keep}_write", "prune", [
        f"--gin_file={GIN}", *[f"--gin_bindings={b}" for b in BASE],
        f"--checkpoint={model_dir}", f"--stats={stats}", f"--keep={keep}",
        "--granularity=language", "--all_pairs", f"--output={out}"])
    for pair_dir in sorted(os.listdir(out)) if os.path.isdir(out) else ():
      src, tgt = pair_dir.split("_")
      r.evaluate(f"prune_language_{keep}_{pair_dir}",
                 [*eval_gin, os.path.join(out, pair_dir, "pruned.gin")],
                 [*common, f"MIXTURE_OR_TASK_NAME='multi30k_translate_{src}_{tgt}'"],
                 os.path.join(out, pair_dir, "eval"))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--suite", required=True,
                 choices=("regularization", "variants", "upcycling", "pruning", "modern",
                          "all"))
  p.add_argument("--out", default="/tmp/moe_jax_experiments")
  p.add_argument("--seeds", default="0,1")
  p.add_argument("--steps", type=int, default=STEPS)
  p.add_argument("--only", default="", help="comma-separated method names")
  p.add_argument("--dry_run", action="store_true")
  args = p.parse_args(argv)
  r = _runner(args.out, args.dry_run)
  seeds = [int(s) for s in args.seeds.split(",")]
  only = [s for s in args.only.split(",") if s]
  suites = ([args.suite] if args.suite != "all"
            else ["regularization", "pruning", "upcycling", "variants"])
  for suite in suites:
    if suite == "regularization":
      run_methods(r, REGULARIZATION, seeds, args.steps, only)
    elif suite == "variants":
      run_methods(r, VARIANTS, seeds[:1], args.steps, only)
    elif suite == "modern":
      run_methods(r, MODERN, seeds, args.steps, only)
    elif suite == "upcycling":
      run_upcycling(r, UPCYCLE_DENSE_STEPS, UPCYCLE_EXTRA_STEPS)
    elif suite == "pruning":
      r.train("pruning_model", [GIN], _train_overrides(0, PRUNING_MODEL_STEPS))
      run_pruning(r, "pruning_model", PRUNING_MODEL_STEPS)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
