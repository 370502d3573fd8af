"""Small NumPy reference functions shared by the MoE tests (independent of JAX)."""

import numpy as np


def gelu_tanh(x):
  """The tanh approximation of GELU (T5 v1.1's ``gelu_new``)."""
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def softmax(x):
  x = x - x.max(-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(-1, keepdims=True)
