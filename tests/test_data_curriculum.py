"""Tests for moe_jax.data.curriculum on the embedded synthetic tasks.

Which task an example came from is read back from its T5 prefix text
(``"translate Alvic to Borran: ..."``), independently of the curriculum code.
"""

import math
import os
import shutil

import gin
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import seqio

import tasks.synthetic as synthetic  # registers the tasks
from moe_jax import gin_utils, train
from moe_jax.data import curriculum
from moe_jax.data import train_iterator
from moe_jax.data import synthetic_languages as sl
from moe_jax.data import vocabularies

AB = synthetic.task_name("xa", "xb")
BA = synthetic.task_name("xb", "xa")
CA = synthetic.task_name("xc", "xa")
LENGTHS = {"inputs": 32, "targets": 16}
PHASES = [(0, AB), (3, [BA, CA])]
NUM_BATCHES = 7


def _iterator(phases=PHASES, seed=5):
  return train_iterator.get_train_iterator(
      synthetic.MIXTURE_NAME, LENGTHS, batch_size=4, seed=seed, shard_index=0,
      num_shards=1, pack=False, curriculum=phases)


def _row_tasks(batch):
  """The task of each row, from the decoded prefix of its inputs."""
  vocab = vocabularies.synthetic_vocabulary()
  prefixes = {sl.translation_prefix(s, t).strip(): synthetic.task_name(s, t)
              for s, t in synthetic.PAIRS}
  out = []
  for row in batch["encoder_input_tokens"]:
    text = vocab.decode([int(t) for t in row if t > 0])
    found = [task for prefix, task in prefixes.items() if text.startswith(prefix)]
    assert len(found) == 1, text
    out.append(found[0])
  return out


def _assert_batches_equal(expected, got):
  assert len(expected) == len(got)
  for e, g in zip(expected, got):
    assert e.keys() == g.keys()
    for k in e:
      np.testing.assert_array_equal(e[k], g[k])


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  """Seven batches straight through, and the saved position before each."""
  root = tmp_path_factory.mktemp("curriculum_positions")
  it = _iterator()
  states, batches = [], []
  for step in range(NUM_BATCHES):
    it.save(str(root / str(step)))
    states.append(str(root / str(step)))
    batches.append(next(it))
  return states, batches


def test_each_phase_yields_only_its_members_switching_at_the_boundary(reference_run):
  _, batches = reference_run
  per_batch = [set(_row_tasks(b)) for b in batches]
  for step in range(3):  # phase 0: steps 0, 1, 2
    assert per_batch[step] == {AB}, step
  for step in range(3, NUM_BATCHES):  # phase 1 from step 3 exactly
    assert per_batch[step] <= {BA, CA}, step
  assert set().union(*per_batch[3:]) == {BA, CA}  # both members sampled
  # Phase 0 is the plain iterator of its task (seed + phase index 0).
  plain = train_iterator.get_train_iterator(AB, LENGTHS, batch_size=4, seed=5,
                                      shard_index=0, num_shards=1, pack=False)
  _assert_batches_equal(batches[:3], [next(plain) for _ in range(3)])


@pytest.mark.parametrize("restore_at", [1, 3, 5],
                         ids=["mid_phase_0", "on_boundary", "mid_phase_1"])
def test_resume_gives_the_same_batches_as_straight_through(reference_run, restore_at):
  states, batches = reference_run
  resumed = _iterator()
  resumed.restore(states[restore_at])
  assert resumed.current_phase == (0 if restore_at < 3 else 1)
  # Mid-phase the phase's tf.data position is saved; on a boundary the next
  # phase starts its stream fresh.
  assert os.path.isdir(os.path.join(states[restore_at], curriculum.PHASE_DIR)) == (
      restore_at != 3)
  got = [next(resumed) for _ in range(restore_at, NUM_BATCHES)]
  _assert_batches_equal(batches[restore_at:], got)
  assert resumed.get_state()["batches_consumed"] == NUM_BATCHES


