"""Curriculum over a mixture: the training member set changes by step (NLLB).

A curriculum is an ordered list of *phases*; each phase starts at a training
step and names what is trained on from that step until the next phase::

  phases = [
      (0,   "synthetic_translate_xa_xb"),               # a Task or Mixture name
      (400, ["synthetic_translate_xa_xb",                # several names, rate 1
             "synthetic_translate_xb_xa"]),
      (800, {"synthetic_translate_xa_xb": 2.0,           # names with rates
             "synthetic_translate_xc_xa": 1.0}),         # (or [(name, rate), ...])
  ]
  it = CurriculumIterator(phases, base_config)   # usually via get_train_iterator

The first phase must start at step 0 and start steps must strictly increase.
A phase that lists several members gets a seqio Mixture registered under a
deterministic name (``curriculum_<digest of the members>``), so a restarted
process rebuilds exactly the same Mixture.

Step = batches consumed: the train loop takes one batch per step, so batch
``b`` (0-based) belongs to the phase whose ``[start_step, next start_step)``
holds ``b``. Each phase reads its own seqio stream, seeded ``seed + phase
index`` (so two phases with the same members do not replay the same batches),
from the start of that stream at the phase's first step.

Resumption is exact and does not replay: :meth:`CurriculumIterator.save`
writes ``state.json`` (the phases, the data settings and
``batches_consumed``) and, mid-phase, the current phase's
:class:`~moe_jax.data.iterator.DataIterator` position (its tf.data iterator
checkpoint) under ``phase/``; on a phase boundary the next phase starts its
stream fresh, so there is nothing more to save.
:meth:`CurriculumIterator.restore` checks the phases and settings and
restores that position.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import seqio

from moe_jax.data import iterator as iterator_lib
from moe_jax.data import pipeline

STATE_FORMAT = "moe_jax.data.curriculum/2"
LEGACY_STATE_FORMAT = "moe_jax.data.curriculum/1"   # JSON position only (replayed)
PHASE_DIR = "phase"
MIXTURE_PREFIX = "curriculum_"
logger = logging.getLogger(__name__)

# What a gin file may give for one phase's members.
MemberSpec = Union[str, Sequence[Any], Mapping[str, float]]
PhaseSpec = Sequence[Any]  # (start_step, MemberSpec)

_EXAMPLE = ("[(0, 'synthetic_translate_xa_xb'), "
            "(100, ['synthetic_translate_xa_xb', 'synthetic_translate_xb_xa'])]")


class CurriculumError(ValueError):
  """A curriculum phase list that cannot be used (says how to fix it)."""


# --------------------------------------------------------------------------
# Phase list: parsing, validation, per-phase Mixtures
# --------------------------------------------------------------------------

def _members(index: int, spec: MemberSpec) -> list[tuple[str, float]]:
  """``[(name, rate), ...]`` of one phase's member spec (validated)."""
  where = f"Curriculum phase {index}"
  if isinstance(spec, str):
    return [(spec, 1.0)]
  if isinstance(spec, Mapping):
    items = list(spec.items())
  elif isinstance(spec, Sequence):
    items = []
    for member in spec:
      if isinstance(member, str):
        items.append((member, 1.0))
      elif (isinstance(member, Sequence) and len(member) == 2
            and isinstance(member[0], str)):
        items.append((member[0], member[1]))
      else:
        raise CurriculumError(
            f"{where}: member {member!r} is neither a task name nor a "
            "(name, rate) pair. Write e.g. ['task_a', ('task_b', 2.0)].")
  else:
    raise CurriculumError(
        f"{where}: members {spec!r} must be a task/mixture name, a list of "
        "names or (name, rate) pairs, or a {name: rate} dict.")
  if not items:
    raise CurriculumError(f"{where} has no members; give at least one task name.")
  out, seen = [], set()
  for name, rate in items:
    if name in seen:
      raise CurriculumError(
          f"{where} lists {name!r} twice; give each task once (use a rate to "
          "weight it).")
    seen.add(name)
    try:
      rate = float(rate)
    except (TypeError, ValueError):
      rate = float("nan")
    if not np.isfinite(rate) or rate <= 0:
      raise CurriculumError(
          f"{where}: rate of {name!r} is {rate!r}; rates must be finite and > 0 "
          "(drop the task from the phase instead of giving it rate 0).")
    out.append((name, rate))
  return out


def _mixture_name(members: Sequence[tuple[str, float]]) -> str:
  """Deterministic seqio name of a phase's Mixture (same members, same name)."""
  text = json.dumps([[n, r] for n, r in members])
  return MIXTURE_PREFIX + hashlib.sha1(text.encode()).hexdigest()[:12]


