"""Host memory inside the model: per-layer parameter streaming, offloading remat.

* **Parameter streaming.** A parameter the train step left in host memory
  (memory kind ``pinned_host``, ``OFFLOAD_PARAMS``) reaches a layer as a
  host-typed array. :func:`streamed` wraps a layer (or a scanned block of
  layers) so that its parameters are copied to device memory when the layer
  runs: with ``nn.scan`` one block's slice per iteration, so only the block
  being computed sits in HBM (ZeRO-Infinity's idea). Inside a remat'd layer
  the copy is recomputed -- fetched again -- in the backward pass instead of
  being kept; the gradient of the copy flows back to host memory. Device
  arrays pass through untouched, so a run without offload traces the same
  program.
* **Activation offload.** The ``"offload"`` remat policy moves the
  activations named in :mod:`moe_jax.layers.checkpoint_names` (MoE
  dispatch/combine, attention context) to host memory between the forward
  and the backward pass and recomputes the rest.

:func:`is_streamed` says which parameter paths the layers fetch themselves;
the train step moves every other host parameter to the device up front.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import flax.linen as nn
import jax

from moe_jax.layers import checkpoint_names

# Layer modules (``LayerStack``'s children): unrolled ``layers_<i>``, or the
# scanned ``layers`` inside the stack module that is itself named ``layers``.
_UNROLLED = re.compile(r"layers_\d+")


def on_host(x: Any) -> bool:
  """Whether ``x`` (an array or tracer) lives in host memory."""
  space = getattr(jax.typeof(x), "memory_space", None)
  return space == jax.memory.Space.Host


def fetch_if_host(tree: Any) -> Any:
  """``tree`` with every host-memory leaf copied to device memory (same
  sharding); device leaves are returned as they are."""
  return jax.tree_util.tree_map(
      lambda x: jax.device_put(x, jax.memory.Space.Device) if on_host(x) else x, tree)


def streamed(module_cls: type[nn.Module]) -> type[nn.Module]:
  """``module_cls`` whose ``params`` are fetched to the device when it runs.

  Use it on a module that is being *applied* (not initialized): parameter
  creation needs the unwrapped class. Parameter paths are unchanged.
  """
  return nn.map_variables(module_cls, "params", trans_in_fn=fetch_if_host)


def is_streamed(path: Sequence[str]) -> bool:
  """Whether the parameter at ``path`` (names from the ``params`` root) sits in
  a layer of a ``LayerStack`` (fetched by :func:`streamed`)."""
  path = tuple(path)
  for i, name in enumerate(path):
    if _UNROLLED.fullmatch(name):
      return True
    if name == "layers" and i > 0 and path[i - 1] == "layers":
      return True
  return False


def remat_policy(name: str):
  """The ``jax.checkpoint`` policy of a ``T5Config.remat_policy`` name other
  than ``"none"`` (``None`` means save nothing: full recomputation)."""
  if name == "full":
    return None
  if name == "dots_saveable":
    return jax.checkpoint_policies.dots_saveable
  if name == "offload":
    return jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=(),
        names_which_can_be_offloaded=checkpoint_names.OFFLOADED_ACTIVATIONS,
        offload_src="device", offload_dst="pinned_host")
  raise ValueError(f"remat_policy={name!r} has no checkpoint policy.")
