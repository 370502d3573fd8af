"""Training SentencePiece vocabularies with T5's layout (``moe-train-vocab``).

T5 vocabularies reserve ``pad=0``, ``eos=1``, ``unk=2`` and no BOS; seqio
appends the 100 sentinel ids (``<extra_id_0>`` ... ``<extra_id_99>``) on top of
the SentencePiece pieces when the vocabulary is built with ``extra_ids=100``.
:func:`train_sentencepiece` writes a model with exactly that layout.

Command line (entry point ``moe-train-vocab``)::

  moe-train-vocab --task multi30k_translate_en_de --task multi30k_translate_en_fr \\
      --data_dir /path/to/data --vocab_size 8000 --output /tmp/multi30k.model
  moe-train-vocab --synthetic --output /tmp/synthetic.model

The text comes from the Tasks' *data sources* (before tokenization): every
string feature of every example of ``--split`` (default ``train``).
"""

from __future__ import annotations

import argparse
import importlib
import io
import os
import tempfile
from typing import Iterable, Optional, Sequence

import sentencepiece as spm

T5_EXTRA_IDS = 100


def train_sentencepiece(texts: Iterable[str], output_path: str, vocab_size: int,
                        model_type: str = "unigram",
                        character_coverage: float = 1.0,
                        hard_vocab_limit: bool = True,
                        num_threads: int = 1) -> str:
  """Trains a T5-layout SentencePiece model and writes it atomically.

  Args:
    texts: training sentences (one string per sentence).
    output_path: where the ``.model`` file goes (directories are created).
    vocab_size: number of SentencePiece pieces, *not* counting the 100 extra
      ids seqio adds.
    model_type: ``unigram`` (T5's choice) or ``bpe``.
    character_coverage: fraction of characters covered (1.0 keeps all).
    hard_vocab_limit: if False, ``vocab_size`` is an upper bound (useful for
      tiny corpora with fewer distinct pieces).
    num_threads: trainer threads; 1 keeps the result reproducible.

  Returns:
    ``output_path``.

  Raises:
    ValueError: no text was given.
  """
  sentences = [t for t in texts if t and t.strip()]
  if not sentences:
    raise ValueError("No training text for SentencePiece: the task/split gave "
                     "no non-empty strings. Check the task name, split and data dir.")
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_writer=model,
      vocab_size=vocab_size, model_type=model_type,
      character_coverage=character_coverage,
      hard_vocab_limit=hard_vocab_limit,
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      num_threads=num_threads, minloglevel=2,
      input_sentence_size=0, shuffle_input_sentence=False)
  out_dir = os.path.dirname(os.path.abspath(output_path))
  os.makedirs(out_dir, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".tmp")
  with os.fdopen(fd, "wb") as f:
    f.write(model.getvalue())
  os.replace(tmp, output_path)  # atomic: concurrent trainers never see half a file
  return output_path


def texts_from_tasks(task_names: Sequence[str], split: str = "train",
                     max_examples: Optional[int] = None) -> list[str]:
  """Every string feature of every source example of the given seqio Tasks.

  Mixtures are expanded into their Tasks.
  """
  import seqio  # pylint: disable=g-import-not-at-top
  tasks = []
  for name in task_names:
    provider = seqio.get_mixture_or_task(name)
    tasks.extend(provider.tasks if isinstance(provider, seqio.Mixture) else [provider])
  texts = []
  for task in tasks:
    ds = task.source.get_dataset(split=split, shuffle=False)
    if max_examples:
      ds = ds.take(max_examples)
    for ex in ds.as_numpy_iterator():
      for key, value in ex.items():
        if isinstance(value, bytes):
          texts.append(value.decode("utf-8", errors="replace"))
  return texts


def console_main(argv: Optional[Sequence[str]] = None) -> None:
  """Entry point of ``moe-train-vocab``."""
  parser = argparse.ArgumentParser(
      prog="moe-train-vocab",
      description="Train a T5-layout SentencePiece vocabulary (pad=0, eos=1, "
                  "unk=2; seqio adds 100 extra ids) from seqio Tasks' text.")
  parser.add_argument("--task", action="append", default=[],
                      help="seqio Task or Mixture name (repeatable).")
  parser.add_argument("--synthetic", action="store_true",
                      help="Train on the embedded synthetic languages instead.")
  parser.add_argument("--module", action="append", default=[],
                      help="Module registering the tasks (default: tasks).")
  parser.add_argument("--data_dir", default=None,
                      help="Data directory for file-based tasks (sets "
                           "MOE_JAX_DATA_DIR).")
  parser.add_argument("--split", default="train")
  parser.add_argument("--max_examples", type=int, default=None,
                      help="Per-task cap on examples read.")
  parser.add_argument("--vocab_size", type=int, default=8000)
  parser.add_argument("--model_type", default="unigram", choices=["unigram", "bpe"])
  parser.add_argument("--character_coverage", type=float, default=1.0)
  parser.add_argument("--output", required=True, help="Path of the .model file.")
  args = parser.parse_args(argv)

  if args.synthetic:
    from moe_jax.data import synthetic_languages  # pylint: disable=g-import-not-at-top
    texts = synthetic_languages.corpus_text_for_vocabulary()
  else:
    if not args.task:
      parser.error("Give at least one --task NAME (or --synthetic).")
    if args.data_dir:
      os.environ["MOE_JAX_DATA_DIR"] = args.data_dir
    for module in args.module or ["tasks"]:
      importlib.import_module(module)
    texts = texts_from_tasks(args.task, args.split, args.max_examples)
  path = train_sentencepiece(texts, args.output, args.vocab_size,
                             model_type=args.model_type,
                             character_coverage=args.character_coverage,
                             hard_vocab_limit=False)
  print(f"Wrote {path} from {len(texts)} sentences "
        f"(use with extra_ids={T5_EXTRA_IDS}).")


if __name__ == "__main__":
  console_main()
