"""Checkpoint readers and importers.

``load_dense_t5(path, format="hf")`` -> ``(params, T5Config)`` where ``params`` is
the ``"params"`` collection of ``moe_jax.models.build_model(config)``.
"""

from __future__ import annotations

FORMATS = ("hf", "t5x", "moe_jax")


def load_dense_t5(path: str, format: str = "hf", **config_overrides):  # pylint: disable=redefined-builtin
  """Reads a dense T5 v1.1 checkpoint into this project's params and config.

  Args:
    path: checkpoint directory.
    format: ``"hf"`` (Hugging Face config.json + safetensors). ``"t5x"`` and
      ``"moe_jax"`` are reserved for later readers.
    **config_overrides: ``T5Config`` fields to override (e.g. ``dropout_rate``).

  Returns:
    ``(params, config)``: a nested dict of numpy float32 arrays and a ``T5Config``.
  """
  if format == "hf":
    from moe_jax.checkpoints.hf import load_hf_t5  # pylint: disable=g-import-not-at-top
    return load_hf_t5(path, **config_overrides)
  if format in ("t5x", "moe_jax"):
    raise NotImplementedError(
        f"load_dense_t5(format={format!r}) is not implemented yet; convert the "
        "checkpoint to Hugging Face format and use format='hf'.")
  raise ValueError(f"Unknown checkpoint format {format!r}; use one of {FORMATS}.")
