"""One small typed config for every option of the MoE layer.

Capacity convention (GShard / DeepSpeed, *not* flaxformer's):

    capacity = max(min_expert_capacity,
                   ceil(capacity_factor * num_selected_experts * tokens_per_group / num_experts))

so a factor of 1.0 leaves room for every one of the ``k`` choices of every
token when the load is perfectly balanced. flaxformer's ``MoeLayer`` omits
``k`` (``ceil(capacity_factor * tokens_per_group / num_experts)``): its top-2
routing at capacity factor 1.25 has room for only 1.25 of the 2 assignments
per token, so at balance ~37% of second choices are dropped silently. To
reproduce a flaxformer config here, divide its capacity factor by ``k``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from moe_jax.layers import dts_gate
from moe_jax.layers import selection

# The registered routers (layers/routers.py; tests check the two agree).
ROUTER_TYPES = ("tokens_choose", "experts_choose", "dense_to_sparse")
PRIORITIES = ("position", "batch_prioritized", "random")
# layers/dispatch.py strategies (tests check the two agree).
DISPATCH_STRATEGIES = ("auto", "scatter", "gather", "einsum", "sort")
# layers/ep_exchange.py exchanges of the dropless compute.
DROPLESS_EXCHANGES = ("auto", "all_gather", "all_to_all", "ragged")
SCORE_FUNCTIONS = selection.SCORE_FUNCTIONS
BALANCE_SCOPES = selection.BALANCE_SCOPES
GROUP_SCORES = selection.GROUP_SCORES


@dataclasses.dataclass(frozen=True)
class MoeConfig(selection.SelectionOptions, dts_gate.DtsOptions):
  """Options of ``MoeLayer``.

  Attributes:
    num_experts: number of experts ``E``.
    num_selected_experts: ``k`` of top-k for tokens-choose routing (1: Switch,
      2: GShard). For experts-choose routing, the average number of experts a
      token reaches (sets the capacity).
    d_ff: hidden size of each expert MLP.
    router_type: ``"tokens_choose"`` or ``"experts_choose"``.
    capacity_factor_train / capacity_factor_eval: see module docstring.
    capacity_factor_decode: capacity factor for autoregressive decoding
      (``MoeLayer(decode=True)``). ``None`` (default) means no token is ever
      dropped while decoding (capacity = tokens per group): a decode step
      routes one token per sequence, so a batch's tokens would otherwise
      compete for capacity and outputs would depend on batch composition.
    min_expert_capacity: lower bound on the per-group capacity.
    group_size: target tokens per group. The layer uses the smallest group
      count that is a multiple of the batch-sharding devices and gives groups
      of at most this size.
    priority: which tokens win a full expert: ``"position"`` (earlier tokens
      first), ``"batch_prioritized"`` (BPR, Riquelme et al. 2021: most
      confident router probability first) or ``"random"`` (DeepSpeed's random
      token selection, RTS). In all cases every token's first choice is
      placed before any token's second choice (GShard).
    renormalize_top_k: divide the top-k gate probabilities by their sum.
    jitter_noise: multiplicative uniform noise ``U(1-eps, 1+eps)`` on the
      router input during training (Switch); uses the ``"jitter"`` RNG stream.
    activations: expert MLP activations; two entries make a gated MLP (T5
      v1.1: ``("gelu", "linear")``), one a plain MLP (``("relu",)``).
    dispatch: how the capacity compute fills expert slots and combines them
      (``dispatch.py``): ``"scatter"``, ``"gather"``, ``"einsum"``, ``"sort"``
      or ``"auto"`` (the measured fastest on the mesh's platform). All give
      the same outputs and collectives.
    dropless: MegaBlocks-style dropless routing (tokens-choose only): tokens
      sorted by expert and computed with a grouped matmul; capacity unused.
    dropless_block_size: row-block size of the grouped matmul on CPU.
    dropless_exchange: how the dropless compute moves tokens to the expert
      shards (``ep_exchange.py``): ``"all_gather"`` (every shard sees every
      token; fine at small expert parallelism), ``"all_to_all"`` (a
      fixed-size buffer per peer), ``"ragged"`` (``ragged_all_to_all``,
      TPU/GPU), or ``"auto"``: ragged on TPU/GPU, all_to_all on CPU.
    dropless_buffer_factor: receive buffer of the all_to_all / ragged
      exchanges in multiples of the balanced load (``T * K / EP`` rows per
      peer); assignments beyond it are not computed and are reported as
      ``dropped_fraction``.
    expert_dropout_rate: dropout inside the experts (on the hidden layer),
      separate from the model's dropout (Switch: 0.4 for fine-tuning).
    router_bias: add a bias to the router logits.
    router_init_stddev: stddev of the router kernel initializer.
    gating_dropout_rate: Gating Dropout (Liu et al., ICML 2022): with this
      probability per layer per training step (one draw shared by every
      device, from the ``"routing"`` RNG stream) tokens skip the all-to-all.
    gating_dropout_mode: ``"gate_drop"`` -- tokens are processed by the
      experts on their own device (router restricted to the local experts) --
      or ``"gate_expert_drop"`` -- the MoE output is zero (residual only).
    expert_output_masking_rate: EOM (NLLB, Elbayad et al.): each (token,
      expert) output is kept with probability ``1-p`` in training; outputs are
      scaled by ``1-p`` in eval.
    final_output_masking_rate: FOM (NLLB): a token's whole MoE output is kept
      with probability ``1-p`` in training; scaled by ``1-p`` in eval.
    num_expert_clusters: Mixture of Expert Clusters (Xie et al., AAAI 2023):
      experts ``[c*m, (c+1)*m)`` form cluster ``c``; 0 disables.
    cluster_expert_dropout_rate: MoEC cluster-level expert dropout: in
      training each assignment is re-routed, with this probability, to a
      random sibling expert of the same cluster.
    routing_level: Task-MoE (Kudugunta et al. 2021) / PL-MoE: ``"token"``
      (default) routes each token by its hidden state; ``"task"`` routes
      every token by its example's route id (task or language, from the
      data) through a learned table ``[num_route_ids + 1, E]``
      (``task_routing.py``); needs ``route_ids`` and, since a language's
      tokens all hit the same experts, ``dropless=True`` or a large capacity.
    num_route_ids: number of route ids ``N`` (ids ``1..N``, 0 = padding) for
      ``routing_level="task"``.
    bilevel_outer_size: SMILE bi-level routing (He et al. 2022,
      ``bilevel.py``): the experts form ``bilevel_outer_size`` outer groups
      (on the cross-host mesh axis, logical ``expert_outer``) of
      ``num_experts / bilevel_outer_size`` inner experts (on ``expert``); an
      outer top-1 router and a per-group inner top-k router, two all-to-alls,
      one load-balancing loss per level. 0 (default) = flat routing.
    dts_tau_start / dts_tau_end / dts_anneal_steps / dts_anneal_schedule:
      dense-to-sparse gate (DTS-Gate / EvoMoE, Nie et al. 2021;
      ``router_type="dense_to_sparse"``, ``dts_gate.py``): the Gumbel-softmax
      temperature goes from ``dts_tau_start`` to ``dts_tau_end`` over
      ``dts_anneal_steps`` training steps, ``"linear"`` or ``"exponential"``.
    dts_threshold: a token reaches every expert whose Gumbel-softmax gate
      exceeds this (and always its best one). Eval is plain top-k with
      ``num_selected_experts``.
    dts_train_capacity: ``"all_tokens"`` (capacity = group size in training:
      no drops, up to E expert MLPs per token) or ``"capacity_factor"``
      (the usual capacity; overflow dropped).
    shared_core_rank: shared-core experts (MPOE, Gao et al. 2022;
      ``shared_core.py``): each expert kernel is a shared matrix plus a
      rank-``r`` per-expert delta ``a_e @ b_e``; 0 (default) = plain experts.

    The routing of today's MoE models (``selection.py``; tokens-choose only):
    score_function: ``"softmax"`` (Switch, GShard, Mixtral) or ``"sigmoid"``
      (DeepSeek-V3: independent per-expert affinities; the top-k gates are
      normalized when ``renormalize_top_k``).
    routed_scaling_factor: multiplies the routed experts' combine weights
      (DeepSeek-V3 uses 2.5 with 256 fine-grained experts; 1.0 = off).
    expert_bias_update_rate: auxiliary-loss-free load balancing (DeepSeek-V3,
      ``gamma = 0.001`` there): a per-expert bias ``moe/expert_bias`` added
      to the scores for the top-k selection only, moved after every training
      step by ``rate * sign(mean_load - load)`` outside the optimizer (a
      non-trainable parameter: no optimizer state, no weight decay). Use
      with ``LossConfig.aux_loss_factor = 0`` for the method as published.
      0 (default) = off.
    sequence_balance_loss: sow DeepSeek-V3's sequence-wise balance loss
      (weighted by ``LossConfig.sequence_aux_loss_factor``, 1e-4).
    balance_loss_scope: ``"group"`` (Switch: per token group, averaged) or
      ``"global"`` (Qwen: over the whole global batch, across data shards).
    num_shared_experts: always-on experts (DeepSeek-MoE, Qwen-MoE) whose
      output is added to the routed experts'; one dense MLP of
      ``num_shared_experts * shared_expert_d_ff`` hidden units at
      ``.../moe/shared_experts``, sharded like the model's dense MLPs.
    shared_expert_d_ff: hidden size of one shared expert (default ``d_ff``).
    routing_groups: device-limited routing (DeepSeek-V2; node-limited in V3):
      the experts form this many groups (set it to the expert-parallel
      degree, ``MESH_EXPERT``, so a group is a device); 0 = off.
    routing_groups_per_token: ``M``, the groups (devices) a token may reach.
    routing_group_score: rank groups by their best expert (``"max"``, V2) or
      by their two best (``"top2_sum"``, V3).
  """
  num_experts: int = 8
  num_selected_experts: int = 2
  d_ff: int = 2048
  router_type: str = "tokens_choose"
  capacity_factor_train: float = 1.25
  capacity_factor_eval: float = 2.0
  capacity_factor_decode: Optional[float] = None
  min_expert_capacity: int = 4
  group_size: int = 4096
  priority: str = "position"
  renormalize_top_k: bool = True
  jitter_noise: float = 0.0
  activations: Sequence[str] = ("gelu", "linear")
  dispatch: str = "auto"
  dropless: bool = False
  dropless_block_size: int = 128
  dropless_exchange: str = "auto"
  dropless_buffer_factor: float = 1.5
  expert_dropout_rate: float = 0.0
  router_bias: bool = False
  router_init_stddev: float = 0.02
  gating_dropout_rate: float = 0.0
  gating_dropout_mode: str = "gate_drop"
  expert_output_masking_rate: float = 0.0
  final_output_masking_rate: float = 0.0
  num_expert_clusters: int = 0
  cluster_expert_dropout_rate: float = 0.0
  # --- Task-/language-level routing (Task-MoE; layers/task_routing.py) ---
  routing_level: str = "token"
  num_route_ids: int = 0
  # --- Bi-level routing (SMILE; layers/bilevel.py) ---
  bilevel_outer_size: int = 0
  # --- Shared-core experts (MPOE; layers/shared_core.py) ---
  shared_core_rank: int = 0
  # --- Today's routing (the selection options come from SelectionOptions) ---
  sequence_balance_loss: bool = False
  num_shared_experts: int = 0
  shared_expert_d_ff: Optional[int] = None

  def __post_init__(self):
    object.__setattr__(self, "activations", tuple(self.activations))
    self.validate()

  def validate(self, num_expert_shards: Optional[int] = None,
               causal: bool = False) -> None:
    """Raises ``ValueError`` naming the option to change."""
    if self.num_experts < 1:
      raise ValueError(f"num_experts must be >= 1, got {self.num_experts}.")
    if self.router_type not in ROUTER_TYPES:
      raise ValueError(
          f"router_type={self.router_type!r} is unknown; use one of {ROUTER_TYPES}.")
    if self.dropless_exchange not in DROPLESS_EXCHANGES:
      raise ValueError(f"dropless_exchange={self.dropless_exchange!r} is unknown; "
                       f"use one of {DROPLESS_EXCHANGES}.")
    if self.dropless_buffer_factor <= 0:
      raise ValueError(f"dropless_buffer_factor={self.dropless_buffer_factor} must "
                       "be > 0 (1.5: room for 1.5x the balanced load).")
    if self.dispatch not in DISPATCH_STRATEGIES:
      raise ValueError(
          f"dispatch={self.dispatch!r} is unknown; use one of {DISPATCH_STRATEGIES}.")
    if self.priority not in PRIORITIES:
      raise ValueError(
          f"priority={self.priority!r} is unknown; use one of {PRIORITIES}.")
    if not 1 <= self.num_selected_experts <= self.num_experts:
      raise ValueError(
          f"num_selected_experts (top-k) = {self.num_selected_experts} must be "
          f"between 1 and num_experts = {self.num_experts}; lower k or add experts.")
    if self.dropless and self.router_type != "tokens_choose":
      raise ValueError(
          "dropless=True needs router_type='tokens_choose' (experts-choose "
          "routing is capacity-based by definition).")
    if not self.activations or len(self.activations) > 2:
      raise ValueError(
          f"activations={self.activations!r}: give one activation (plain MLP) "
          "or two (gated MLP, e.g. ('gelu', 'linear')).")
    if self.gating_dropout_mode not in ("gate_drop", "gate_expert_drop"):
      raise ValueError(
          f"gating_dropout_mode={self.gating_dropout_mode!r}: use 'gate_drop' or "
          "'gate_expert_drop'.")
    for name in ("expert_output_masking_rate", "final_output_masking_rate",
                 "cluster_expert_dropout_rate", "expert_dropout_rate"):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1).")
    if not 0.0 <= self.gating_dropout_rate <= 1.0:
      raise ValueError(
          f"gating_dropout_rate={self.gating_dropout_rate} must be in [0, 1].")
    if self.num_expert_clusters:
      if self.num_experts % self.num_expert_clusters:
        raise ValueError(
            f"num_expert_clusters={self.num_expert_clusters} must divide "
            f"num_experts={self.num_experts}.")
      if self.router_type != "tokens_choose":
        raise ValueError("Expert clusters (MoEC) need router_type='tokens_choose'.")
    if num_expert_shards is not None and self.num_experts % num_expert_shards:
      raise ValueError(
          f"num_experts={self.num_experts} is not divisible by the 'expert' "
          f"mesh axis size {num_expert_shards}; use a multiple of "
          f"{num_expert_shards} experts or a smaller expert axis.")
    if self.routing_level not in ("token", "task"):
      raise ValueError(f"routing_level={self.routing_level!r}: use 'token' or 'task'.")
    if self.routing_level == "task" and (
        self.num_route_ids < 1 or self.router_type != "tokens_choose"):
      raise ValueError(
          "routing_level='task' needs num_route_ids >= 1 (the largest route id "
          f"in the data; got {self.num_route_ids}) and router_type="
          f"'tokens_choose' (got {self.router_type!r}).")
    if self.routing_level == "task" and self.bilevel_outer_size:
      raise ValueError("routing_level='task' does not combine with bi-level "
                       "routing (bilevel_outer_size); set one of them off.")
    if self.bilevel_outer_size:  # Bi-level routing (SMILE; bilevel.py)
      if self.bilevel_outer_size < 0 or self.num_experts % self.bilevel_outer_size:
        raise ValueError(
            f"bilevel_outer_size={self.bilevel_outer_size} must be a positive "
            f"divisor of num_experts={self.num_experts} (experts = outer x inner).")
      clashes = [n for n, on in (
          ("router_type='experts_choose'", self.router_type != "tokens_choose"),
          ("dropless", self.dropless), ("gating_dropout_rate", self.gating_dropout_rate),
          ("num_expert_clusters", self.num_expert_clusters),
          ("router_bias", self.router_bias),
          ("routing_level='task'", self.routing_level != "token")) if on]
      if clashes:
        raise ValueError(
            f"bilevel_outer_size={self.bilevel_outer_size} (bi-level routing) does "
            f"not support {', '.join(clashes)}; turn those off or set "
            "bilevel_outer_size=0.")
    if not (self.dts_tau_start > 0 and self.dts_tau_end > 0 and self.dts_anneal_steps >= 1):
      raise ValueError(
          f"dts_tau_start={self.dts_tau_start}, dts_tau_end={self.dts_tau_end} must be "
          f"> 0 and dts_anneal_steps={self.dts_anneal_steps} >= 1.")
    if self.dts_anneal_schedule not in ("linear", "exponential"):
      raise ValueError(f"dts_anneal_schedule={self.dts_anneal_schedule!r}: use "
                       "'linear' or 'exponential'.")
    if not 0.0 <= self.dts_threshold < 1.0:
      raise ValueError(f"dts_threshold={self.dts_threshold} must be in [0, 1).")
    if self.dts_train_capacity not in ("all_tokens", "capacity_factor"):
      raise ValueError(f"dts_train_capacity={self.dts_train_capacity!r}: use "
                       "'all_tokens' or 'capacity_factor'.")
    if self.shared_core_rank < 0:
      raise ValueError(f"shared_core_rank={self.shared_core_rank} must be >= 0 "
                       "(0 turns shared-core experts off).")
    if self.shared_core_rank and self.bilevel_outer_size:
      raise ValueError("shared_core_rank > 0 is not supported with bi-level routing "
                       "(bilevel_outer_size > 0 builds its own expert weights); "
                       "set one of them to 0.")
    errors = _modern_routing_errors(self)
    if errors:
      raise ValueError("MoeConfig: " + " ".join(errors))
    if causal and self.router_type == "experts_choose":
      raise ValueError(
          "Experts-choose routing lets a token's output depend on later tokens "
          "of its group, which breaks causality in a decoder. Use "
          "router_type='tokens_choose' in causal (decoder) stacks; "
          "experts-choose is for encoders.")



def _modern_routing_errors(c: "MoeConfig") -> list[str]:
  """What is wrong with the options of ``selection.py``, as fix-it messages."""
  errors = []
  if c.score_function not in SCORE_FUNCTIONS:
    errors.append(f"score_function={c.score_function!r}: use one of {SCORE_FUNCTIONS}.")
  if c.balance_loss_scope not in BALANCE_SCOPES:
    errors.append(f"balance_loss_scope={c.balance_loss_scope!r}: use one of "
                  f"{BALANCE_SCOPES}.")
  if c.routing_group_score not in GROUP_SCORES:
    errors.append(f"routing_group_score={c.routing_group_score!r}: use one of "
                  f"{GROUP_SCORES}.")
  if c.routed_scaling_factor <= 0 or c.expert_bias_update_rate < 0:
    errors.append(f"routed_scaling_factor={c.routed_scaling_factor} must be > 0 and "
                  f"expert_bias_update_rate={c.expert_bias_update_rate} >= 0.")
  if c.num_shared_experts < 0 or (c.shared_expert_d_ff is not None
                                  and c.shared_expert_d_ff < 1):
    errors.append(f"num_shared_experts={c.num_shared_experts} must be >= 0 and "
                  f"shared_expert_d_ff={c.shared_expert_d_ff} >= 1 (or None: d_ff).")
  modern = (c.score_function != "softmax" or c.expert_bias_update_rate > 0
            or c.routing_groups or c.routed_scaling_factor != 1.0)
  if modern and c.router_type != "tokens_choose":
    errors.append("score_function, routed_scaling_factor, expert_bias_update_rate and "
                  "routing_groups need router_type='tokens_choose'.")
  if c.routing_groups:
    g, m = c.routing_groups, c.routing_groups_per_token
    if c.num_experts % g:
      errors.append(f"routing_groups={g} must divide num_experts={c.num_experts} "
                    "(use the expert-parallel degree, MESH_EXPERT).")
    elif not 1 <= m <= g or m * (c.num_experts // g) < c.num_selected_experts:
      errors.append(
          f"routing_groups_per_token={m} must be in [1, routing_groups={g}] and leave "
          f"at least num_selected_experts={c.num_selected_experts} experts "
          f"({m} groups x {c.num_experts // g} experts).")
    elif c.routing_group_score == "top2_sum" and c.num_experts // g < 2:
      errors.append("routing_group_score='top2_sum' needs groups of >= 2 experts; "
                    "use 'max' or fewer routing_groups.")
  if c.expert_bias_update_rate > 0 and c.routing_level == "task":
    errors.append("expert_bias_update_rate > 0 balances token routing; task-level "
                  "routing (routing_level='task') has no token router to bias.")
  if c.bilevel_outer_size and (modern or c.num_shared_experts or c.sequence_balance_loss):
    errors.append("bi-level routing (bilevel_outer_size) does not combine with the "
                  "scores, biases, shared experts, sequence loss or device limits of "
                  "selection.py; turn one of them off.")
  return errors