class Phase:
  """One phase: trains on ``source`` from ``start_step`` on.

  Attributes:
    start_step: first training step (= batch index) of the phase.
    members: ``[(task_or_mixture_name, rate), ...]`` as configured.
    source: the seqio name read in this phase: the single member's own name,
      or the registered ``curriculum_<digest>`` Mixture of several members.
  """

  def __init__(self, start_step: int, members: Sequence[tuple[str, float]]):
    self.start_step = int(start_step)
    self.members = [(str(n), float(r)) for n, r in members]
    self.source = (self.members[0][0] if len(self.members) == 1
                   else _mixture_name(self.members))

  def to_json(self) -> dict:
    return {"start_step": self.start_step,
            "members": [[n, r] for n, r in self.members],
            "source": self.source}

  def __repr__(self) -> str:
    return f"Phase(start_step={self.start_step}, members={self.members})"


def parse_phases(phases: Sequence[PhaseSpec]) -> list[Phase]:
  """Validated :class:`Phase` list from gin-style ``[(start_step, members), ...]``.

  Raises:
    CurriculumError: empty list, a first phase not at step 0, start steps
      that do not strictly increase, or malformed members.
  """
  if isinstance(phases, (str, Mapping)) or not isinstance(phases, Sequence) \
      or not phases:
    raise CurriculumError(
        f"A curriculum is a non-empty list of (start_step, members) phases, got "
        f"{phases!r}. Example: {_EXAMPLE}.")
  out: list[Phase] = []
  for index, phase in enumerate(phases):
    if isinstance(phase, Mapping):
      phase = (phase.get("start_step"), phase.get("members"))
    if isinstance(phase, str) or not isinstance(phase, Sequence) or len(phase) != 2:
      raise CurriculumError(
          f"Curriculum phase {index} is {phase!r}; each phase is a pair "
          f"(start_step, members). Example: {_EXAMPLE}.")
    start, spec = phase
    if isinstance(start, bool) or not isinstance(start, (int, np.integer)):
      raise CurriculumError(
          f"Curriculum phase {index}: start_step {start!r} must be an integer "
          "training step.")
    start = int(start)
    if index == 0 and start != 0:
      raise CurriculumError(
          f"The first curriculum phase starts at step {start}; it must start at "
          "step 0 (say what step 0 trains on, e.g. the early members).")
    if out and start <= out[-1].start_step:
      raise CurriculumError(
          f"Curriculum phase {index} starts at step {start}, not after phase "
          f"{index - 1} (step {out[-1].start_step}). Start steps must strictly "
          "increase; sort the phases or merge the ones with equal steps.")
    out.append(Phase(start, _members(index, spec)))
  return out


def register_phase_mixtures(phases: Sequence[Phase],
                            modules: Sequence[str] = pipeline.DEFAULT_TASK_MODULES
                            ) -> None:
  """Checks every member is registered; registers the multi-member Mixtures.

  Raises:
    CurriculumError: a member names no registered seqio Task or Mixture.
  """
  for index, phase in enumerate(phases):
    for name, _ in phase.members:
      try:
        pipeline.ensure_registered(name, modules)
      except ValueError as e:
        raise CurriculumError(
            f"Curriculum phase {index} (start_step {phase.start_step}) names "
            f"{name!r}, which is no registered seqio Task or Mixture. Fix the "
            "name, or import the module registering it (gin: "
            "MIXTURE_OR_TASK_MODULE = 'tasks.NAME').") from e
    if len(phase.members) > 1:
      if phase.source in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.remove(phase.source)
      seqio.MixtureRegistry.add(phase.source, list(phase.members))


def phase_index(phases: Sequence[Phase], step: int) -> int:
  """Index of the phase that trains step ``step`` (0-based batch index)."""
  return bisect.bisect_right([p.start_step for p in phases], step) - 1


# --------------------------------------------------------------------------
# Iterator
# --------------------------------------------------------------------------

