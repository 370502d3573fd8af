"""Sparse upcycling: a dense T5 v1.1 -> an MoE T5 whose experts copy its MLPs.

Komatsuzaki et al., "Sparse Upcycling: Training Mixture-of-Experts from Dense
Checkpoints" (2022). For every MLP that the sparse config makes an MoE layer:

* each expert ``e`` of ``moe/experts/{wi_0,wi_1,wi,wo}`` ``<float>[E, ...]`` is
  the dense ``mlp/{...}/kernel``, optionally times ``1 + noise * N(0, 1)``
  (independent per expert and element);
* the router ``moe/router_kernel <float>[embed, E]`` is new: zeros, or the
  MoE config's normal(``router_init_stddev``, 0.02) initializer;
* options without a dense counterpart start neutral: a residual MoE's dense
  ``mlp`` copies the dense MLP (its 2-way gate is fresh: both branches are
  equal); an ST-MoE ``extra_mlp`` gets a zero ``wo`` (the sublayer adds 0).

Attention, norms, embeddings, relative position biases, logits and the MLPs
that stay dense are copied unchanged. With renormalized top-k gates (or
experts-choose routing) and enough capacity the combine weights of a token sum
to 1, so the upcycled model computes exactly the dense function
(:func:`verify`).

Everything is built with ``jax.jit(..., out_shardings=...)`` under the mesh:
expert copies are created on the devices that own them, never whole on one.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from moe_jax import models, partitioning
from moe_jax.checkpoints import tree_paths
from moe_jax.models import blocks
from moe_jax.models.config import T5Config

ROUTER_INITS = ("zeros", "normal")
OPTIMIZER_STATE_MODES = ("reset", "carry")
_EXPERT = re.compile(r"^(.*)/moe/experts/(wi_0|wi_1|wi|wo)$")


class UpcycleError(ValueError):
  """Dense checkpoint and sparse config do not fit; the message says what to change."""


# ----------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------
DIMENSION_FIELDS = ("vocab_size", "d_model", "num_heads", "d_kv", "d_ff",
                    "num_encoder_layers", "num_decoder_layers",
                    "relative_attention_num_buckets", "logits_via_embedding")


def check_configs(dense: T5Config, sparse: T5Config) -> None:
  """Raises :class:`UpcycleError` unless ``sparse`` is an MoE version of ``dense``."""
  for f in DIMENSION_FIELDS:
    if getattr(dense, f) != getattr(sparse, f):
      raise UpcycleError(
          f"T5Config.{f}: the dense checkpoint has {getattr(dense, f)!r} but the "
          f"sparse config has {getattr(sparse, f)!r}; remove that binding from "
          "the gin files (the checkpoint sets the model dimensions).")
  if len(dense.activations) != len(sparse.activations):
    raise UpcycleError(f"T5Config.activations: dense {dense.activations} vs sparse "
                       f"{sparse.activations}.")
  if dense.decoder_only or sparse.decoder_only:
    raise UpcycleError("Upcycling supports encoder-decoder T5 models only.")
  if not sparse.has_moe:
    raise UpcycleError(
        "The sparse config has no MoE layer: bind T5Config.moe = @MoeConfig() and "
        "sparse layouts (see gin_configs/runs/sparse_upcycle.gin).")
  for moe in sparse.moe_configs():  # each sparse stack's config (T5Config.stack_moe)
    _check_moe(dense, moe)


def _check_moe(dense: T5Config, moe) -> None:
  if moe.shared_core_rank:
    raise UpcycleError(
        f"MoeConfig.shared_core_rank = {moe.shared_core_rank}: upcycling is not "
        "supported with shared_core_rank > 0 (it copies the dense MLP into plain "
        "per-expert kernels); set MoeConfig.shared_core_rank = 0.")
  if moe.d_ff != dense.d_ff:
    raise UpcycleError(
        f"MoeConfig.d_ff = {moe.d_ff} but the dense MLPs have d_ff = {dense.d_ff}; "
        "experts are copies of the dense MLP, so their sizes must match.")
  if tuple(moe.activations) != tuple(dense.activations):
    raise UpcycleError(
        f"MoeConfig.activations = {moe.activations} but the dense MLPs use "
        f"{dense.activations}; experts must compute the dense MLP's function.")


def sparse_config_from_dense(dense: T5Config, moe_settings: T5Config) -> T5Config:
  """``moe_settings`` with every dimension (and MoE d_ff/activations) from ``dense``."""
  dims = {f: getattr(dense, f) for f in DIMENSION_FIELDS}
  dims["activations"] = dense.activations
  settings = moe_settings.replace_moe(d_ff=dense.d_ff, activations=dense.activations)
  return dataclasses.replace(settings, **dims)


def exact_expected(sparse: T5Config) -> tuple[bool, str]:
  """Whether the upcycled model reproduces the dense one (given ample capacity).

  With per-stack MoE configs every sparse stack's config must be exact.
  """
  verdicts = [_exact_expected(moe) for moe in sparse.moe_configs()]
  inexact = [v for v in verdicts if not v[0]]
  if inexact:
    return inexact[0]
  return True, "; ".join(dict.fromkeys(reason for _, reason in verdicts))


def _exact_expected(moe) -> tuple[bool, str]:
  if moe.router_type == "experts_choose":
    return True, "experts-choose with capacity = group size: weights sum to 1"
  if moe.renormalize_top_k and moe.num_selected_experts > 1:
    return True, "renormalized top-k gates sum to 1"
  if moe.num_selected_experts == moe.num_experts:
    return True, "top-k over all experts: gates sum to 1"
  return False, (f"top-{moe.num_selected_experts} gates are router probabilities "
                 "(not renormalized), so each MoE output is the dense MLP times "
                 "the gate")


# ----------------------------------------------------------------------------
# Abstract params / shardings
# ----------------------------------------------------------------------------
def _init_batch(partitioner: partitioning.Partitioner) -> dict[str, jax.Array]:
  z = jnp.zeros((partitioner.num_batch_shards, 2), jnp.int32)
  return {"encoder_input_tokens": z, "decoder_input_tokens": z,
          "decoder_target_tokens": z}


def _init_fn(config: T5Config, partitioner: partitioning.Partitioner):
  model = models.build_model(config)

  def init(rng):
    batch = _init_batch(partitioner)
    keys = jax.random.split(rng, 4)
    return model.init({"params": keys[0], "dropout": keys[1], "jitter": keys[2],
                       "routing": keys[3]}, batch["encoder_input_tokens"],
                      batch["decoder_input_tokens"], batch["decoder_target_tokens"],
                      enable_dropout=False)["params"]
  return init


def abstract_params(config: T5Config, partitioner: partitioning.Partitioner
                    ) -> tuple[Any, Any]:
  """``(abstract unboxed params, NamedSharding tree)`` of ``config``'s model."""
  with partitioner.activate():
    boxed = jax.eval_shape(_init_fn(config, partitioner),
                           jax.ShapeDtypeStruct((2,), jnp.uint32))
  return nn.unbox(boxed), partitioner.params_shardings(boxed)