def test_multi_member_phase_is_a_deterministic_mixture_with_the_given_rates():
  phases = curriculum.parse_phases([(0, {AB: 3.0, BA: 1.0}), (10, [(CA, 2.0), AB])])
  curriculum.register_phase_mixtures(phases)
  again = curriculum.parse_phases([(0, [(AB, 3), (BA, 1)])])
  assert again[0].source == phases[0].source  # same members -> same name
  assert phases[0].source != phases[1].source
  mix = seqio.get_mixture_or_task(phases[0].source)
  assert {t.name: mix.get_rate(t) for t in mix.tasks} == {AB: 3.0, BA: 1.0}
  mix = seqio.get_mixture_or_task(phases[1].source)
  assert {t.name: mix.get_rate(t) for t in mix.tasks} == {CA: 2.0, AB: 1.0}
  assert curriculum.phase_index(phases, 9) == 0
  assert curriculum.phase_index(phases, 10) == 1


@pytest.mark.parametrize("phases, message", [
    ([], "non-empty list"),
    ("synthetic_translate_mix", "non-empty list"),
    ([(5, AB)], "must start at step 0"),
    ([(0, AB), (4, BA), (4, CA)], "Start steps must strictly increase"),
    ([(0, AB), (8, BA), (4, CA)], "sort the phases"),
    ([(0, AB, 1.0)], "pair (start_step, members)"),
    ([("0", AB)], "must be an integer"),
    ([(0, [])], "has no members"),
    ([(0, [AB, AB])], "lists 'synthetic_translate_xa_xb' twice"),
    ([(0, {AB: 0.0})], "rates must be finite and > 0"),
    ([(0, [(AB, 1.0, 2)])], "(name, rate) pair"),
])
def test_bad_phase_list_says_how_to_fix_it(phases, message):
  with pytest.raises(curriculum.CurriculumError) as e:
    curriculum.parse_phases(phases)
  assert message in str(e.value)


def test_legacy_json_curriculum_state_is_replayed(reference_run):
  _, batches = reference_run
  legacy = dict(_iterator().get_state(), format=curriculum.LEGACY_STATE_FORMAT,
                batches_consumed=5)
  resumed = _iterator()
  resumed.set_state(legacy)
  _assert_batches_equal(batches[5:], [next(resumed) for _ in range(5, NUM_BATCHES)])


def test_unknown_task_and_foreign_state_are_rejected(reference_run, tmp_path):
  with pytest.raises(curriculum.CurriculumError,
                     match="phase 1 .start_step 3. names 'no_such_task'.*MIXTURE_OR_TASK_MODULE"):
    _iterator([(0, AB), (3, [BA, "no_such_task"])])
  it = _iterator()
  plain = train_iterator.get_train_iterator(AB, LENGTHS, 4, seed=5, shard_index=0,
                                      num_shards=1, pack=False)
  plain.save(str(tmp_path / "plain"))
  with pytest.raises(ValueError, match="written without a curriculum"):
    it.restore(str(tmp_path / "plain"))
  other = _iterator([(0, AB), (4, [BA, CA])])
  with pytest.raises(ValueError, match="phases=.*differently configured"):
    other.restore(reference_run[0][2])


def test_shipped_gin_example_binds_a_valid_curriculum():
  gin_utils.parse_gin(["runs/multi30k_curriculum.gin"],
                  ["MODEL_DIR = None", "CURRICULUM_LATE_START = 40"])
  try:  # building the iterator reads no data (Multi30k tasks only register)
    it = train_iterator.get_train_iterator("multi30k_translate_mix", LENGTHS, 4,
                                     shard_index=0, num_shards=1)
  finally:
    gin.clear_config()
  assert isinstance(it, curriculum.CurriculumIterator)
  phases = it.phases
  assert [p.start_step for p in phases] == [0, 40]
  assert {n for n, _ in phases[0].members} == {
      f"multi30k_translate_{s}_{t}" for s, t in
      (("en", "de"), ("de", "en"), ("en", "fr"), ("fr", "en"))}
  assert phases[1].source == "multi30k_translate_mix"


