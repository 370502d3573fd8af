r"""``moe-infer``: decode the inputs of a file into an output file.

  moe-infer --gin_file=runs/infer.gin --gin.CHECKPOINT_PATH=/tmp/run \
      --gin.INFER_INPUT_FILE=in.txt --gin.INFER_OUTPUT_FILE=out.txt

Without a model gin file the model comes from the run's ``config.gin`` next to
``CHECKPOINT_PATH`` (as for ``moe-eval``).

Input: one example per line (text), or a TFRecord of ``tf.train.Example``
with a bytes feature ``INFER_TFRECORD_FEATURE`` (default ``inputs``), chosen
by ``INFER_INPUT_FORMAT`` ('lines' | 'tfrecord'; default: by the extension
``.tfrecord``). Inputs are tokenized with the Task's ``inputs`` vocabulary
(``MIXTURE_OR_TASK_NAME``), truncated to ``TASK_FEATURE_LENGTHS['inputs']``
(EOS kept), decoded in global batches of ``INFER_BATCH_SIZE`` on the mesh
(``MESH_*``; every host feeds its rows), and written one output per line,
in input order, to ``INFER_OUTPUT_FILE`` (default
``INFER_OUTPUT_DIR/predictions.txt``). Decoding macros as for ``moe-eval``.
"""

from __future__ import annotations

import os
import sys
from typing import Iterable, Optional, Sequence

import numpy as np

from moe_jax import gin_utils


def read_inputs(path: str, fmt: Optional[str] = None, feature: str = "inputs") -> list[str]:
  """The input texts of ``path`` (``fmt``: 'lines' or 'tfrecord')."""
  fmt = fmt or ("tfrecord" if ".tfrecord" in os.path.basename(path) else "lines")
  if fmt == "lines":
    with open(path, encoding="utf-8") as f:
      return [line.rstrip("\n") for line in f]
  if fmt != "tfrecord":
    raise gin_utils.UsageError(f"INFER_INPUT_FORMAT={fmt!r}: use 'lines' or 'tfrecord'.")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  out = []
  for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
    ex = tf.train.Example.FromString(record)
    if feature not in ex.features.feature:
      raise gin_utils.UsageError(
          f"TFRecord example has no feature {feature!r} (it has "
          f"{sorted(ex.features.feature)}); set INFER_TFRECORD_FEATURE.")
    out.append(ex.features.feature[feature].bytes_list.value[0].decode("utf-8"))
  return out


def encode_batch(texts: Sequence[str], vocab, length: int, rows: int) -> np.ndarray:
  """<int32>[rows, length]: token ids + EOS (1), truncated keeping EOS, 0-padded."""
  out = np.zeros((rows, length), np.int32)
  for i, text in enumerate(texts):
    ids = list(vocab.encode(text))[:length - 1] + [1]
    out[i, :len(ids)] = ids
  return out


def decode_texts(predictor, vocab, texts: Sequence[str], input_length: int,
                 batch_size: int, max_decode_length: int) -> Iterable[str]:
  """Yields the decoded output of every text, in order."""
  import jax  # pylint: disable=g-import-not-at-top
  from moe_jax.evaluation import inference  # pylint: disable=g-import-not-at-top
  hosts = jax.process_count()
  if batch_size % predictor.batch_shards or batch_size % hosts:
    raise gin_utils.UsageError(
        f"INFER_BATCH_SIZE={batch_size} must be a multiple of the batch shards "
        f"({predictor.batch_shards}) and of the host count ({hosts}).")
  for start in range(0, len(texts), batch_size):
    chunk = texts[start:start + batch_size]
    batch = {"encoder_input_tokens": encode_batch(chunk, vocab, input_length, batch_size)}
    local = inference.local_rows(batch, batch_size // hosts)
    out = predictor.predict(local["encoder_input_tokens"], max_decode_length)
    for ids in inference.trim_after_eos(out[:len(chunk)]):
      yield vocab.decode(ids)


def run(gin_files: Sequence[str], bindings: Sequence[str] = (),
        search_paths: Sequence[str] = (), log_fn=print) -> str:
  """Parses gin and decodes the input file; returns the output path."""
  import jax  # pylint: disable=g-import-not-at-top
  from moe_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from moe_jax.evaluation import gin_setup, inference  # pylint: disable=g-import-not-at-top
  checkpoint, input_file, lengths, task = gin_setup.parse_required(
      "moe-infer", gin_files, bindings, search_paths, log_fn, "CHECKPOINT_PATH",
      "INFER_INPUT_FILE", "TASK_FEATURE_LENGTHS", "MIXTURE_OR_TASK_NAME")
  output_file = gin_setup.macro("INFER_OUTPUT_FILE", None)
  if output_file is None:
    output_file = os.path.join(gin_setup.required("INFER_OUTPUT_DIR"), "predictions.txt")
  provider = pipeline.ensure_registered(task)
  vocab = provider.output_features["inputs"].vocabulary
  model, params, partitioner = gin_setup.load_model(checkpoint)
  spec = gin_setup.decode_spec(default_length=lengths["targets"])
  predictor = inference.Predictor(model, params, partitioner, spec)
  texts = read_inputs(input_file, gin_setup.macro("INFER_INPUT_FORMAT", None),
                      gin_setup.macro("INFER_TFRECORD_FEATURE", "inputs"))
  outputs = decode_texts(predictor, vocab, texts, lengths["inputs"],
                         gin_setup.macro("INFER_BATCH_SIZE", 32), spec.max_decode_length)
  primary = jax.process_index() == 0
  if primary:
    os.makedirs(os.path.dirname(os.path.abspath(output_file)), exist_ok=True)
  with open(output_file if primary else os.devnull, "w", encoding="utf-8") as f:
    for text in outputs:
      f.write(text.replace("\n", " ") + "\n")
  return output_file


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  def go():
    args = gin_utils.parse_flags(argv, prog="moe-infer",
                                 description="Decode the inputs of a file into an output file.")
    gin_utils.setup_logging(args.log_level)
    print(run(args.gin_file, args.bindings, args.gin_search_paths,
              log_fn=lambda line: print(line, file=sys.stderr)))
  return gin_utils.run_cli("moe-infer", go)


def console_main() -> None:
  sys.exit(main())


if __name__ == "__main__":
  console_main()
