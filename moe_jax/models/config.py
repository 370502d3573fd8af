"""Architecture configs: frozen dataclasses of plain Python values (gin-bindable).

``T5Config`` describes an encoder-decoder (or, with ``decoder_only=True``, a
decoder-only) T5 v1.1 model; ``SparseLayout`` says which MLPs of one stack are
MoE layers and how they are built.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, Optional, Sequence

import jax.numpy as jnp

from moe_jax.layers.conditional import ConditionalRoutingConfig
from moe_jax.layers.moe_config import MoeConfig

# Written next to checkpoints (moe-train, moe-upcycle): the model config as JSON,
# readable without gin (e.g. for a distillation teacher).
CONFIG_FILE = "model_config.json"
LAYOUT_KINDS = ("none", "all", "every", "top", "bottom", "explicit")
REMAT_POLICIES = ("none", "full", "dots_saveable", "offload")


@dataclasses.dataclass(frozen=True)
class SparseLayout:
  """Which layers of one stack have an MoE MLP, and how it is built.

  Attributes:
    kind: ``"none"`` (dense stack), ``"all"``, ``"every"`` (every ``every``-th
      layer, the last of each group of ``every``: with ``every=2`` layers
      1, 3, 5, ... (0-based) as in Switch; ``every=4`` as in ST-MoE),
      ``"top"`` / ``"bottom"`` (the last / first ``count`` layers) or
      ``"explicit"`` (the 0-based indices in ``layers``).
    every: period for ``kind="every"``.
    count: number of sparse layers for ``"top"`` / ``"bottom"``.
    layers: indices for ``"explicit"``.
    num_experts: per-sparse-layer expert counts, in layer order (pyramid MoE,
      e.g. ``(4, 4, 8, 8)``); empty means ``MoeConfig.num_experts`` everywhere.
    residual: residual MoE (DeepSpeed PR-MoE): a dense MLP beside the MoE;
      the output mixes both with a learned 2-way softmax gate per token.
    extra_dense_mlp: ST-MoE: a sparse layer is followed by an extra dense MLP
      sublayer (own pre-norm and residual connection).
    conditional_routing: Conditional MoE Routing (NLLB): a shared dense MLP
      beside the MoE, mixed per token by a sigmoid gate
      (``layers/conditional.py``); ``None`` (default) disables it.
  """
  kind: str = "none"
  every: int = 2
  count: int = 1
  layers: Sequence[int] = ()
  num_experts: Sequence[int] = ()
  residual: bool = False
  extra_dense_mlp: bool = False
  conditional_routing: Optional[ConditionalRoutingConfig] = None

  def __post_init__(self):
    object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
    object.__setattr__(self, "num_experts", tuple(int(n) for n in self.num_experts))
    if self.kind not in LAYOUT_KINDS:
      raise ValueError(f"SparseLayout.kind={self.kind!r} is unknown; use one of "
                       f"{LAYOUT_KINDS}.")
    if self.kind == "every" and self.every < 1:
      raise ValueError(f"SparseLayout.every must be >= 1, got {self.every}.")
    if self.residual and self.conditional_routing is not None:
      raise ValueError(
          "SparseLayout.residual and SparseLayout.conditional_routing both add a "
          "gated dense MLP beside the MoE; enable only one of them.")

  def sparse_layers(self, num_layers: int) -> tuple[int, ...]:
    """0-based indices of the MoE layers in a stack of ``num_layers``."""
    if self.kind == "none":
      out = ()
    elif self.kind == "all":
      out = tuple(range(num_layers))
    elif self.kind == "every":
      out = tuple(i for i in range(num_layers) if i % self.every == self.every - 1)
    elif self.kind in ("top", "bottom"):
      if not 0 <= self.count <= num_layers:
        raise ValueError(f"SparseLayout.count={self.count} must be between 0 and "
                         f"the number of layers ({num_layers}).")
      out = (tuple(range(num_layers - self.count, num_layers)) if self.kind == "top"
             else tuple(range(self.count)))
    else:
      bad = [i for i in self.layers if not 0 <= i < num_layers]
      if bad:
        raise ValueError(f"SparseLayout.layers has indices {bad} outside "
                         f"[0, {num_layers}); the stack has {num_layers} layers.")
      out = tuple(sorted(set(self.layers)))
    if self.num_experts and len(self.num_experts) != len(out):
      raise ValueError(
          f"SparseLayout.num_experts has {len(self.num_experts)} entries but the "
          f"layout has {len(out)} sparse layers {out}; give one count per sparse layer.")
    return out

  def experts_per_layer(self, num_layers: int, default: int) -> dict[int, int]:
    """``{layer index: number of experts}`` for the sparse layers."""
    layers = self.sparse_layers(num_layers)
    counts = self.num_experts or (default,) * len(layers)
    return dict(zip(layers, counts))

  def scan_period(self, num_layers: int, default_experts: int) -> int:
    """Layers per scanned block: the layout must repeat with this period.

    Raises ``ValueError`` when the layout cannot be scanned (not periodic, or
    pyramid expert counts).
    """
    layers = self.sparse_layers(num_layers)
    experts = self.experts_per_layer(num_layers, default_experts)
    if len(set(experts.values())) > 1:
      raise ValueError(
          "scan_layers=True needs the same expert count in every sparse layer; "
          f"this layout has {sorted(set(experts.values()))}. Use scan_layers=False "
          "for pyramid MoE.")
    sparse = set(layers)
    for period in range(1, num_layers + 1):
      if num_layers % period:
        continue
      if all((i in sparse) == ((i % period) in sparse) for i in range(num_layers)):
        return period
    return num_layers  # unreachable: period == num_layers always matches.


@dataclasses.dataclass(frozen=True)
class T5Config:
  """T5 v1.1 architecture (defaults: T5 v1.1 small), optionally with MoE layers.

  Attributes:
    vocab_size, d_model, num_heads, d_kv (per-head size), d_ff (dense MLP
      hidden size), num_encoder_layers, num_decoder_layers: sizes.
    activations: MLP activations; ``("gelu", "linear")`` is T5 v1.1's
      gated-GELU, ``("relu",)`` the original T5 MLP.
    dropout_rate: dropout after every sublayer, on attention weights and MLP
      hidden units (only when ``enable_dropout=True``).
    relative_attention_num_buckets / relative_attention_max_distance: the
      bucketed relative position bias (one table per stack).
    logits_via_embedding: tie the output projection to the input embedding
      (logits are then scaled by ``d_model**-0.5``). T5 v1.1: ``False``.
    layer_norm_epsilon: RMS norm epsilon.
    dtype / param_dtype: activation and parameter dtypes (names, e.g. "bfloat16").
    moe: the MoE layer config used by sparse layers (required if any layout
      is sparse, unless that stack has its own config below). Its
      ``num_experts`` may be overridden per layer.
    encoder_moe / decoder_moe: the MoE config of one stack; ``None`` (default)
      uses ``moe``. E.g. sparse upcycling routes the encoder experts-choose
      and the decoder top-2 tokens-choose. Read a stack's config with
      :meth:`stack_moe`.
    encoder_layout / decoder_layout: which MLPs are MoE in each stack.
    decoder_only: build a decoder-only LM (uses ``num_decoder_layers`` and
      ``decoder_layout``); ``prefix_lm`` lets inputs marked by
      ``decoder_causal_attention`` attend bidirectionally.
    scan_layers: stack layers with ``nn.scan`` (blocks of the layout's period).
    remat_policy: ``"none"``, ``"full"`` (recompute everything),
      ``"dots_saveable"`` (keep matmul outputs) or ``"offload"`` (move the
      MoE dispatch/combine and attention outputs to host memory, recompute
      the rest; ``moe_jax.models.host_offload``).
  """
  vocab_size: int = 32128
  d_model: int = 512
  num_heads: int = 6
  d_kv: int = 64
  d_ff: int = 1024
  num_encoder_layers: int = 8
  num_decoder_layers: int = 8
  activations: Sequence[str] = ("gelu", "linear")
  dropout_rate: float = 0.1
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  logits_via_embedding: bool = False
  layer_norm_epsilon: float = 1e-6
  dtype: str = "float32"
  param_dtype: str = "float32"
  moe: Optional[MoeConfig] = None
  encoder_moe: Optional[MoeConfig] = None
  decoder_moe: Optional[MoeConfig] = None
  encoder_layout: SparseLayout = SparseLayout()
  decoder_layout: SparseLayout = SparseLayout()
  decoder_only: bool = False
  prefix_lm: bool = False
  scan_layers: bool = False
  remat_policy: str = "none"

  def __post_init__(self):
    object.__setattr__(self, "activations", tuple(self.activations))
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy={self.remat_policy!r} is unknown; use one of "
                       f"{REMAT_POLICIES}.")
    for name in ("dtype", "param_dtype"):
      try:
        jnp.dtype(getattr(self, name))
      except TypeError:
        raise ValueError(f"T5Config.{name}={getattr(self, name)!r} is not a dtype "
                         "name; use e.g. 'float32' or 'bfloat16'.") from None
    stacks = [("decoder", self.decoder_layout, self.num_decoder_layers)]
    if not self.decoder_only:
      stacks.insert(0, ("encoder", self.encoder_layout, self.num_encoder_layers))
    for stack, layout, n in stacks:
      layers = layout.sparse_layers(n)
      moe = self.stack_moe(stack)
      if layers and moe is None:
        raise ValueError(
            f"{stack}_layout places MoE layers at {layers} but neither "
            f"T5Config.{stack}_moe nor T5Config.moe is set; set moe=MoeConfig(...) "
            "or use SparseLayout(kind='none').")
      if layers and stack == "decoder":
        try:
          moe.validate(causal=True)
        except ValueError as e:
          raise ValueError(f"T5Config decoder MoE config: {e} Bind "
                           "T5Config.decoder_moe to a tokens-choose MoeConfig.") from None
      if self.scan_layers:
        layout.scan_period(n, moe.num_experts if moe else 0)

  def stack_moe(self, stack: str) -> Optional[MoeConfig]:
    """The MoE config of ``stack`` (``"encoder"`` or ``"decoder"``).

    ``encoder_moe`` / ``decoder_moe`` when set, else ``moe``. A decoder-only
    model's stack is ``"decoder"``.
    """
    if stack not in ("encoder", "decoder"):
      raise ValueError(f"stack={stack!r}: use 'encoder' or 'decoder'.")
    own = self.encoder_moe if stack == "encoder" else self.decoder_moe
    return own if own is not None else self.moe

  def sparse_stacks(self) -> tuple[str, ...]:
    """The stacks (``"encoder"``, ``"decoder"``) that have MoE layers."""
    stacks = ("decoder",) if self.decoder_only else ("encoder", "decoder")
    return tuple(s for s in stacks
                 if getattr(self, f"{s}_layout").sparse_layers(
                     getattr(self, f"num_{s}_layers")))

  def moe_configs(self) -> tuple[MoeConfig, ...]:
    """The distinct MoE configs in use by the sparse stacks (in stack order)."""
    out = []
    for stack in self.sparse_stacks():
      moe = self.stack_moe(stack)
      if moe not in out:
        out.append(moe)
    return tuple(out)

  @property
  def has_moe(self) -> bool:
    """Whether any stack has an MoE layer."""
    return bool(self.sparse_stacks())

  def replace_moe(self, **changes) -> "T5Config":
    """A copy with ``changes`` applied to ``moe``, ``encoder_moe`` and
    ``decoder_moe`` (those that are set)."""
    new = {name: dataclasses.replace(getattr(self, name), **changes)
           for name in ("moe", "encoder_moe", "decoder_moe")
           if getattr(self, name) is not None}
    return dataclasses.replace(self, **new)

  @property
  def jnp_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def jnp_param_dtype(self):
    return jnp.dtype(self.param_dtype)


# ----------------------------------------------------------------------------
# JSON: the model config beside a checkpoint
# ----------------------------------------------------------------------------
def to_dict(config: Any) -> dict:
  """Plain JSON types of a (nested) config dataclass (tuples become lists)."""
  return json.loads(json.dumps(dataclasses.asdict(config)))


def _dataclass_of(hint: Any) -> Optional[type]:
  """The dataclass in a field's type hint (``X`` or ``Optional[X]``), if any."""
  if dataclasses.is_dataclass(hint):
    return hint
  return next((a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)), None)