def place_dense_params(params: Any, config: T5Config,
                       partitioner: partitioning.Partitioner) -> Any:
  """The dense params (numpy or arrays) placed with the dense model's shardings."""
  config = dataclasses.replace(config, scan_layers=False)
  abstract, shardings = abstract_params(config, partitioner)
  want = traverse_util.flatten_dict(abstract, sep="/")
  have = traverse_util.flatten_dict(params, sep="/")
  problems = [f"missing {n} {tuple(a.shape)}" for n, a in want.items() if n not in have]
  problems += [f"{n}: checkpoint {tuple(np.shape(have[n]))} != model {tuple(a.shape)}"
               for n, a in want.items() if n in have and tuple(np.shape(have[n])) != tuple(a.shape)]
  problems += [f"unexpected {n}" for n in have if n not in want]
  if problems:
    raise UpcycleError("The dense checkpoint does not match a dense T5 v1.1 of its "
                       f"own dimensions: {problems[:8]}")
  sh = traverse_util.flatten_dict(shardings, sep="/")
  placed = {n: jax.device_put(np.asarray(have[n], a.dtype), sh[n]) for n, a in want.items()}
  return traverse_util.unflatten_dict(placed, sep="/")


# ----------------------------------------------------------------------------
# Params
# ----------------------------------------------------------------------------
def _scan_stacks(unrolled: dict, config: T5Config) -> dict:
  out = dict(unrolled)
  for stack, layout, n in (("encoder", config.encoder_layout, config.num_encoder_layers),
                           ("decoder", config.decoder_layout, config.num_decoder_layers)):
    moe = config.stack_moe(stack)
    period = layout.scan_period(n, moe.num_experts if moe else 0)
    st = dict(out[stack])
    st["layers"] = blocks.unrolled_to_scanned(st["layers"], n, period)
    out[stack] = st
  return out


