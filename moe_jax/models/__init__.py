"""T5 v1.1 models (encoder-decoder, decoder-only) with optional MoE layers."""

from moe_jax.models.config import SparseLayout, T5Config
from moe_jax.models.decoder_only import DecoderOnlyModel
from moe_jax.models.t5 import EncoderDecoderModel


def build_model(config: T5Config):
  """The flax module for ``config``: decoder-only or encoder-decoder."""
  if not isinstance(config, T5Config):
    raise TypeError(f"build_model expects a T5Config, got {type(config).__name__}; "
                    "build one with moe_jax.models.T5Config(...) or load_dense_t5().")
  return DecoderOnlyModel(config) if config.decoder_only else EncoderDecoderModel(config)


__all__ = ["SparseLayout", "T5Config", "DecoderOnlyModel", "EncoderDecoderModel",
           "build_model"]
