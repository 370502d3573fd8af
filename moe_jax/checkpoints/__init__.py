"""Checkpoint readers and importers.

``load_dense_t5(path, format="auto")`` -> ``(params, T5Config)`` where ``params``
is the ``"params"`` collection of ``moe_jax.models.build_model(config)``.
"""

from __future__ import annotations


def load_dense_t5(path: str, format: str = "auto", **config_overrides):  # pylint: disable=redefined-builtin
  """Reads a dense T5 v1.1 checkpoint into this project's params and config.

  Args:
    path: checkpoint directory.
    format: ``"hf"`` (Hugging Face config.json + safetensors), ``"t5x"``
      (T5X's msgpack ``checkpoint`` + tensorstore arrays), ``"moe_jax"`` (this
      project's Orbax checkpoint) or ``"auto"`` (detected from the files).
    **config_overrides: ``T5Config`` fields to override (e.g. ``dropout_rate``).

  Returns:
    ``(params, config)``: a nested dict of numpy float32 arrays and a ``T5Config``.

  Raises:
    moe_jax.checkpoints.formats.DenseFormatError: an unknown format, or a
      checkpoint that is not a dense T5 v1.1 (a ``ValueError``).
  """
  from moe_jax.checkpoints import formats  # pylint: disable=g-import-not-at-top
  ckpt = formats.read_dense_checkpoint(path, format, **config_overrides)
  return ckpt.params, ckpt.config


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
