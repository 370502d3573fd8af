"""Ahead-of-time compilation for Cloud TPU topologies, from any machine.

``moe-compile`` (:mod:`moe_jax.compile`) compiles the train step of
``moe-train`` for compile-only TPU devices (libtpu, no TPU needed) and reports
what the program needs. The parts, one job each:

* :mod:`~moe_jax.aot.chips`: published per-chip figures (bf16 peak FLOP/s,
  HBM size and bandwidth) of TPU v4, v5e, v5p and v6e, with their sources.
* :mod:`~moe_jax.aot.topology`: accelerator-type names (``v5p-128``,
  ``v5litepod-16``, ``v5p:4x4x4``) -> topology descriptors -> compile-only
  devices (one per chip, ``num_slices`` slices).
* :mod:`~moe_jax.aot.hlo`: the compiled HLO text -> collectives per step
  (count, bytes per chip), while-loop trip counts, and the FLOPs/bytes that
  XLA's cost analysis leaves out of loop bodies.
* :mod:`~moe_jax.aot.model_flops`: model FLOPs per step (the MFU numerator).
* :mod:`~moe_jax.aot.report`: memory analysis, fit, roofline bound and the
  JSON / human report.
* :mod:`~moe_jax.aot.step`: gin configuration -> the ``moe-train``
  experiment on compile-only devices -> its train step lowered, compiled
  and reported (what ``moe-compile`` runs).
* :mod:`~moe_jax.aot.platforms`: keep CPU-only runs from probing for TPUs
  when libtpu is installed.

:mod:`platforms` imports nothing from jax, so it can run before jax starts;
the others import jax and the training code lazily or not at all.
"""
