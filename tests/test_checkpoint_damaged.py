"""Damaged checkpoints: fall back to the newest intact step, or refuse.

Steps 1, 2, 3 of a toy state ``w_s = w_0 + s`` (with a data position whose
value is ``s``) are saved; then the newest is damaged the ways a full disk or
a bad copy does it. The expected state is written independently of the
manager (``w_0 + s``).
"""

import glob
import json
import os

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from moe_jax import partitioning
from moe_jax.checkpoints import manager as manager_lib


class _Position:
  """A checkpointable data iterator whose position is one integer."""

  def __init__(self, value=0):
    self.value = value

  def get_state(self):
    return {"value": self.value}

  def save(self, directory):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "position.json"), "w") as f:
      json.dump({"value": self.value}, f)

  def restore(self, directory):
    with open(os.path.join(directory, "position.json")) as f:
      self.value = json.load(f)["value"]


def _w0():
  return np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)


@pytest.fixture
def mesh():
  return partitioning.make_mesh({"data": 4, "expert": 2})


def _state(mesh, step):
  return {"w": jax.device_put(_w0() + np.float32(step), NamedSharding(mesh, P("data"))),
          "step": jax.device_put(np.int32(step), NamedSharding(mesh, P()))}


def _abstract(mesh):
  return {"w": jax.ShapeDtypeStruct((8, 4), np.float32, sharding=NamedSharding(mesh, P("data"))),
          "step": jax.ShapeDtypeStruct((), np.int32, sharding=NamedSharding(mesh, P()))}


def _save_steps(directory, mesh, steps=(1, 2, 3)):
  with manager_lib.CheckpointManager(directory, save_interval_steps=1, max_to_keep=None,
                                     async_save=False) as ckpt:
    for s in steps:
      assert ckpt.save(s, _state(mesh, s), data_iterator=_Position(s))


def _files(directory, step, pattern):
  return sorted(glob.glob(os.path.join(directory, str(step), pattern), recursive=True))


