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

Resumption is exact: the JSON state holds the phases, the data settings and
``batches_consumed``; :meth:`CurriculumIterator.set_state` rebuilds the
current phase's :class:`~moe_jax.data.pipeline.DataIterator` and moves it to
``batches_consumed - start_step`` batches into the phase (the same skip the
plain iterator uses), whether the checkpoint was written mid-phase or on a
boundary.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import seqio

from moe_jax.data import pipeline

STATE_FORMAT = "moe_jax.data.curriculum/1"
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
  length]`` as :class:`~moe_jax.data.pipeline.DataIterator`; the data
  settings (lengths, batch, shard, packing, ...) are shared by all phases.

  Args:
    phases: ``[(start_step, members), ...]`` (see :func:`parse_phases`) or
      parsed :class:`Phase` objects.
    config: the :class:`~moe_jax.data.pipeline.DataIterator` config without
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
    self._iterator: Optional[pipeline.DataIterator] = None

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

  def _phase_iterator(self, index: int) -> pipeline.DataIterator:
    """The phase's DataIterator, moved to this iterator's position."""
    phase = self._phases[index]
    seed = self._config.get("seed")
    config = dict(self._config, mixture_or_task_name=phase.source,
                  seed=None if seed is None else int(seed) + index)
    it = pipeline.DataIterator(config)
    offset = self._batches_consumed - phase.start_step
    if offset:
      state = it.get_state()
      state["batches_consumed"] = offset
      it.set_state(state)
    return it

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

  def get_state(self) -> dict:
    """A small JSON-able dict: phases, data settings and batches consumed."""
    state = {"format": STATE_FORMAT,
             "batches_consumed": self._batches_consumed,
             "phases": [p.to_json() for p in self._phases]}
    state.update(self._config)
    return json.loads(json.dumps(state))

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Moves to the position recorded by :meth:`get_state`.

    Raises:
      ValueError: the state is not a curriculum state, or it came from other
        phases or other data settings.
    """
    if state.get("format") != STATE_FORMAT:
      hint = (" It is a plain (non-curriculum) data iterator state: the "
              "checkpoint was written without a curriculum."
              if state.get("format") == pipeline.STATE_FORMAT else "")
      raise ValueError(
          f"Not a curriculum iterator state (format={state.get('format')!r}, "
          f"expected {STATE_FORMAT!r}).{hint} Resume with the data settings the "
          "checkpoint was written with, or start the data from scratch.")
    mine = json.loads(json.dumps(self.get_state()))
    for key, value in mine.items():
      if key in ("shard_index", "batches_consumed"):
        continue  # every host consumes in lock-step; only the shard differs
      if state.get(key) != value:
        raise ValueError(
            f"Curriculum state has {key}={state.get(key)!r} but this pipeline "
            f"has {key}={value!r}. Resume with the same curriculum and data "
            "settings, or start the data from scratch (do not restore the "
            "iterator state).")
    self._batches_consumed = int(state["batches_consumed"])
    self._iterator, self._phase = None, None  # rebuilt lazily at the position
