"""Token embedding table that can also produce logits (tied embeddings)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class Embed(nn.Module):
  """Lookup table ``<float>[vocab, embed]`` with logical axes ``(vocab, embed)``.

  ``__call__``: ``<int>[batch, length] -> <float>[batch, length, embed]``.
  ``attend``: ``<float>[..., embed] -> <float>[..., vocab]`` (x @ table.T).
  """
  num_embeddings: int
  features: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  # T5X initialises the shared embedding with unit stddev.
  embedding_init: Any = nn.initializers.normal(stddev=1.0)

  def setup(self):
    self.embedding = self.param(
        "embedding",
        nn.with_logical_partitioning(self.embedding_init, ("vocab", "embed")),
        (self.num_embeddings, self.features), self.param_dtype)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(
          f"Embed expects integer token ids, got dtype {tokens.dtype}; cast the "
          "inputs with .astype(jnp.int32).")
    table = jnp.asarray(self.embedding, self.dtype)
    return jnp.take(table, tokens, axis=0)

  def attend(self, x: jax.Array) -> jax.Array:
    table = jnp.asarray(self.embedding, self.dtype)
    return jnp.einsum("...e,ve->...v", jnp.asarray(x, self.dtype), table)
