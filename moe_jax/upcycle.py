r"""``moe-upcycle``: turn a dense T5 v1.1 checkpoint into an MoE checkpoint.

  moe-upcycle --dense_checkpoint=/ckpts/t5_1_1_base/checkpoint_1000000 \
      --format=auto --gin_file=runs/sparse_upcycle.gin --gin.NUM_EXPERTS=32 \
      --output=/tmp/upcycled [--router_init=normal] [--expert_noise=0.0] \
      [--optimizer_state=reset] [--verify] [--mesh=data=2,expert=4]

Flags:
  --dense_checkpoint  dense T5 v1.1: moe_jax Orbax dir, T5X checkpoint dir or
                      Hugging Face dir (config.json + safetensors).
  --format            auto | moe_jax | t5x | hf.
  --gin_file / --gin.NAME=VALUE / --gin_bindings / --gin_search_paths
                      as moe-train. The gin gives the MoE settings (and the
                      optimizer of the continued run); the checkpoint gives the
                      dimensions, and for a moe_jax checkpoint its run's
                      model_config.json / config.gin the settings shapes cannot
                      tell (activations, dropout, epsilon, dtypes; a T5Config
                      binding wins). A dimension the gin sets differently from
                      the checkpoint is an error naming both values.
  --log_level         the libraries' log level (default ERROR).
  --output            new directory (written to a temporary sibling, renamed
                      when complete; an existing non-empty directory is refused
                      unless --overwrite).
  --router_init       normal (MoeConfig.router_init_stddev, 0.02) | zeros.
  --expert_noise      std of multiplicative noise on expert copies (0: exact).
  --optimizer_state   reset (fresh statistics, schedule continues) | carry
                      (dense Adafactor slots broadcast to experts; needs a
                      moe_jax checkpoint written with the same optimizer).
  --verify            compare dense and upcycled logits; exit 1 on failure.
  --mesh              device mesh, e.g. "data=2,expert=4" (default: as many
                      devices on 'expert' as the expert count allows).
  --seed              router / noise / train RNG seed.

The output is a moe-train model directory (``<step>/state``, ``<step>/data_state``)
plus ``upcycled_model.gin`` (the full MoE model config) and ``upcycle.json``
(what was done, verify figures). Continue training with::

  moe-train --gin_file=runs/sparse_upcycle.gin \
      --gin_file=/tmp/upcycled/upcycled_model.gin --gin.MODEL_DIR=/tmp/upcycled ...

Exit codes: 0 ok, 1 verify failed, 2 bad flags/config/checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
from typing import Any, Optional, Sequence

from moe_jax import gin_utils
from moe_jax.gin_utils import UsageError

EXIT_VERIFY_FAILED = 1
EXIT_USAGE = gin_utils.EXIT_USAGE


# ----------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------
def parse_flags(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="moe-upcycle",
      description="Sparse upcycling: dense T5 v1.1 checkpoint -> MoE checkpoint.")
  parser.add_argument("--dense_checkpoint", required=True)
  parser.add_argument("--format", default="auto",
                      choices=("auto", "moe_jax", "t5x", "hf"))
  gin_utils.add_gin_flags(parser)
  parser.add_argument("--output", required=True)
  parser.add_argument("--overwrite", action="store_true")
  parser.add_argument("--router_init", default="normal", choices=("normal", "zeros"))
  parser.add_argument("--expert_noise", type=float, default=0.0)
  parser.add_argument("--optimizer_state", default="reset", choices=("reset", "carry"))
  parser.add_argument("--verify", action="store_true")
  parser.add_argument("--mesh", default=None)
  parser.add_argument("--seed", type=int, default=0)
  bindings, rest = gin_utils.split_gin_flags(argv)
  try:
    args = parser.parse_args(rest)
  except SystemExit as e:
    raise UsageError("see the usage above.") from e
  if not args.gin_file:
    raise UsageError("Give --gin_file=runs/sparse_upcycle.gin (MoE settings), or a "
                     "full sparse model gin whose dimensions match the checkpoint.")
  if args.expert_noise < 0 or not math.isfinite(args.expert_noise):
    raise UsageError(f"--expert_noise={args.expert_noise} must be a finite number >= 0.")
  args.bindings = list(args.gin_bindings) + bindings
  return args


# ----------------------------------------------------------------------------
# Gin -> sparse config
# ----------------------------------------------------------------------------
def _gin_bound(selector: str) -> tuple[bool, Any]:
  """``(is_bound, value)`` of a gin parameter, macros resolved."""
  import gin  # pylint: disable=g-import-not-at-top
  try:
    value = gin.query_parameter(selector)
  except ValueError:
    return False, None
  seen = 0
  while (isinstance(value, gin.config.ConfigurableReference)
         and value.configurable.name == "macro" and seen < 20):
    macro = value.scoped_selector.split("/")[0]
    value = gin.query_parameter(f"{macro}/macro.value")
    seen += 1
  return True, value


def sparse_config_from_gin(dense_config) -> tuple[Any, Any]:
  """``(dense_config, sparse_config)``: checkpoint dimensions + gin's MoE settings.

  The dense config takes gin's ``T5Config.activations`` when bound (shapes
  cannot tell gelu from silu).

  Raises:
    UsageError: a gin-bound dimension contradicts the checkpoint (naming
      both values), or the gin has no MoE settings.
  """
  from moe_jax.checkpoints import upcycling  # pylint: disable=g-import-not-at-top
  checks = [(f"T5Config.{f}", getattr(dense_config, f)) for f in upcycling.DIMENSION_FIELDS]
  checks.append(("MoeConfig.d_ff", dense_config.d_ff))
  for selector, want in checks:
    bound, value = _gin_bound(selector)
    if bound and value != want:
      raise UsageError(
          f"{selector} = {value!r} in the gin configuration contradicts the dense "
          f"checkpoint's {want!r}. Remove the binding (the checkpoint sets model "
          "dimensions) or upcycle a checkpoint of that size.")
  for selector in ("T5Config.activations", "MoeConfig.activations"):
    bound, value = _gin_bound(selector)
    if bound and len(tuple(value)) != len(dense_config.activations):
      raise UsageError(
          f"{selector} = {tuple(value)} contradicts the dense checkpoint's "
          f"{'gated' if len(dense_config.activations) == 2 else 'plain'} MLP "
          f"({dense_config.activations}).")
  overrides = {}
  bound, value = _gin_bound("T5Config.activations")
  activations = tuple(value) if bound else tuple(dense_config.activations)
  for f in ("relative_attention_max_distance", "layer_norm_epsilon"):
    bound_f, _ = _gin_bound(f"T5Config.{f}")
    if not bound_f:
      overrides[f] = getattr(dense_config, f)
  dims = {f: getattr(dense_config, f) for f in upcycling.DIMENSION_FIELDS}
  try:
    settings = gin_utils.register_configurables()["T5Config"](
        activations=activations, **dims, **overrides)
  except (ValueError, TypeError) as e:
    raise UsageError(f"Bad MoE settings in the gin configuration: {e}") from e
  if not settings.has_moe:
    raise UsageError(
        "The gin configuration has no MoE settings (T5Config.moe and sparse "
        "layouts). Add "
        "--gin_file=runs/sparse_upcycle.gin or bind T5Config.moe = @MoeConfig() "
        "and the sparse layouts.")
  dense_config = dataclasses.replace(dense_config, activations=activations)
  sparse = upcycling.sparse_config_from_dense(dense_config, settings)
  try:
    upcycling.check_configs(dense_config, sparse)
  except upcycling.UpcycleError as e:
    raise UsageError(str(e)) from e
  return dense_config, sparse


# T5Config fields the parameter shapes cannot tell.
RUN_SETTING_FIELDS = ("activations", "dropout_rate", "layer_norm_epsilon",
                      "relative_attention_max_distance", "dtype", "param_dtype")


def _dense_run_settings(args: argparse.Namespace, log) -> dict[str, Any]:
  """For a moe_jax dense checkpoint: the fields of :data:`RUN_SETTING_FIELDS`
  from the run that wrote it (its ``model_config.json`` or ``config.gin``);
  ``{}`` for other formats or when the run left no config. T5Config bindings
  in the given gin files still win (:func:`sparse_config_from_gin`)."""
  from moe_jax.checkpoints import formats  # pylint: disable=g-import-not-at-top
  try:
    fmt = (formats.detect_format(args.dense_checkpoint) if args.format == "auto"
           else args.format)
  except formats.DenseFormatError as e:
    raise UsageError(f"Cannot read the dense checkpoint: {e}") from e
  if fmt != "moe_jax":
    return {}
  found = gin_utils.run_model_config(args.dense_checkpoint)
  if found is None:
    return {}
  config, path = found
  log(f"moe-upcycle: dense model settings ({', '.join(RUN_SETTING_FIELDS)}) from "
      f"{path}; T5Config bindings in --gin_file win.")
  return {f: getattr(config, f) for f in RUN_SETTING_FIELDS}


def default_mesh_shape(num_experts: int, num_devices: int) -> dict[str, int]:
  """All devices on 'expert' as far as the expert count divides, the rest on 'data'."""
  expert = math.gcd(num_experts, num_devices)
  return {"data": num_devices // expert, "expert": expert}


def model_gin(config) -> str:
  """Gin bindings that rebuild ``config`` (the upcycled MoE model) exactly."""
  lines = ["# The upcycled MoE model (written by moe-upcycle). Give it to moe-train",
           "# AFTER runs/sparse_upcycle.gin so these exact values win.",
           "MODEL_CONFIG = @T5Config()"]
  for f in dataclasses.fields(config):
    if f.name in ("moe", "encoder_moe", "decoder_moe", "encoder_layout",
                  "decoder_layout"):
      continue
    lines.append(f"T5Config.{f.name} = {getattr(config, f.name)!r}")
  for scope in ("encoder", "decoder"):  # per-stack MoE configs (scoped MoeConfig)
    own = getattr(config, f"{scope}_moe")
    lines.append(f"T5Config.{scope}_moe = "
                 + ("None" if own is None else f"@{scope}/MoeConfig()"))
    if own is not None:
      lines += [f"{scope}/MoeConfig.{f.name} = {getattr(own, f.name)!r}"
                for f in dataclasses.fields(own)]
  lines += ["T5Config.encoder_layout = @encoder/SparseLayout()",
            "T5Config.decoder_layout = @decoder/SparseLayout()"]
  if config.moe is None:
    lines.append("T5Config.moe = None")
  else:
    lines += ["T5Config.moe = @MoeConfig()",
              f"NUM_EXPERTS = {config.moe.num_experts}",
              "MoeConfig.num_experts = %NUM_EXPERTS"]
    lines += [f"MoeConfig.{f.name} = {getattr(config.moe, f.name)!r}"
              for f in dataclasses.fields(config.moe) if f.name != "num_experts"]
  for scope, layout in (("encoder", config.encoder_layout),
                        ("decoder", config.decoder_layout)):
    for f in dataclasses.fields(layout):
      value = getattr(layout, f.name)
      if dataclasses.is_dataclass(value):  # e.g. conditional_routing
        name = type(value).__name__
        lines.append(f"{scope}/SparseLayout.{f.name} = @{scope}/{name}()")
        lines += [f"{scope}/{name}.{g.name} = {getattr(value, g.name)!r}"
                  for g in dataclasses.fields(value)]
      else:
        lines.append(f"{scope}/SparseLayout.{f.name} = {value!r}")
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------
# The conversion
# ----------------------------------------------------------------------------
def _dense_opt_state(ckpt, dense_config, tx, partitioner):
  """The dense train state's optimizer state (for ``--optimizer_state=carry``)."""
  from moe_jax import models  # pylint: disable=g-import-not-at-top
  from moe_jax.checkpoints import manager, restore  # pylint: disable=g-import-not-at-top
  from moe_jax.training import train_state  # pylint: disable=g-import-not-at-top
  if ckpt.state_dir is None:
    raise UsageError(
        f"--optimizer_state=carry needs a moe_jax checkpoint with optimizer state; "
        f"a {ckpt.format!r} checkpoint has none here. Use --optimizer_state=reset.")
  shapes = train_state.dummy_batch(
      partitioner.num_batch_shards, {"inputs": 2, "targets": 2})
  layout = train_state.StateLayout.create(
      models.build_model(dense_config), tx, partitioner, shapes)
  step_dir = os.path.dirname(ckpt.state_dir.rstrip("/"))
  mgr = manager.CheckpointManager(os.path.dirname(step_dir), async_save=False)
  try:
    state, _ = mgr.restore(int(os.path.basename(step_dir)), layout.abstract,
                           layout.shardings)
  except restore.CheckpointMismatchError as e:
    raise UsageError(
        f"Cannot carry the optimizer state: {e}\nThe gin optimizer must be the one "
        "the dense model was trained with; or use --optimizer_state=reset.") from e
  finally:
    mgr.close()
  return state.opt_state


