"""Save-and-exit on preemption (SIGTERM from Cloud TPU maintenance or SLURM).

Two signals, one per setting:

* multi-host (``jax.distributed`` initialized): the JAX distributed runtime's
  preemption service catches SIGTERM (on any process) and agrees on a step;
  the loop reads it with ``CheckpointManager.reached_preemption(step)``
  (Orbax's view of it). :func:`jax_preemption_service_active` says whether it
  runs; then no Python handler is installed (it would take SIGTERM away).
* a single process (a laptop, a one-task SLURM job): :class:`PreemptionHandler`
  below.

The signal handler only sets a flag; the train loop polls it between steps,
where the state is consistent, saves a checkpoint at the current step and
returns (the process then exits 0)::

  with PreemptionHandler() as preemption:
    for step in ...:
      state = train_step(state, batch)
      if preemption.should_stop(step):
        ckpt.save(step, state, data_state, force=True)
        ckpt.wait_until_finished()
        break

Later signals while that save runs are logged and otherwise ignored, so a
scheduler that repeats SIGTERM does not interrupt the write. If the process
is killed anyway (SIGKILL after the grace period), Orbax's commit protocol
(write to a tmp directory, rename when complete) keeps the previous
checkpoint the latest valid one.

Should the handler run with several processes (the JAX service turned off
with ``jax_enable_preemption_service=False``), the signal may reach only some
of them while every process must save the same step:
:meth:`PreemptionHandler.should_stop` then takes a cross-process OR of the
flag (a tiny all-gather) every ``sync_every_steps`` steps; all processes must
call it at the same steps.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Iterable, Optional

import jax
import numpy as np


def jax_preemption_service_active() -> bool:
  """Whether the JAX distributed runtime's preemption sync manager is running.

  It is started by ``jax.distributed.initialize`` (unless
  ``jax_enable_preemption_service`` is off) and owns SIGTERM from then on.
  jax 0.10 has no public query for it, hence the private module.
  """
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  return distributed.global_state.preemption_sync_manager is not None


class PreemptionHandler:
  """Turns termination signals into a flag the train loop polls.

  Args:
    signals: signals to catch (default SIGTERM).
    sync_every_steps: with several processes, agree on the flag only every
      this many steps (each check is one small all-gather).
  """

  def __init__(self, signals: Iterable[int] = (signal.SIGTERM,),
               sync_every_steps: int = 1):
    if sync_every_steps < 1:
      raise ValueError(
          f"sync_every_steps must be >= 1, got {sync_every_steps}.")
    self.signals = tuple(signals)
    self.sync_every_steps = sync_every_steps
    self.signal_count = 0
    self._flag = threading.Event()
    self._previous: dict[int, object] = {}

  # -- installation ------------------------------------------------------------

  def install(self) -> "PreemptionHandler":
    """Installs the handlers (must run on the main thread)."""
    if threading.current_thread() is not threading.main_thread():
      raise RuntimeError(
          "PreemptionHandler.install() must be called from the main thread "
          "(Python only delivers signals there); create it in the entry point, "
          "not in a worker thread.")
    for sig in self.signals:
      self._previous[sig] = signal.signal(sig, self._on_signal)
    return self

  def uninstall(self) -> None:
    """Restores the handlers that were there before :meth:`install`."""
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous.clear()

  def __enter__(self) -> "PreemptionHandler":
    return self.install()

  def __exit__(self, *exc) -> None:
    self.uninstall()

  def _on_signal(self, signum, frame) -> None:  # pylint: disable=unused-argument
    self.signal_count += 1
    if self.signal_count == 1:
      logging.warning("Received signal %d: will save a checkpoint at the end "
                      "of the current step and exit.", signum)
    else:
      logging.warning("Received signal %d again (%d times); already saving "
                      "before exit, ignoring it.", signum, self.signal_count)
    self._flag.set()

  # -- polling -----------------------------------------------------------------

  @property
  def requested(self) -> bool:
    """Whether this process received a signal (no cross-process agreement)."""
    return self._flag.is_set()

  def request(self) -> None:
    """Sets the flag by hand (tests, or an external preemption notice)."""
    self._flag.set()

  def should_stop(self, step: Optional[int] = None) -> bool:
    """Whether the loop should save and exit now (the same on all processes).

    Args:
      step: the current step; with several processes the flag is only
        exchanged when ``step % sync_every_steps == 0`` (``None``: always).
    """
    if jax.process_count() == 1:
      return self.requested
    if step is not None and step % self.sync_every_steps:
      return False
    # pylint: disable-next=g-import-not-at-top
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(
        np.asarray(int(self.requested), np.int32))
    return bool(np.any(flags))
