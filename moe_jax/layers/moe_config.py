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

ROUTER_TYPES = ("tokens_choose", "experts_choose")
PRIORITIES = ("position", "batch_prioritized", "random")


@dataclasses.dataclass(frozen=True)
class MoeConfig:
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
    dropless: MegaBlocks-style dropless routing (tokens-choose only): tokens
      sorted by expert and computed with a grouped matmul; capacity unused.
    dropless_block_size: row-block size of the grouped matmul on CPU.
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
  dropless: bool = False
  dropless_block_size: int = 128
  expert_dropout_rate: float = 0.0
  router_bias: bool = False
  router_init_stddev: float = 0.02
  gating_dropout_rate: float = 0.0
  gating_dropout_mode: str = "gate_drop"
  expert_output_masking_rate: float = 0.0
  final_output_masking_rate: float = 0.0
  num_expert_clusters: int = 0
  cluster_expert_dropout_rate: float = 0.0

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
    if causal and self.router_type == "experts_choose":
      raise ValueError(
          "Experts-choose routing lets a token's output depend on later tokens "
          "of its group, which breaks causality in a decoder. Use "
          "router_type='tokens_choose' in causal (decoder) stacks; "
          "experts-choose is for encoders.")


# Names of the values MoeLayer sows into the "intermediates" collection.
# Losses are *unweighted*; the model multiplies them by its loss factors.
AUX_LOSS = "aux_loss"                # scalar, Switch load-balancing loss
Z_LOSS = "z_loss"                    # scalar, router z-loss
DROPPED_FRACTION = "dropped_fraction"  # scalar, fraction of assignments dropped
EXPERT_LOAD = "expert_load"          # [E], fraction of assignments per expert
ROUTER_CONFIDENCE = "router_confidence"  # scalar, mean top-1 router probability
CLUSTER_LOSS = "cluster_loss"        # scalar, MoEC variance loss (only when clusters are on)
METRIC_NAMES = (AUX_LOSS, Z_LOSS, DROPPED_FRACTION, EXPERT_LOAD, ROUTER_CONFIDENCE)