def upcycled_param(name: str, fresh: jax.Array, dense: Mapping[str, jax.Array],
                   key: jax.Array, router_init: str, expert_noise: float) -> jax.Array:
  """Value of the sparse model's parameter ``name`` (unrolled path).

  Args:
    name: e.g. ``"encoder/layers/layers_1/moe/experts/wi_0"``.
    fresh: its freshly initialized value (used where nothing is copied).
    dense: ``{path: array}`` of the dense model.
    key: PRNG key for this parameter's expert noise.
  """
  m = _EXPERT.match(name)
  if m:
    src = f"{m.group(1)}/mlp/{m.group(2)}/kernel"
    w = dense[src].astype(fresh.dtype)
    experts = jnp.broadcast_to(w[None], fresh.shape)
    if expert_noise:
      noise = jax.random.normal(key, fresh.shape, jnp.float32)
      experts = experts * (1.0 + expert_noise * noise).astype(fresh.dtype)
    return experts
  if name.endswith("/moe/router_kernel"):
    return jnp.zeros_like(fresh) if router_init == "zeros" else fresh
  if "/moe/" in name or "/residual_gate/" in name:
    return fresh  # router bias and gates: new parameters
  if "/extra_mlp/" in name or "/pre_extra_mlp_norm/" in name:
    return jnp.zeros_like(fresh) if name.endswith("/extra_mlp/wo/kernel") else fresh
  if name not in dense:
    raise UpcycleError(f"The sparse model's parameter {name!r} has no dense "
                       "counterpart; it is not a T5 v1.1 parameter upcycling knows.")
  if tuple(dense[name].shape) != tuple(fresh.shape):
    raise UpcycleError(f"{name}: dense shape {tuple(dense[name].shape)} != sparse "
                       f"model shape {tuple(fresh.shape)}.")
  return dense[name].astype(fresh.dtype)


def upcycle_params(dense_params: Any, dense_config: T5Config, sparse_config: T5Config,
                   partitioner: partitioning.Partitioner, *,
                   router_init: str = "normal",
                   expert_noise: float = 0.0, seed: int = 0) -> Any:
  """The sparse model's params, created sharded (see module docstring).

  Args:
    dense_params: unrolled dense params (numpy or ``jax.Array``).
    dense_config / sparse_config: must pass :func:`check_configs`.
    partitioner: device mesh and logical-axis rules; the result has the
      sparse model's shardings on them.
    router_init: ``"zeros"`` or ``"normal"``.
    expert_noise: std of the multiplicative expert noise (0: exact copies).
    seed: seeds router init and noise.
  """
  if router_init not in ROUTER_INITS:
    raise UpcycleError(f"router_init={router_init!r}; use one of {ROUTER_INITS}.")
  if expert_noise < 0:
    raise UpcycleError(f"expert_noise={expert_noise} must be >= 0.")
  check_configs(dense_config, sparse_config)
  dense = place_dense_params(dense_params, dense_config, partitioner)
  unrolled_cfg = dataclasses.replace(sparse_config, scan_layers=False)
  _, out_shardings = abstract_params(sparse_config, partitioner)
  init = _init_fn(unrolled_cfg, partitioner)

  def build(dense_tree, rng):
    fresh = traverse_util.flatten_dict(nn.unbox(init(rng)), sep="/")
    dense_flat = traverse_util.flatten_dict(dense_tree, sep="/")
    noise_keys = jax.random.split(jax.random.fold_in(rng, 1), len(fresh))
    out = {name: upcycled_param(name, value, dense_flat, noise_keys[i],
                                router_init, expert_noise)
           for i, (name, value) in enumerate(sorted(fresh.items()))}
    tree = traverse_util.unflatten_dict(out, sep="/")
    return _scan_stacks(tree, sparse_config) if sparse_config.scan_layers else tree

  with partitioner.activate():
    return jax.jit(build, out_shardings=out_shardings)(dense, jax.random.PRNGKey(seed))


# ----------------------------------------------------------------------------
# Optimizer state
# ----------------------------------------------------------------------------
def dense_path_of(sparse_path: str) -> str:
  """Path of the dense leaf an (optimizer-state) leaf of an expert weight mirrors."""
  return re.sub(r"/moe/experts/(wi_0|wi_1|wi|wo)$", r"/mlp/\1/kernel", sparse_path)


