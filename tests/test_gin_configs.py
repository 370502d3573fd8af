"""Every shipped gin file parses, finalizes, and runs init + one train step.

Each file gets a tiny-size override (d_model 16, one layer per stack, 4
experts, float32 activations) and the required run macros. XLA compilation
dominates on CPU (about a minute per model on the shared 2-core box), so one
file per model family (dense, tokens-choose MoE, experts-choose MoE) is
initialized and trained for one real step; every other file has its init
traced (``jax.eval_shape``) and its sharded train step traced and lowered
(everything but XLA's compile). Every
file is parsed, finalized, validated and built on its own.
"""

import glob
import math
import os

import gin
import pytest

from moe_jax import gin_utils, train

GIN_DIR = gin_utils.GIN_CONFIGS_DIR
ALL_FILES = sorted(os.path.relpath(p, GIN_DIR)
                   for p in glob.glob(os.path.join(GIN_DIR, "**", "*.gin"), recursive=True))

TINY = [
    "T5Config.vocab_size = 128", "T5Config.d_model = 16", "T5Config.num_heads = 2",
    "T5Config.d_kv = 8", "T5Config.d_ff = 32", "T5Config.num_encoder_layers = 1",
    "T5Config.num_decoder_layers = 1", "ACTIVATION_DTYPE = 'float32'",
    "NUM_EXPERTS = 4", "MoeConfig.d_ff = 32", "MoeConfig.group_size = 64",
    "SparseLayout.kind = 'all'",
    # Device-limited routing needs more experts per group than 4 leave
    # (tests/test_modern_routing.py covers it).
    "MoeConfig.routing_groups = 0",
]
RUN = [
    "MODEL_DIR = None", "MIXTURE_OR_TASK_NAME = 'synthetic_translate_mix'",
    "INITIAL_CHECKPOINT_PATH = None", "TRAIN_STEPS = 1", "BATCH_SIZE = 8",
    "TASK_FEATURE_LENGTHS = {'inputs': 8, 'targets': 8}", "EVAL_PERIOD = 0",
    "MESH_DATA = -1", "MESH_EXPERT = 4",
]
_RESULTS = {}


def test_every_directory_is_covered():
  assert any(f.startswith("models/") for f in ALL_FILES)
  assert {"runs/pretrain.gin", "runs/finetune.gin", "runs/continue_pretrain.gin",
          "runs/eval.gin", "runs/infer.gin", "runs/quickstart.gin"} <= set(ALL_FILES)
  for name in ("t5_1_1_small", "t5_1_1_xxl", "mt5_xl", "switch_base_8", "switch_base_128",
               "switch_large_128", "st_moe_base", "switch_base_8_experts_choose",
               "switch_base_8_top2", "tiny_switch", "tiny_dense"):
    assert f"models/{name}.gin" in ALL_FILES


@pytest.mark.parametrize("gin_file", ALL_FILES)
def test_gin_file_inits_and_trains_one_step(gin_file):
  files = [gin_file]
  if gin_file.startswith("models/"):
    files.append("runs/pretrain.gin")
  elif gin_file != "runs/quickstart.gin":
    files.insert(0, "models/tiny_switch.gin")
  gin_utils.parse_gin(files, TINY + RUN)
  exp = train.configured_experiment()
  cfg = exp.model_config
  family = "dense" if cfg.moe is None else cfg.moe.router_type
  if family not in _RESULTS:
    metrics = exp.init_and_step()
    _RESULTS[family] = metrics
    assert math.isfinite(metrics["loss"]) and metrics["loss"] > 0
    assert math.isfinite(metrics["param_norm"])
    if cfg.moe is not None:
      assert any(k.startswith("moe/") for k in metrics)
  else:
    lowered = exp.lower_step()
    assert "func.func public @main" in lowered.as_text()