def from_dict(cls: type, values: dict) -> Any:
  """Rebuilds ``cls`` (a config dataclass) from :func:`to_dict`'s output.

  Raises:
    ValueError: a key that is no field of ``cls`` (the file was written by a
      different version; the message names the key).
  """
  hints = typing.get_type_hints(cls)
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - names)
  if unknown:
    raise ValueError(f"{cls.__name__} has no field(s) {unknown}; the config was "
                     "written by another version of moe_jax.")
  kwargs = {}
  for name, value in values.items():
    nested = _dataclass_of(hints[name])
    if isinstance(value, dict) and nested is not None:
      value = from_dict(nested, value)
    elif isinstance(value, list):
      value = tuple(value)
    kwargs[name] = value
  return cls(**kwargs)


def save_json(config: "T5Config", path: str) -> None:
  """Writes ``config`` to ``path`` as JSON (see :data:`CONFIG_FILE`)."""
  with open(path, "w") as f:
    json.dump(to_dict(config), f, indent=1, sort_keys=True)
    f.write("\n")


def load_json(path: str) -> "T5Config":
  """The ``T5Config`` :func:`save_json` wrote to ``path``.

  Raises:
    FileNotFoundError: no file at ``path``.
    ValueError: not a model config (the message says why).
  """
  with open(path) as f:
    try:
      values = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not valid JSON ({e}).") from e
  if not isinstance(values, dict):
    raise ValueError(f"{path} holds no T5Config (a JSON object was expected).")
  try:
    return from_dict(T5Config, values)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{path}: {e}") from e
