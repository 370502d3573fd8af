"""Tests for tasks/synthetic.py: the embedded default translation tasks."""

import pytest
import seqio
import sentencepiece

import tasks.synthetic as syn
from moe_jax.data import synthetic_languages as sl


def _parse_alvic(sentence, lex):
  """Hand parser of Alvic (adj? noun[-s] verb adj? noun[-s]) -> meaning parts."""
  words = sentence.split()
  verb_pos = next(i for i, w in enumerate(words) if w in lex.verbs)

  def noun_phrase(ws):
    adjective = lex.adjectives.index(ws[0]) if len(ws) == 2 else -1
    noun = ws[-1]
    plural = noun not in lex.nouns
    return lex.nouns.index(noun[:-1] if plural else noun), adjective, plural
  return (noun_phrase(words[:verb_pos]), lex.verbs.index(words[verb_pos]),
          noun_phrase(words[verb_pos + 1:]))


def _borran_by_hand(parsed, lex):
  """Borran: ka noun[-en] adj? (subject), ka noun[-en] adj? (object), verb."""
  def np_(noun, adjective, plural):
    out = ["ka", lex.nouns[noun] + ("en" if plural else "")]
    return out + ([lex.adjectives[adjective]] if adjective >= 0 else [])
  subject, verb, obj = parsed
  return " ".join(np_(*subject) + np_(*obj) + [lex.verbs[verb]])


def test_six_directions_and_mixture_registered():
  names = set(seqio.TaskRegistry.names())
  for s in ("xa", "xb", "xc"):
    for t in ("xa", "xb", "xc"):
      assert (f"synthetic_translate_{s}_{t}" in names) == (s != t)
  mix = seqio.get_mixture_or_task("synthetic_translate_mix")
  assert len(mix.tasks) == 6
  assert {mix.get_rate(t) for t in mix.tasks} == {1.0}


def test_examples_translate_correctly_and_words_are_single_pieces():
  task = seqio.get_mixture_or_task("synthetic_translate_xa_xb")
  ds = task.get_dataset(sequence_length=None, split="validation", shuffle=False)
  examples = list(ds.as_numpy_iterator())
  assert len(examples) == sl.SPLIT_SIZES["validation"]
  lex_a, lex_b = sl.world(0).lexicons["xa"], sl.world(0).lexicons["xb"]
  vocab = task.output_features["targets"].vocabulary
  for ex in examples[:40]:
    inputs = ex["inputs_pretokenized"].decode()
    target = ex["targets_pretokenized"].decode()
    assert inputs.startswith("translate Alvic to Borran: ")
    source = inputs[len("translate Alvic to Borran: "):]
    assert target == _borran_by_hand(_parse_alvic(source, lex_a), lex_b)
    # Every word is one piece (a plural at most two: stem + suffix), plus EOS.
    words = target.split()
    plurals = sum(w not in lex_b.nouns and w[:-2] in lex_b.nouns for w in words)
    assert len(words) + 1 <= len(ex["targets"]) <= len(words) + plurals + 1
    assert ex["targets"][-1] == 1
    assert vocab.decode(ex["targets"].tolist()) == target


def test_bleu_metric_is_100_on_exact_and_lower_on_wrong():
  task = seqio.get_mixture_or_task("synthetic_translate_xc_xa")
  _, targets = sl.parallel_corpus("xc", "xa", "test")
  metric = task.metric_fns[0]
  assert metric(targets[:50], targets[:50])["bleu"] == pytest.approx(100.0)
  assert metric(targets[:50], targets[1:51])["bleu"] < 50.0


def test_vocabulary_layout_is_t5():
  vocab = seqio.get_mixture_or_task("synthetic_translate_xa_xc").output_features[
      "inputs"].vocabulary
  assert (vocab.pad_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2)
  assert vocab.extra_ids == 100
  base = sentencepiece.SentencePieceProcessor(
      model_file=vocab.sentencepiece_model_file)
  assert base.pad_id() == 0 and base.eos_id() == 1 and base.unk_id() == 2
  assert base.bos_id() == -1
  assert vocab.vocab_size == base.get_piece_size() + 100
  assert vocab.encode("ka rargagen") == base.encode("ka rargagen")