class CurriculumIterator:
  """Per-host numpy batches whose source changes at the phase boundaries.

  Yields the same ``dict[str, np.ndarray]`` of ``<int32>[per_host_batch,
  length]`` as :class:`~moe_jax.data.iterator.DataIterator`; the data
  settings (lengths, batch, shard, packing, ...) are shared by all phases.

  Args:
    phases: ``[(start_step, members), ...]`` (see :func:`parse_phases`) or
      parsed :class:`Phase` objects.
    config: the :class:`~moe_jax.data.iterator.DataIterator` config without
      ``mixture_or_task_name`` (that is chosen per phase).
  """

  def __init__(self, phases: Sequence[Union[PhaseSpec, Phase]],
               config: Mapping[str, Any]):
    if phases and all(isinstance(p, Phase) for p in phases):
      self._phases = list(phases)
    else:
      self._phases = parse_phases(phases)
    register_phase_mixtures(self._phases)
    self._config = {k: v for k, v in dict(config).items()
                    if k != "mixture_or_task_name"}
    self._batches_consumed = 0
    self._phase: Optional[int] = None  # index of the phase of self._iterator
    self._iterator: Optional[iterator_lib.DataIterator] = None

  @property
  def phases(self) -> list[Phase]:
    return list(self._phases)

  @property
  def batches_consumed(self) -> int:
    return self._batches_consumed

  @property
  def current_phase(self) -> int:
    """Index of the phase the next batch comes from."""
    return phase_index(self._phases, self._batches_consumed)

  def _phase_iterator(self, index: int) -> iterator_lib.DataIterator:
    """A fresh DataIterator over phase ``index``'s stream (seed + index)."""
    phase = self._phases[index]
    seed = self._config.get("seed")
    return iterator_lib.DataIterator(dict(
        self._config, mixture_or_task_name=phase.source,
        seed=None if seed is None else int(seed) + index))

  def __iter__(self) -> "CurriculumIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    index = self.current_phase
    if self._iterator is None or self._phase != index:
      if self._phase is not None and self._phase != index:
        logger.info("Curriculum: step %d enters phase %d, members %s.",
                    self._batches_consumed, index, self._phases[index].members)
      self._iterator, self._phase = self._phase_iterator(index), index
    batch = next(self._iterator)  # StopIteration if a finite phase runs out
    self._batches_consumed += 1
    return batch

  # -- position ---------------------------------------------------------------

  def get_state(self) -> dict:
    """The position's JSON: phases, data settings and batches consumed."""
    return iterator_lib.plain_json({
        "format": STATE_FORMAT, "batches_consumed": self._batches_consumed,
        "phases": [p.to_json() for p in self._phases], **self._config})

  def save(self, directory: str) -> None:
    """Writes this host's position into ``directory`` (module docstring)."""
    os.makedirs(directory, exist_ok=True)
    state = self.get_state()
    mid_phase = self._iterator is not None and self._phase == self.current_phase
    state["phase_iterator"] = mid_phase
    if mid_phase:
      self._iterator.save(os.path.join(directory, PHASE_DIR))
    iterator_lib.write_state(directory, state)

  def _check(self, state: Mapping[str, Any], ignore=()) -> None:
    iterator_lib.check_settings(
        state, {k: v for k, v in self.get_state().items()
                if k not in ("format", "batches_consumed")},
        "Curriculum state", ignore=ignore)

  def restore(self, directory: str) -> None:
    """Moves to the position :meth:`save` wrote into ``directory``.

    Raises:
      moe_jax.data.iterator.DataStateError: no curriculum state there.
      moe_jax.data.iterator.DataSettingsError: one of other phases or other
        data settings (the message names them).
    """
    state = iterator_lib.read_state(directory)
    if state.get("format") != STATE_FORMAT:
      raise iterator_lib.DataSettingsError(self._format_message(state))
    self._check(state)
    self._batches_consumed = int(state["batches_consumed"])
    self._iterator, self._phase = None, None
    if state.get("phase_iterator"):
      index = self.current_phase
      it = self._phase_iterator(index)
      it.restore(os.path.join(directory, PHASE_DIR))
      self._iterator, self._phase = it, index

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Moves to a JSON-only position of the legacy format by replaying it.

    Raises:
      moe_jax.data.iterator.DataSettingsError: not a legacy curriculum state,
        or one of other phases or other data settings.
    """
    if state.get("format") != LEGACY_STATE_FORMAT:
      raise iterator_lib.DataSettingsError(self._format_message(state))
    self._check(state, ignore=("shard_index",))
    self._batches_consumed = int(state["batches_consumed"])
    index = self.current_phase
    offset = self._batches_consumed - self._phases[index].start_step
    self._iterator, self._phase = None, None
    if offset:
      it = self._phase_iterator(index)
      phase_state = dict(it.get_state(), format=iterator_lib.LEGACY_STATE_FORMAT,
                         batches_consumed=offset)
      it.set_state(phase_state)
      self._iterator, self._phase = it, index

  @staticmethod
  def _format_message(state: Mapping[str, Any]) -> str:
    plain = state.get("format") in (iterator_lib.STATE_FORMAT,
                                    iterator_lib.LEGACY_STATE_FORMAT)
    hint = (" It is a plain (non-curriculum) data iterator state: the checkpoint "
            "was written without a curriculum." if plain else "")
    return (f"Not a curriculum iterator state (format={state.get('format')!r}, "
            f"expected {STATE_FORMAT!r}).{hint} Resume with the data settings the "
            "checkpoint was written with, or start the data from scratch.")