# --------------------------------------------------------------------------
# moe-train end to end: checkpoint at step 6, resume, same losses
# --------------------------------------------------------------------------

TINY_QUICKSTART = [
    "T5Config.vocab_size = 512", "T5Config.d_model = 16", "T5Config.num_heads = 2",
    "T5Config.d_kv = 8", "T5Config.d_ff = 32", "T5Config.num_encoder_layers = 1",
    "T5Config.num_decoder_layers = 1", "NUM_EXPERTS = 4", "MoeConfig.d_ff = 32",
    "MoeConfig.group_size = 64", "TRAIN_STEPS = 12", "CHECKPOINT_PERIOD = 6",
    "EVAL_PERIOD = 0", "LOG_PERIOD = 6", "BATCH_SIZE = 8",
    "TASK_FEATURE_LENGTHS = {'inputs': 16, 'targets': 16}",
    "train.measure_peak_flops = False", "train.tensorboard = False",
    # Single-task phases: a seqio Mixture costs seconds of tf.data tracing
    # (multi-member phases are covered by the iterator tests above).
    f"get_train_iterator.curriculum = [(0, '{AB}'), (9, '{BA}')]",
]


@pytest.fixture
def persistent_compilation_cache(tmp_path):
  """Lets the resumed run reuse the straight run's compiled executables.

  Both runs build the same jitted functions as new closures; without the
  cache the second pays the whole XLA compile again. Settings are restored
  afterwards.
  """
  from jax.experimental.compilation_cache import compilation_cache as cc  # pylint: disable=g-import-not-at-top
  settings = {"jax_compilation_cache_dir": str(tmp_path / "xla_cache"),
              "jax_persistent_cache_min_compile_time_secs": 0.0,
              "jax_persistent_cache_min_entry_size_bytes": 0}
  before = {name: getattr(jax.config, name) for name in settings}
  for name, value in settings.items():
    jax.config.update(name, value)
  cc.reset_cache()
  yield
  for name, value in before.items():
    jax.config.update(name, value)
  cc.reset_cache()


def _train(model_dir):
  gin_utils.parse_gin(["runs/quickstart.gin"],
                  TINY_QUICKSTART + [f"MODEL_DIR = '{model_dir}'"])
  try:
    return train.configured_experiment().run(log_fn=lambda _: None)
  finally:
    gin.clear_config()


def _data_state(model_dir, step):
  """The JSON data iterator position the checkpoint of ``step`` holds."""
  checkpointer = ocp.Checkpointer(ocp.JsonCheckpointHandler())
  return checkpointer.restore(os.path.join(model_dir, str(step), "data_state"))


@pytest.mark.slow  # end-to-end; pytest -m slow
@pytest.mark.usefixtures("persistent_compilation_cache")
def test_moe_train_resumes_a_curriculum_run_exactly(tmp_path):
  straight = _train(tmp_path / "straight")
  assert len(straight.losses) == 12 and all(map(math.isfinite, straight.losses))
  # A second run that finds only the step-6 checkpoint resumes from it: the
  # data iterator moves to step 6 of phase 0 and switches phase at step 9.
  shutil.copytree(tmp_path / "straight" / "6", tmp_path / "resumed" / "6")
  resumed = _train(tmp_path / "resumed")
  assert len(resumed.losses) == 6
  np.testing.assert_array_equal(resumed.losses, straight.losses[6:])  # bitwise
  for step, consumed in ((6, 6), (12, 12)):
    state = _data_state(tmp_path / "straight", step)
    assert state["format"] == curriculum.STATE_FORMAT
    assert state["batches_consumed"] == consumed
    assert os.path.isfile(tmp_path / "straight" / str(step) / "data_iterator" /
                          "process_0-of-1" / "state.json")
  assert _data_state(tmp_path / "resumed", 12) == _data_state(tmp_path / "straight", 12)