def upcycle(args: argparse.Namespace, log=print) -> int:
  """Runs the conversion described by parsed flags; returns the exit code."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from moe_jax import partitioning  # pylint: disable=g-import-not-at-top
  from moe_jax.checkpoints import formats, upcycling  # pylint: disable=g-import-not-at-top
  from moe_jax.training import train_state  # pylint: disable=g-import-not-at-top

  output = os.path.abspath(args.output)
  if os.path.exists(output) and os.listdir(output) and not args.overwrite:
    raise UsageError(f"--output {output} exists and is not empty; choose a new "
                     "directory or pass --overwrite.")
  overrides = _dense_run_settings(args, log)   # before parsing: it uses gin too
  gin_utils.parse_gin(args.gin_file, args.bindings, args.gin_search_paths,
                      finalize=False)
  try:
    ckpt = formats.read_dense_checkpoint(args.dense_checkpoint, args.format,
                                         **overrides)
  except (formats.DenseFormatError, FileNotFoundError, KeyError, ValueError) as e:
    raise UsageError(f"Cannot read the dense checkpoint: {e}") from e
  dense_config, sparse_config = sparse_config_from_gin(ckpt.config)
  expert_counts = [m.num_experts for m in sparse_config.moe_configs()]
  num_experts = expert_counts[0] if len(set(expert_counts)) == 1 else expert_counts
  log(f"moe-upcycle: dense T5 ({ckpt.format}, step {ckpt.step}): d_model "
      f"{dense_config.d_model}, d_ff {dense_config.d_ff}, layers "
      f"{dense_config.num_encoder_layers}+{dense_config.num_decoder_layers}; MoE "
      f"layers encoder {sparse_config.encoder_layout.sparse_layers(sparse_config.num_encoder_layers)}"
      f" decoder {sparse_config.decoder_layout.sparse_layers(sparse_config.num_decoder_layers)}"
      f", {num_experts} experts.")

  n_dev = jax.device_count()
  shape = (partitioning.parse_mesh_spec(args.mesh) if args.mesh
           else default_mesh_shape(math.gcd(*expert_counts), n_dev))
  try:
    partitioner = partitioning.Partitioner.create(shape, fsdp_params=True)
  except ValueError as e:
    raise UsageError(f"--mesh: {e} (jax sees {n_dev} devices).") from e
  tx = gin_utils.register_configurables()["make_optimizer"]()

  try:
    params = upcycling.upcycle_params(
        ckpt.params, dense_config, sparse_config, partitioner,
        router_init=args.router_init, expert_noise=args.expert_noise, seed=args.seed)
    _, param_sh = upcycling.abstract_params(sparse_config, partitioner)
    dense_opt = (_dense_opt_state(ckpt, dense_config, tx, partitioner)
                 if args.optimizer_state == "carry" else None)
    opt_state = upcycling.upcycle_opt_state(
        tx, params, param_sh, partitioner, mode=args.optimizer_state, step=ckpt.step,
        dense_opt_state=dense_opt)
  except upcycling.UpcycleError as e:
    raise UsageError(str(e)) from e
  _, train_key = jax.random.split(jax.random.PRNGKey(args.seed))
  state = train_state.TrainState(step=jnp.asarray(ckpt.step, jnp.int32), params=params,
                                 opt_state=opt_state, rng=train_key, tx=tx)

  result = None
  if args.verify:
    result = upcycling.verify(ckpt.params, dense_config, params, sparse_config,
                              partitioner, seed=args.seed)
    log(result.summary())

  info = {"dense_checkpoint": os.path.abspath(args.dense_checkpoint),
          "format": ckpt.format, "step": ckpt.step,
          "router_init": args.router_init, "expert_noise": args.expert_noise,
          "optimizer_state": args.optimizer_state,
          "mesh": dict(partitioner.mesh.shape),
          "num_experts": num_experts,
          "sparse_layers": {
              "encoder": list(sparse_config.encoder_layout.sparse_layers(
                  sparse_config.num_encoder_layers)),
              "decoder": list(sparse_config.decoder_layout.sparse_layers(
                  sparse_config.num_decoder_layers))}}
  if result is not None:
    info["verify"] = dict(dataclasses.asdict(result), passed=result.passed)
  write_atomically(output, state, ckpt.step, sparse_config, info,
                   overwrite=args.overwrite)
  log(f"moe-upcycle: wrote {output} (step {ckpt.step}). Continue with: moe-train "
      f"--gin_file=runs/sparse_upcycle.gin --gin_file={output}/upcycled_model.gin "
      f"--gin.MODEL_DIR={output} ...")
  if result is not None and not result.passed:
    return EXIT_VERIFY_FAILED
  return 0


def write_atomically(output: str, state: Any, step: int, config: Any, info: dict,
                     overwrite: bool = False) -> None:
  """Writes checkpoint, model gin + JSON and info into a temporary sibling,
  then renames it to ``output``."""
  from moe_jax.checkpoints import manager  # pylint: disable=g-import-not-at-top
  from moe_jax.models import config as model_config_lib  # pylint: disable=g-import-not-at-top
  parent = os.path.dirname(output) or "."
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(output) + ".upcycle-tmp-", dir=parent)
  try:
    mgr = manager.CheckpointManager(tmp, save_interval_steps=1, max_to_keep=None,
                                    async_save=False)
    try:
      mgr.save(step, state, data_state={}, force=True)
      mgr.wait_until_finished()
    finally:
      mgr.close()
    with open(os.path.join(tmp, "upcycled_model.gin"), "w") as f:
      f.write(model_gin(config))
    model_config_lib.save_json(config, os.path.join(tmp, model_config_lib.CONFIG_FILE))
    with open(os.path.join(tmp, "upcycle.json"), "w") as f:
      json.dump(info, f, indent=2, default=float)
    if os.path.exists(output):
      if not overwrite and os.listdir(output):
        raise UsageError(f"--output {output} appeared while writing; not replacing it.")
      shutil.rmtree(output)
    os.rename(tmp, output)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  def go():
    args = parse_flags(argv)
    gin_utils.setup_logging(args.log_level)
    return upcycle(args)
  return gin_utils.run_cli("moe-upcycle", go, errors=(UsageError,))


def console_main() -> None:
  sys.exit(main())


if __name__ == "__main__":
  console_main()