def _continue_schedules(opt_state: Any, step: jax.Array) -> Any:
  """Sets every optax schedule counter to ``step`` (learning rate continues)."""
  def fix(x):
    if isinstance(x, optax.ScaleByScheduleState):
      return x._replace(count=jnp.full_like(x.count, step))
    return x
  return jax.tree_util.tree_map(
      fix, opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))


def upcycle_opt_state(tx: optax.GradientTransformation, sparse_params: Any,
                      param_shardings: Any, partitioner: partitioning.Partitioner,
                      *, mode: str = "reset",
                      step: int = 0, dense_opt_state: Any = None) -> Any:
  """The sparse model's optimizer state, sharded like the train state.

  Args:
    tx: the optimizer moe-train will use (from the same gin files).
    sparse_params / param_shardings: the upcycled params and their shardings.
    mode: ``"reset"``: fresh statistics (Adafactor's decay restarts), but
      schedule counters continue from ``step`` so the learning rate does not
      jump back to warmup; ``"carry"``: every leaf copied from
      ``dense_opt_state`` -- the slots of a dense MLP kernel (Adafactor's
      ``v_row [d]``, ``v_col [f]``, unfactored ``v``) broadcast to each expert
      (``[E, d]``, ``[E, f]``, ...), counters carried; routers start fresh.
    step: the dense checkpoint's step.
    dense_opt_state: the dense train state's optimizer state (``carry``).
  """
  if mode not in OPTIMIZER_STATE_MODES:
    raise UpcycleError(f"optimizer_state={mode!r}; use one of {OPTIMIZER_STATE_MODES}.")
  from moe_jax.training import optimizers  # pylint: disable=g-import-not-at-top
  abstract = jax.eval_shape(tx.init, sparse_params)
  shardings = optimizers.opt_state_shardings(abstract, sparse_params, param_shardings,
                                             partitioner.mesh)
  if mode == "reset":
    fn = lambda p: _continue_schedules(tx.init(p), jnp.asarray(step, jnp.int32))  # noqa: E731
    return jax.jit(fn, out_shardings=shardings)(sparse_params)
  if dense_opt_state is None:
    raise UpcycleError(
        "optimizer_state='carry' needs the dense optimizer state: upcycle a moe_jax "
        "checkpoint trained with the same optimizer, or use --optimizer_state=reset.")
  dense_flat = tree_paths.flatten_with_paths(dense_opt_state)
  sparse_flat = tree_paths.flatten_with_paths(abstract)
  problems = []
  for name, leaf in sparse_flat.items():
    src = dense_path_of(name)
    if src not in dense_flat:
      if "/moe/" in name or "/residual_gate/" in name or "extra_mlp" in name:
        continue  # new parameters: fresh statistics
      problems.append(f"{name}: no dense leaf {src}")
      continue
    have, want = tuple(dense_flat[src].shape), tuple(leaf.shape)
    if have != want and (len(want) != len(have) + 1 or want[1:] != have):
      problems.append(f"{name}: dense {have} cannot broadcast to {want}")
  if problems:
    raise UpcycleError(
        "Cannot carry the dense optimizer state (was the dense model trained with "
        f"another optimizer?): {problems[:6]}. Use --optimizer_state=reset.")

  def carry(params, dense_state):
    fresh = tree_paths.flatten_with_paths(tx.init(params))
    dflat = tree_paths.flatten_with_paths(dense_state)
    out = []
    for name, leaf in fresh.items():
      src = dflat.get(dense_path_of(name))
      out.append(leaf if src is None else
                 jnp.broadcast_to(src.astype(leaf.dtype), leaf.shape))
    treedef = jax.tree_util.tree_structure(tx.init(params))
    return jax.tree_util.tree_unflatten(treedef, out)

  return jax.jit(carry, out_shardings=shardings)(sparse_params, dense_opt_state)


