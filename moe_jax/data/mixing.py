"""Temperature-based mixing rates (T5 / mT5 style).

A Task with ``n`` training examples gets rate ``min(n, maximum) ** (1 / T)``;
seqio normalises rates into sampling probabilities. ``T = 1`` samples in
proportion to size, ``T -> inf`` uniformly. mT5's "exponent" ``alpha = 0.3``
is ``T = 1 / 0.3``.
"""

from __future__ import annotations

import functools
from typing import Mapping, Optional

import seqio


def temperature_probabilities(sizes: Mapping[str, int], temperature: float,
                              maximum: Optional[int] = None) -> dict[str, float]:
  """Sampling probability per name: ``n_i^(1/T) / sum_j n_j^(1/T)``."""
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature}.")
  rates = {k: float(min(n, maximum) if maximum else n) ** (1.0 / temperature)
           for k, n in sizes.items()}
  total = sum(rates.values())
  return {k: r / total for k, r in rates.items()}


def temperature_rate(temperature: float, maximum: Optional[int] = None):
  """A seqio rate function ``task -> n^(1/T)`` (``n`` = the task's train size)."""
  return functools.partial(seqio.mixing_rate_num_examples,
                           temperature=temperature, maximum=maximum)


def exponent_rate(exponent: float, maximum: Optional[int] = None):
  """mT5's form: rate ``n ** exponent`` (``exponent = 1 / temperature``)."""
  if exponent <= 0:
    raise ValueError(f"exponent must be > 0, got {exponent}.")
  return temperature_rate(1.0 / exponent, maximum)
