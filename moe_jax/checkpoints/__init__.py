"""Checkpoint readers and importers.

``load_dense_t5(path, format="hf")`` -> ``(params, T5Config)`` where ``params`` is
the ``"params"`` collection of ``moe_jax.models.build_model(config)``.
"""

from __future__ import annotations

FORMATS = ("auto", "hf", "t5x", "moe_jax")


def load_dense_t5(path: str, format: str = "hf", **config_overrides):  # pylint: disable=redefined-builtin
  """Reads a dense T5 v1.1 checkpoint into this project's params and config.

  Args:
    path: checkpoint directory.
    format: ``"hf"`` (Hugging Face config.json + safetensors), ``"t5x"``
      (T5X's msgpack ``checkpoint`` + tensorstore arrays), ``"moe_jax"`` (this
      project's Orbax checkpoint) or ``"auto"`` (detected from the files).
    **config_overrides: ``T5Config`` fields to override (e.g. ``dropout_rate``).

  Returns:
    ``(params, config)``: a nested dict of numpy float32 arrays and a ``T5Config``.
  """
  if format == "hf":
    from moe_jax.checkpoints.hf import load_hf_t5  # pylint: disable=g-import-not-at-top
    return load_hf_t5(path, **config_overrides)
  if format in ("t5x", "moe_jax", "auto"):
    from moe_jax.checkpoints.formats import load_dense_t5_any  # pylint: disable=g-import-not-at-top
    return load_dense_t5_any(path, format, **config_overrides)
  raise ValueError(f"Unknown checkpoint format {format!r}; use one of {FORMATS}.")


def __getattr__(name):
  # Lazy exports, so importing the package stays light (no orbax import).
  if name == "CheckpointManager":
    from moe_jax.checkpoints.manager import CheckpointManager  # pylint: disable=g-import-not-at-top
    return CheckpointManager
  if name == "PreemptionHandler":
    from moe_jax.checkpoints.preemption import PreemptionHandler  # pylint: disable=g-import-not-at-top
    return PreemptionHandler
  if name in ("CheckpointMismatchError", "restore_params"):
    from moe_jax.checkpoints import restore  # pylint: disable=g-import-not-at-top
    return getattr(restore, name)
  raise AttributeError(f"module 'moe_jax.checkpoints' has no attribute {name!r}")
