"""Tests for tasks/multi30k.py on ../shared/data/multi30k."""

import numpy as np
import pytest
import seqio

import tasks.multi30k as m30k


@pytest.fixture(name="data_env")
def _data_env(shared_data_dir, monkeypatch):
  monkeypatch.setenv("MOE_JAX_DATA_DIR", shared_data_dir)
  return shared_data_dir


def _source_pairs(name, split):
  task = seqio.get_mixture_or_task(name)
  return task.source.get_dataset(split=split, shuffle=False)


def test_split_sizes_for_every_direction(data_env):
  del data_env
  assert len(m30k.PAIRS) == 6
  for source, target in m30k.PAIRS:
    name = m30k.translate_task_name(source, target)
    for split, size in (("train", 29_000), ("validation", 1_014), ("test", 1_000)):
      assert _source_pairs(name, split).cardinality().numpy() == size
  # The full preprocessing path (translate prefix + tokenize) keeps them all.
  task = seqio.get_mixture_or_task("multi30k_translate_en_cs")
  ds = task.get_dataset(sequence_length=None, split="train", shuffle=False)
  assert ds.reduce(0, lambda n, _: n + 1).numpy() == 29_000


@pytest.mark.parametrize("name,split,index,inputs,target", [
    ("multi30k_translate_en_de", "train", 0,
     "translate English to German: Two young, White males are outside near many bushes.",
     "Zwei junge weiße Männer sind im Freien in der Nähe vieler Büsche."),
    ("multi30k_translate_fr_en", "train", 999,
     "translate French to English: Deux hommes au cœur de l'action d'un match de combat.",
     "Two men in the middle of the action of a fighting match."),
    ("multi30k_translate_en_cs", "validation", 0,
     "translate English to Czech: A group of men are loading cotton onto a truck",
     "Skupina mužů nakládá bavlnu na náklaďák."),
    ("multi30k_translate_cs_en", "test", 999,
     "translate Czech to English: Dívka na břehu pláže s horami v dáli.",
     "A girl at the shore of a beach with a mountain in the distance."),
])
def test_hand_picked_lines_are_aligned(data_env, name, split, index, inputs, target):
  del data_env
  task = seqio.get_mixture_or_task(name)
  ds = task.get_dataset(sequence_length=None, split=split, shuffle=False)
  ex = next(ds.skip(index).as_numpy_iterator())
  assert ex["inputs_pretokenized"].decode() == inputs
  assert ex["targets_pretokenized"].decode() == target
  vocab = task.output_features["targets"].vocabulary
  assert vocab.decode(ex["targets"].tolist()) == target


def test_mixtures_cover_directions_and_languages():
  mix = seqio.get_mixture_or_task("multi30k_translate_mix")
  assert sorted(t.name for t in mix.tasks) == sorted(
      f"multi30k_translate_{s}_{t}" for s, t in m30k.PAIRS)
  mono = seqio.get_mixture_or_task("multi30k_span_corruption_mix")
  assert sorted(t.name for t in mono.tasks) == sorted(
      f"multi30k_span_corruption_{lang}" for lang in ("en", "de", "fr", "cs"))


def test_missing_directory_names_the_expected_path(tmp_path, monkeypatch):
  monkeypatch.setenv("MOE_JAX_DATA_DIR", str(tmp_path))
  task = seqio.get_mixture_or_task("multi30k_translate_en_de")
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "multi30k" / "train.en.gz")):
    task.source.get_dataset(split="train", shuffle=False)


def test_span_corruption_matches_noise_density_and_mean_span(data_env):
  del data_env
  task = seqio.get_mixture_or_task("multi30k_span_corruption_en")
  vocab = task.output_features["targets"].vocabulary
  first_sentinel = vocab.vocab_size - 1
  ds = task.get_dataset({"inputs": 256, "targets": 64}, split="validation",
                        shuffle=False)
  noise = kept = spans = 0
  for ex in ds.as_numpy_iterator():
    inputs, targets = ex["inputs"][:-1], ex["targets"][:-1]  # drop EOS
    is_sentinel_t = targets > first_sentinel - 100
    is_sentinel_i = inputs > first_sentinel - 100
    assert is_sentinel_t.sum() == is_sentinel_i.sum()  # one per noise span
    spans += int(is_sentinel_t.sum())
    noise += int((~is_sentinel_t).sum())
    kept += int((~is_sentinel_i).sum())
  assert spans > 100
  density = noise / (noise + kept)
  assert density == pytest.approx(0.15, abs=0.01)
  assert noise / spans == pytest.approx(3.0, abs=0.25)


def test_data_report_includes_reader_counts(data_env):
  del data_env
  from moe_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  report = pipeline.data_report("multi30k_translate_de_en", {"inputs": 24,
                                                             "targets": 24},
                                split="test")["multi30k_translate_de_en"]
  assert report["examples"] == report["lines"] == 1_000
  assert report["empty_dropped"] == report["invalid_utf8_lines"] == 0
  assert 0 < report["truncated_inputs"] < 1_000
  assert np.isfinite(report["truncated_targets"])
