"""The training step, visible to layers whose behaviour is annealed by step.

A few methods change with the training step (the dense-to-sparse gate's
temperature, for instance). Threading ``step`` through every model call
signature would touch every stack for the sake of one router, so the train
step publishes it for the duration of *tracing* instead::

    with schedule.training_step(state.step):
      logits = model.apply(...)

and a layer reads it with :func:`current_step` while it is being traced. The
value is whatever the caller passed -- under ``jax.jit`` a traced scalar --
so the compiled step stays one program for all steps. Outside such a block
(eval, decoding, unit tests that do not set it) :func:`current_step` returns
``None`` and layers must fall back to their end-of-schedule behaviour.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Optional

import jax

_STEP: contextvars.ContextVar[Optional[jax.Array]] = contextvars.ContextVar(
    "moe_jax_training_step", default=None)


@contextlib.contextmanager
def training_step(step) -> Iterator[None]:
  """Makes ``step`` (``<int>[]``, concrete or traced) the current training step."""
  token = _STEP.set(step)
  try:
    yield
  finally:
    _STEP.reset(token)


def current_step() -> Optional[jax.Array]:
  """The step set by the innermost :func:`training_step`, or ``None``."""
  return _STEP.get()
