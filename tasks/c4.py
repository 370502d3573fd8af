"""C4 (English) pre-training Tasks on TFDS ``c4/en`` (read only when used).

T5 names (``c4/en:2.2.0``) and current ones (``c4/en:3.1.0``):

* ``c4_v220_span_corruption`` / ``c4_span_corruption`` -- T5 span corruption
  (noise density 0.15, mean noise span length 3), encoder-decoder.
* ``c4_v220_prefix_lm`` / ``c4_prefix_lm`` -- T5's prefix-LM split of each
  text (inputs, targets): for encoder-decoder or prefix-LM decoder-only.
* ``c4_v220_full_lm`` / ``c4_causal_lm`` -- left-to-right LM on ``targets``
  only, for decoder-only models.

Vocabulary: ``$MOE_JAX_VOCAB`` (T5's ``sentencepiece.model``) if set, else
seqio's ByteVocabulary (see :func:`moe_jax.data.vocabularies.default_vocabulary`).
TFDS data dir: ``$TFDS_DATA_DIR`` as usual for TFDS.
"""

from __future__ import annotations

import seqio

from moe_jax.data import task_builders
from moe_jax.data import vocabularies

VERSIONS = {"v220_": "2.2.0", "": "3.1.0"}  # name infix -> c4/en version
CAUSAL_LM_NAMES = {"v220_": "c4_v220_full_lm", "": "c4_causal_lm"}


def register() -> None:
  vocab = vocabularies.default_vocabulary()
  for infix, version in VERSIONS.items():
    source = seqio.TfdsDataSource(tfds_name=f"c4/en:{version}")
    task_builders.add_span_corruption_task(f"c4_{infix}span_corruption", source,
                                           vocab)
    task_builders.add_prefix_lm_task(f"c4_{infix}prefix_lm", source, vocab)
    task_builders.add_causal_lm_task(CAUSAL_LM_NAMES[infix], source, vocab)


register()