# ----------------------------------------------------------------------------
# Verification
# ----------------------------------------------------------------------------
@dataclasses.dataclass
class VerifyResult:
  """Dense vs upcycled logits on generated inputs.

  Attributes:
    max_abs_diff: with ample capacity (no token dropped).
    configured_max_abs_diff: with the config's eval capacity.
    max_abs_logit: scale of the dense logits.
    exact_expected / reason: whether equality is expected, and why (not).
    tolerance: the allowed ``max_abs_diff`` when equality is expected.
  """
  max_abs_diff: float
  configured_max_abs_diff: float
  max_abs_logit: float
  exact_expected: bool
  reason: str
  tolerance: float

  @property
  def passed(self) -> bool:
    finite = np.isfinite(self.max_abs_diff) and np.isfinite(self.configured_max_abs_diff)
    return bool(finite and (not self.exact_expected or self.max_abs_diff <= self.tolerance))

  def summary(self) -> str:
    verdict = "PASS" if self.passed else "FAIL"
    expect = ("expected equal" if self.exact_expected
              else "a difference is expected")
    return (f"verify {verdict}: max |dense - upcycled| logits = {self.max_abs_diff:.3e} "
            f"with ample capacity ({expect}: {self.reason}; tolerance "
            f"{self.tolerance:.1e}); {self.configured_max_abs_diff:.3e} with the "
            f"configured eval capacity; max |logit| = {self.max_abs_logit:.3f}.")


def _ample_capacity(config: T5Config) -> T5Config:
  ample = float(max(max(m.num_experts for m in config.moe_configs()),
                    max(config.encoder_layout.num_experts or (1,)),
                    max(config.decoder_layout.num_experts or (1,))))
  return dataclasses.replace(config.replace_moe(capacity_factor_eval=ample),
                             dropout_rate=0.0)


def generated_batch(vocab_size: int, batch: int, length: int, seed: int = 0
                    ) -> dict[str, np.ndarray]:
  """Random non-padding token ids ``<int32>[batch, length]`` (some padding at the end)."""
  rng = np.random.default_rng(seed)
  enc = rng.integers(1, vocab_size, (batch, length), dtype=np.int32)
  dec = rng.integers(1, vocab_size, (batch, length), dtype=np.int32)
  enc[0, length // 2:] = 0  # one padded sequence
  dec_in = np.concatenate([np.zeros((batch, 1), np.int32), dec[:, :-1]], axis=1)
  return {"encoder_input_tokens": enc, "decoder_input_tokens": dec_in,
          "decoder_target_tokens": dec}


def model_logits(config: T5Config, params: Any, batch: Mapping[str, np.ndarray],
                 partitioner: partitioning.Partitioner) -> np.ndarray:
  """Deterministic logits ``<float32>[batch, length, vocab]`` of ``config``'s model."""
  model = models.build_model(config)

  def apply(p, enc, dec_in, dec_t):
    return model.apply({"params": p}, enc, dec_in, dec_t, enable_dropout=False)

  bsh = partitioner.batch_sharding
  with partitioner.activate():
    args = [jax.device_put(np.asarray(batch[k]), bsh) for k in
            ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens")]
    return np.asarray(jax.jit(apply)(params, *args), np.float32)


def verify(dense_params: Any, dense_config: T5Config, sparse_params: Any,
           sparse_config: T5Config, partitioner: partitioning.Partitioner, *,
           batch_size: Optional[int] = None,
           length: int = 16, seed: int = 0, rtol: float = 1e-4) -> VerifyResult:
  """Runs both models on generated inputs and compares their logits."""
  shards = partitioner.num_batch_shards
  batch_size = batch_size or shards * max(1, 4 // shards)
  batch = generated_batch(dense_config.vocab_size, batch_size, length, seed)
  dense_cfg = dataclasses.replace(dense_config, dropout_rate=0.0, scan_layers=False)
  dense = place_dense_params(dense_params, dense_cfg, partitioner)
  ref = model_logits(dense_cfg, dense, batch, partitioner)
  ample_cfg = _ample_capacity(sparse_config)
  ample = model_logits(ample_cfg, sparse_params, batch, partitioner)
  ample_factor = ample_cfg.moe_configs()[0].capacity_factor_eval
  if all(m.capacity_factor_eval >= ample_factor for m in sparse_config.moe_configs()):
    configured = ample  # the configured capacity is already ample
  else:
    configured = model_logits(dataclasses.replace(sparse_config, dropout_rate=0.0),
                              sparse_params, batch, partitioner)
  scale = float(np.max(np.abs(ref)))
  exact, reason = exact_expected(sparse_config)
  return VerifyResult(
      max_abs_diff=float(np.max(np.abs(ample - ref))),
      configured_max_abs_diff=float(np.max(np.abs(configured - ref))),
      max_abs_logit=scale, exact_expected=exact, reason=reason,
      tolerance=rtol * max(1.0, scale))