def _truncate_three_data_files(directory, step):
  files = [f for f in _files(directory, step, "state/**/d/*") if os.path.isfile(f)]
  assert len(files) >= 2, files
  for f in files[:3]:
    with open(f, "r+b") as fh:
      fh.truncate(max(1, os.path.getsize(f) // 3))


def _remove_data_file(directory, step):
  os.remove([f for f in _files(directory, step, "state/**/d/*") if os.path.isfile(f)][0])


def _remove_data_state(directory, step):
  for f in _files(directory, step, "data_iterator/**/position.json"):
    os.remove(f)


def _remove_metadata(directory, step):
  os.remove(os.path.join(directory, str(step), "state", "_METADATA"))


def _snapshot(directory):
  out = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      out[os.path.relpath(path, directory)] = os.path.getsize(path)
  return out


@pytest.mark.parametrize("damage", [_truncate_three_data_files, _remove_data_file,
                                    _remove_data_state, _remove_metadata],
                         ids=["truncated_files", "missing_file", "missing_data_state",
                              "missing_metadata"])
def test_falls_back_to_newest_intact_step_and_keeps_the_damaged_one(tmp_path, mesh, damage):
  directory = str(tmp_path / "model")
  _save_steps(directory, mesh)
  damage(directory, 3)
  lines = []
  position = _Position()
  with manager_lib.CheckpointManager(directory, save_interval_steps=1) as ckpt:
    state, data_state = ckpt.restore_latest(_abstract(mesh), data_iterator=position,
                                            log=lines.append)
    assert ckpt.all_steps() == [1, 2]          # the damaged step is out of Orbax's way
    # The run can save step 3 again.
    assert ckpt.save(3, _state(mesh, 3), data_iterator=_Position(3), force=True)
  np.testing.assert_array_equal(np.asarray(state["w"]), _w0() + 2)
  assert int(state["step"]) == 2 and position.value == 2 and data_state == {"value": 2}
  text = "\n".join(lines)
  assert "skipping damaged checkpoint step 3" in text
  assert os.path.join(directory, "3") in text
  assert "3.damaged" in text and "not deleted" in text
  assert os.path.isdir(os.path.join(directory, "3.damaged"))     # kept
  assert os.path.isdir(os.path.join(directory, "3"))             # saved again


def test_refuse_stops_naming_the_step_and_changes_nothing(tmp_path, mesh):
  directory = str(tmp_path / "model")
  _save_steps(directory, mesh)
  _truncate_three_data_files(directory, 3)
  before = _snapshot(directory)
  with manager_lib.CheckpointManager(directory, save_interval_steps=1) as ckpt:
    with pytest.raises(manager_lib.NoUsableCheckpointError) as e:
      ckpt.restore_latest(_abstract(mesh), data_iterator=_Position(), on_damage="refuse")
  message = str(e.value)
  assert os.path.join(directory, "3") in message and "step 3" in message
  assert "on_damage='refuse'" in message and "fall_back" in message
  assert len(message) < 1000 and "Traceback" not in message   # short, no traceback
  assert _snapshot(directory) == before


def test_every_step_damaged_is_a_clear_error_and_nothing_changes(tmp_path, mesh):
  directory = str(tmp_path / "model")
  _save_steps(directory, mesh)
  _truncate_three_data_files(directory, 3)
  _remove_data_state(directory, 2)
  _remove_metadata(directory, 1)
  before = _snapshot(directory)
  with manager_lib.CheckpointManager(directory, save_interval_steps=1) as ckpt:
    with pytest.raises(manager_lib.NoUsableCheckpointError,
                       match="every step is damaged") as e:
      ckpt.restore_latest(_abstract(mesh), data_iterator=_Position(), log=lambda _: None)
  for step in (1, 2, 3):
    assert f"step {step}" in str(e.value)
  assert "Nothing was changed" in str(e.value)
  assert _snapshot(directory) == before


def test_a_checkpoint_of_another_model_is_not_damage(tmp_path, mesh):
  directory = str(tmp_path / "model")
  _save_steps(directory, mesh, steps=(1, 2))
  other = dict(_abstract(mesh), w=jax.ShapeDtypeStruct(
      (8, 8), np.float32, sharding=NamedSharding(mesh, P("data"))))
  with manager_lib.CheckpointManager(directory, save_interval_steps=1) as ckpt:
    with pytest.raises(Exception, match="shape mismatch"):
      ckpt.restore_latest(other, data_iterator=_Position())
  assert sorted(os.listdir(directory)) == ["1", "2"]   # no fall back, nothing moved


def test_per_process_data_positions_are_in_the_step(tmp_path, mesh):
  directory = str(tmp_path / "model")
  _save_steps(directory, mesh, steps=(5,))
  assert os.path.isfile(os.path.join(directory, "5", "data_iterator", "process_0-of-1",
                                     "position.json"))
  # A step without positions (a JSON-only data state, as older checkpoints):
  with manager_lib.CheckpointManager(directory, save_interval_steps=1,
                                     async_save=False) as ckpt:
    assert ckpt.save(6, _state(mesh, 6), {"value": 6})
    assert ckpt.has_data_iterator(5) and not ckpt.has_data_iterator(6)
    position = _Position()
    _, data_state = ckpt.restore(6, _abstract(mesh), data_iterator=position)
  assert data_state == {"value": 6} and position.value == 0   # left to the caller


def test_a_data_position_of_other_settings_is_not_damage(tmp_path, mesh):
  """An intact position saved by a differently configured pipeline: the
  iterator's settings error comes through (no fall back, nothing moved)."""
  from moe_jax.data import iterator as iterator_lib  # pylint: disable=g-import-not-at-top

  class _OtherSettings(_Position):
    def restore(self, directory):
      raise iterator_lib.DataSettingsError("Data iterator state has seed=1 but this "
                                           "pipeline has seed=2")

  directory = str(tmp_path / "model")
  _save_steps(directory, mesh, steps=(1, 2))
  with manager_lib.CheckpointManager(directory, save_interval_steps=1) as ckpt:
    with pytest.raises(iterator_lib.DataSettingsError, match="seed=1"):
      ckpt.restore_latest(_abstract(mesh), data_iterator=_OtherSettings())
  assert sorted(os.listdir(directory)) == ["1", "2"]
