"""The sparse Mixture-of-Experts layer.

Data flow of ``MoeLayer(x)`` for ``x: <float>[batch, length, embed]``:

  1. tokens are reshaped into groups ``<float>[G, S, D]``; ``G`` is a multiple
     of the number of batch-sharding devices (``data * fsdp * expert``), so
     each device owns whole groups;
  2. the router (float32) maps ``[G, S, D] -> logits [G, S, E]`` and a
     ``Router`` turns logits into a ``RoutingDecision`` (which token fills
     which of the ``C`` slots of each expert, with what weight);
  3. dispatch *gathers* tokens into slots ``[E, G, C, D]`` (no one-hot
     einsum), still sharded by group;
  4. a sharding constraint moves the expert dimension onto the ``expert`` mesh
     axis (groups stay on ``data``/``fsdp``): XLA emits the all-to-all here;
  5. the stacked expert MLP runs as batched matmuls ``[E, G*C, D] x [E, D, F]``;
  6. the inverse constraint (all-to-all back), then combine scatters the
     weighted slot outputs back onto their tokens.

``dropless=True`` replaces 3-6 by a sort + grouped-matmul path with no
capacity (``dropless.py``).

Sown into ``"intermediates"`` (unweighted; see ``moe_config``): ``aux_loss``,
``z_loss``, ``dropped_fraction``, ``expert_load`` [E], ``router_confidence``.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax import partitioning
from moe_jax.layers import bilevel as bilevel_lib
from moe_jax.layers import dropless as dropless_lib
from moe_jax.layers import dts_gate
from moe_jax.layers import experts as experts_lib
from moe_jax.layers import moe_config as cfg_lib
from moe_jax.layers import regularization
from moe_jax.layers import routing
from moe_jax.layers import task_routing

Array = jax.Array
MoeConfig = cfg_lib.MoeConfig


def _aligned(batch: int, length: int, g: int) -> bool:
  """Groups hold whole sequences, or a sequence splits into whole groups."""
  return (batch * length) % g == 0 and (
      batch % g == 0 or (g % batch == 0 and length % (g // batch) == 0))


def choose_num_groups(batch: int, length: int, group_size: int,
                      num_batch_shards: int) -> int:
  """Number of token groups for ``batch x length`` tokens.

  The count comes from ``group_size`` alone -- the smallest count that
  divides the tokens evenly, aligns with sequences and gives groups of at most
  ``group_size`` tokens -- so routing (and therefore the model's output) does
  not depend on the mesh. Every device must own whole groups, so the count
  must be a multiple of ``num_batch_shards`` (data*fsdp*expert). If it is not
  (e.g. a decode step with few tokens), the smallest aligned multiple of
  ``num_batch_shards`` is used instead; then capacity per group, and possibly
  which tokens drop, depends on the mesh. Choose ``group_size`` so that
  ``tokens / group_size`` is a multiple of the batch shards to avoid that.

  Raises:
    ValueError: when no valid count exists, saying what to change.
  """
  tokens = batch * length
  if batch % num_batch_shards:
    raise ValueError(
        f"The batch size {batch} is not divisible by the {num_batch_shards} "
        "batch-sharding devices (mesh axes data*fsdp*expert); use a batch size "
        f"that is a multiple of {num_batch_shards}.")
  natural = next((g for g in range(1, tokens + 1)
                  if _aligned(batch, length, g) and tokens // g <= group_size), None)
  if natural is not None and natural % num_batch_shards == 0:
    return natural
  g = num_batch_shards
  while g <= tokens:
    if _aligned(batch, length, g) and tokens // g <= group_size:
      return g
    g += num_batch_shards
  raise ValueError(
      f"Cannot split batch={batch} x length={length} tokens into groups of at "
      f"most group_size={group_size} tokens, a multiple of {num_batch_shards} "
      "groups; raise MoeConfig.group_size or change the batch/length.")


def _dispatch(x: Array, slot_token: Array) -> Array:
  """Gathers tokens into expert slots, expert-major.

  Args:
    x: <float>[G, S, D].
    slot_token: <int32>[G, E, C] (S = empty slot).
  Returns:
    <float>[E, G, C, D]; empty slots are zero. Expert-major so that the
    expert matmuls are plain batched dots (no transposes of the hidden layer).
  """
  x_pad = jnp.concatenate([x, jnp.zeros_like(x[:, :1])], axis=1)
  return jax.vmap(lambda xp, idx: xp[idx], in_axes=(0, 1), out_axes=1)(
      x_pad, jnp.swapaxes(slot_token, 0, 1))


def _combine(out: Array, slot_token: Array, slot_weight: Array, s: int) -> Array:
  """Sums weighted slot outputs back onto their tokens.

  Args:
    out: <float>[E, G, C, D] expert outputs.
    slot_token: <int32>[G, E, C]; slot_weight: <float32>[G, E, C].
  Returns:
    <float>[G, S, D].
  """
  d = out.shape[-1]
  weighted = out * jnp.swapaxes(slot_weight, 0, 1)[..., None].astype(out.dtype)

  def one(w, idx):  # w [E, C, D], idx [E, C]
    return jnp.zeros((s + 1, d), w.dtype).at[idx.reshape(-1)].add(
        w.reshape(-1, d))[:s]

  return jax.vmap(one, in_axes=(1, 0))(weighted, slot_token)


def _capacity_moe(xg: Array, slot_token: Array, slot_weight: Array,
                  weights: dict, activations, dropout_rate: float,
                  dropout_key: Optional[Array]) -> Array:
  """Capacity-based expert computation (pure; safe inside ``lax.cond``).

  Args:
    xg: <float>[G, S, D] grouped tokens; slot_token/slot_weight: [G, E, C].
  Returns:
    <float>[G, S, D].
  """
  s = xg.shape[1]
  xg = nn.with_logical_constraint(xg, ("batch", "length", "embed"))
  dispatched = _dispatch(xg, slot_token)  # [E, G, C, D]
  dispatched = nn.with_logical_constraint(
      dispatched, ("unmodeled", "batch", "length", "embed"))
  # The all-to-all: groups leave the expert axis, experts move onto it.
  dispatched = nn.with_logical_constraint(
      dispatched, ("expert", "expert_group", "length", "embed"))
  pre = [jnp.einsum("egcd,edf->egcf", dispatched, w)
         for w in experts_lib.input_kernels(weights)]
  h = experts_lib.hidden_activation(pre, activations)
  h = nn.with_logical_constraint(h, ("expert", "expert_group", "length", "mlp"))
  h = experts_lib.dropout(h, dropout_rate, dropout_key)
  out = jnp.einsum("egcf,efd->egcd", h, weights["wo"])
  out = nn.with_logical_constraint(out, ("expert", "expert_group", "length", "embed"))
  out = nn.with_logical_constraint(out, ("unmodeled", "batch", "length", "embed"))
  y = _combine(out, slot_token, slot_weight, s)
  return nn.with_logical_constraint(y, ("batch", "length", "embed"))


class MoeLayer(nn.Module):
  """Sparse MoE MLP block (no residual, no norm: the model adds those).

  Attributes:
    config: ``MoeConfig``.
    dtype: activation/computation dtype of the experts (router is float32).
    param_dtype: parameter dtype.
  """
  config: MoeConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, padding_mask: Optional[Array] = None, *,
               deterministic: bool = True, causal: bool = False,
               decode: bool = False, route_ids: Optional[Array] = None) -> Array:
    """Applies the layer.

    Args:
      x: <float>[batch, length, embed].
      padding_mask: <bool|int>[batch, length], 1 for real tokens; padding
        takes no expert capacity and does not count in losses or metrics.
      deterministic: eval mode (eval capacity factor, no noise, no dropout).
      causal: the layer sits in a causal decoder (experts-choose refused).
      decode: autoregressive decoding with a KV cache: capacity comes from
        ``capacity_factor_decode`` (default: no drops at all).
      route_ids: <int>[batch, length] route id of each token's example, for
        ``routing_level="task"`` (see ``task_routing.py``); else unused.

    Returns:
      <float>[batch, length, embed] in ``dtype``.
    """
    c = self.config
    mesh = partitioning.current_mesh()
    n_expert_shards = partitioning.mesh_axis_size(mesh, "expert")
    c.validate(num_expert_shards=n_expert_shards, causal=causal)
    if c.bilevel_outer_size:  # SMILE bi-level routing: two levels, two all-to-alls
      return bilevel_lib.bilevel_moe(self, x, padding_mask,
                                     deterministic=deterministic, decode=decode)
    b, l, d = x.shape
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

    # --- routing (float32) -------------------------------------------------
    router_in = x.astype(jnp.float32)
    if not deterministic and c.jitter_noise > 0:
      noise = jax.random.uniform(self.make_rng("jitter"), router_in.shape,
                                 minval=1.0 - c.jitter_noise,
                                 maxval=1.0 + c.jitter_noise)
      router_in = router_in * noise
    if c.routing_level == "task":  # Task-MoE: per-example route ids (task_routing.py)
      logits = task_routing.task_router_logits(
          self, route_ids, (b, l), c.num_route_ids, c.num_experts, c.router_init_stddev)
    else:
      router_kernel = self.param(
          "router_kernel",
          nn.with_logical_partitioning(
              nn.initializers.normal(stddev=c.router_init_stddev),
              ("embed", "unmodeled")),
          (d, c.num_experts), jnp.float32)
      logits = jnp.einsum("bld,de->ble", router_in, jnp.asarray(router_kernel, jnp.float32))
      if c.router_bias:
        bias = self.param(
            "router_bias",
            nn.with_logical_partitioning(nn.initializers.zeros, ("unmodeled",)),
            (c.num_experts,), jnp.float32)
        logits = logits + bias

    n_batch_shards = partitioning.mesh_axis_size(mesh, partitioning.BATCH_MESH_AXES)
    group_size = b * l if c.dropless else c.group_size
    g = choose_num_groups(b, l, group_size, n_batch_shards)
    s = b * l // g
    logits = logits.reshape(g, s, c.num_experts)
    logits = nn.with_logical_constraint(logits, ("batch", "length", "unmodeled"))
    mask = (None if padding_mask is None
            else padding_mask.reshape(g, s).astype(jnp.float32))
    factor = c.capacity_factor_eval if deterministic else c.capacity_factor_train
    capacity = routing.expert_capacity(s, c.num_experts, c.num_selected_experts,
                                       factor, c.min_expert_capacity)
    if decode:
      capacity = (s if c.capacity_factor_decode is None else routing.expert_capacity(
          s, c.num_experts, c.num_selected_experts, c.capacity_factor_decode,
          c.min_expert_capacity))
    train = not deterministic
    # Random priority needs a key even in eval (a fixed one); cluster
    # re-routing happens in training only.
    reroutes = bool(c.num_expert_clusters) and c.cluster_expert_dropout_rate > 0
    rng = None
    if c.router_type == "tokens_choose" and train and (c.priority == "random" or reroutes):
      rng = self.make_rng("routing")
    elif c.router_type == "tokens_choose" and c.priority == "random":
      rng = jax.random.key(0)
    elif c.router_type == "dense_to_sparse" and train:  # DTS-Gate: Gumbel noise
      rng = self.make_rng("routing")
    decision = routing.make_router(c).route(logits, mask, capacity, rng)
    self._sow_metrics(decision)
    if c.router_type == "dense_to_sparse":  # DTS-Gate (dts_gate.py)
      self.sow("intermediates", cfg_lib.EXPERTS_PER_TOKEN,
               dts_gate.experts_per_token(decision, mask, s))

    weights = experts_lib.ExpertWeights(
        num_experts=c.num_experts, d_model=d, d_ff=c.d_ff,
        activations=c.activations, dtype=self.dtype,
        param_dtype=self.param_dtype, shared_core_rank=c.shared_core_rank,
        name="experts")()
    dropout_rate = c.expert_dropout_rate if train else 0.0
    dropout_key = self.make_rng("dropout") if dropout_rate > 0 else None
    eom_key = (self.make_rng("dropout")
               if train and c.expert_output_masking_rate > 0 else None)
    xt = x.astype(self.dtype)

    def sparse_path(xt):
      if c.dropless:
        wt = regularization.output_mask(decision.expert_weight,
                                        c.expert_output_masking_rate,
                                        deterministic, eom_key)
        y = dropless_lib.dropless_moe(
            xt.reshape(b * l, d), decision.expert_index.reshape(b * l, -1),
            wt.reshape(b * l, -1), weights, activations=c.activations,
            num_experts=c.num_experts, block=c.dropless_block_size, mesh=mesh,
            dropout_rate=dropout_rate, dropout_rng=dropout_key)
        return y.reshape(b, l, d)
      slot_weight = regularization.output_mask(
          decision.slot_weight, c.expert_output_masking_rate, deterministic, eom_key)
      y = _capacity_moe(xt.reshape(g, s, d), decision.slot_token, slot_weight,
                        weights, c.activations, dropout_rate, dropout_key)
      return y.reshape(b, l, d)

    if train and c.gating_dropout_rate > 0:
      # One draw per layer per step, identical on every device (replicated key).
      fire = jax.random.bernoulli(self.make_rng("routing"), c.gating_dropout_rate)
      if c.gating_dropout_mode == "gate_expert_drop":
        dropped = lambda xt: jnp.zeros_like(xt)
      else:
        probs = jax.nn.softmax(logits.reshape(b * l, c.num_experts), axis=-1)
        tok_mask = (jnp.ones((b * l, 1), jnp.float32) if padding_mask is None
                    else padding_mask.reshape(b * l, 1).astype(jnp.float32))

        def dropped(xt):
          y = regularization.local_expert_moe(
              xt.reshape(b * l, d), probs, tok_mask.astype(xt.dtype), weights,
              k=c.num_selected_experts, num_experts=c.num_experts,
              activations=c.activations, block=c.dropless_block_size, mesh=mesh,
              renormalize=c.renormalize_top_k)
          return y.reshape(b, l, d)
      self.sow("intermediates", "gating_dropout_fired", fire.astype(jnp.float32))
      y = jax.lax.cond(fire, dropped, sparse_path, xt)
    else:
      y = sparse_path(xt)

    if c.final_output_masking_rate > 0:
      fom_key = self.make_rng("dropout") if train else None
      y = y * regularization.output_mask(
          jnp.ones((b, l, 1), y.dtype), c.final_output_masking_rate,
          deterministic, fom_key)
    return nn.with_logical_constraint(y.astype(self.dtype), ("batch", "length", "embed"))

  def _sow_metrics(self, d: routing.RoutingDecision) -> None:
    self.sow("intermediates", cfg_lib.AUX_LOSS, d.aux_loss)
    self.sow("intermediates", cfg_lib.Z_LOSS, d.z_loss)
    # Dropless routing never drops (the decision's capacity is not applied).
    dropped = (jnp.zeros((), jnp.float32) if self.config.dropless
               else d.dropped_fraction)
    self.sow("intermediates", cfg_lib.DROPPED_FRACTION, dropped)
    self.sow("intermediates", cfg_lib.EXPERT_LOAD, d.expert_load)
    self.sow("intermediates", cfg_lib.ROUTER_CONFIDENCE, d.router_confidence)
    if self.config.num_expert_clusters:
      self.sow("intermediates", cfg_lib.CLUSTER_LOSS, d.cluster_loss)
