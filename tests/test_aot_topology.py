"""TPU topology names, compile-only devices, chip figures, start-up defaults."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moe_jax.aot import chips, hlo, platforms, topology

needs_libtpu = pytest.mark.skipif(not platforms.libtpu_installed(),
                                  reason='libtpu not installed (pip install -e ".[tpu]")')


@pytest.mark.parametrize("name, libtpu_name, num_chips, accelerator_type", [
    # Cloud TPU counts TensorCores for v4 / v5p (2 per chip), chips for v5e / v6e.
    ("v4-32", "v4:2x2x4", 16, "v4-32"),
    ("v4-2048", "v4:8x8x16", 1024, "v4-2048"),
    ("v5litepod-16", "v5e:4x4", 16, "v5litepod-16"),
    ("v5e-16", "v5e:4x4", 16, "v5litepod-16"),
    ("v5litepod-8", "v5e:2x4", 8, "v5litepod-8"),
    ("v5p-8", "v5p:2x2x1", 4, "v5p-8"),
    ("v5p-128", "v5p:4x4x4", 64, "v5p-128"),
    ("v5p-1024", "v5p:8x8x8", 512, "v5p-1024"),
    ("V6E-256", "v6e:16x16", 256, "v6e-256"),
    ("v5p:4x4x8", "v5p:4x4x8", 128, "v5p-256"),
    ("v6e:2x4", "v6e:2x4", 8, "v6e-8"),
])
def test_accelerator_types_follow_cloud_tpu_naming(name, libtpu_name, num_chips,
                                                   accelerator_type):
  topo = topology.parse(name)
  assert (topo.name, topo.num_chips, topo.accelerator_type) == (
      libtpu_name, num_chips, accelerator_type)


def test_default_shapes_match_the_documented_v5p_slices():
  # https://cloud.google.com/tpu/docs/v5p, "Configurations": topology -> chips.
  documented = {"2x2x1": 4, "2x2x2": 8, "2x4x4": 32, "4x4x4": 64, "4x4x8": 128,
                "4x8x8": 256, "8x8x8": 512, "8x8x16": 1024, "8x16x16": 2048,
                "16x16x16": 4096}
  for shape, n in documented.items():
    assert "x".join(map(str, topology.default_shape(n, 3))) == shape
  # https://cloud.google.com/tpu/docs/v5e: 2D slices.
  for shape, n in {"1x1": 1, "2x2": 4, "2x4": 8, "4x4": 16, "4x8": 32, "8x8": 64,
                   "8x16": 128, "16x16": 256}.items():
    assert "x".join(map(str, topology.default_shape(n, 2))) == shape


def test_slices_multiply_chips():
  topo = topology.parse("v5p-128", num_slices=2)
  assert (topo.chips_per_slice, topo.num_chips) == (64, 128)
  assert "x 2 slices" in topo.describe()


@pytest.mark.parametrize("name, slices, message", [
    ("v5p-7", 1, "count TensorCores"),
    ("v3-8", 1, "Unknown TPU generation 'v3'"),
    ("tpu", 1, "not a TPU topology"),
    ("v5p:4x4", 1, "--topology=v5p:4x4x4"),
    ("v5p-12288", 1, "give the shape explicitly"),
    ("v5e-512", 1, "Use --num_slices"),
    ("v5p-8", 0, "--num_slices=0"),
])
def test_bad_names_say_what_to_type(name, slices, message):
  with pytest.raises(topology.TopologyError, match=message):
    topology.parse(name, slices)


@needs_libtpu
def test_compile_only_devices_one_per_chip_with_matching_kind():
  for name, generation in (("v4-8", "v4"), ("v5litepod-4", "v5e"), ("v5p-8", "v5p"),
                           ("v6e-4", "v6e")):
    devices = topology.compile_only_devices(topology.parse(name))
    assert len(devices) == 4
    assert {d.device_kind for d in devices} == {chips.CHIPS[generation].device_kind}
  two = topology.compile_only_devices(topology.parse("v5p-8", num_slices=2))
  assert len(two) == 8 and {d.slice_index for d in two} == {0, 1}


def test_without_libtpu_the_error_says_what_to_install(monkeypatch):
  monkeypatch.setattr(platforms, "libtpu_installed", lambda: False)
  with pytest.raises(topology.LibtpuMissingError, match=r'pip install -e "\.\[tpu\]"'):
    topology.compile_only_devices(topology.parse("v5p-8"))


def test_chip_figures_from_the_cloud_tpu_pages():
  assert chips.chip("v5p").peak_bf16_flops == 459e12
  assert chips.chip("v5p").hbm_bytes == 95 * 2**30
  assert chips.chip("v5litepod").hbm_bytes_per_s == 819e9
  assert chips.chip("v4").hbm_bytes_per_s == 1200e9
  assert chips.chip("v6e").peak_bf16_flops == 918e12
  assert all(c.source.startswith("https://cloud.google.com/tpu/docs/")
             for c in chips.CHIPS.values())


@needs_libtpu
def test_cpu_runs_do_not_probe_for_tpus():
  """With libtpu installed and no accelerator, importing moe_jax keeps jax on
  the CPU: no libtpu start-up lines, no TPU backend."""
  if platforms.tpu_chips_attached() or platforms.gpu_attached():
    pytest.skip("this machine has an accelerator")
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  code = "import moe_jax, jax; print(jax.default_backend(), jax.device_count())"
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                       text=True, timeout=120, check=True)
  assert out.stdout.split()[0] == "cpu"
  assert "TPU" not in out.stderr and "libtpu" not in out.stderr


@needs_libtpu
def test_loop_correction_matches_the_unrolled_program():
  """XLA's cost analysis counts a while body once: the scanned program plus
  hlo's loop correction should reach the FLOPs XLA counts for the same
  computation unrolled (an independent reference)."""
  devices = topology.compile_only_devices(topology.parse("v5p-8"))
  mesh = Mesh(np.asarray(devices), ("x",))
  layer = NamedSharding(mesh, P(None, "x"))
  batch = NamedSharding(mesh, P("x", None))

  def step(a, w):
    a = jnp.tanh(a @ w)
    a = jax.lax.with_sharding_constraint(a, layer)
    return jax.lax.with_sharding_constraint(a, batch)

  def unrolled(w, a):
    for i in range(8):
      a = step(a, w[i])
    return a

  def scanned(w, a):
    return jax.lax.scan(lambda a, wi: (step(a, wi), None), a, w)[0]

  results = {}
  for fn in (unrolled, scanned):
    compiled = jax.jit(fn, in_shardings=(NamedSharding(mesh, P()), batch)).lower(
        jax.ShapeDtypeStruct((8, 512, 512), jnp.float32),
        jax.ShapeDtypeStruct((1024, 512), jnp.float32)).compile()
    analysis = hlo.analyze(compiled.as_text())
    results[fn.__name__] = (compiled.cost_analysis()["flops"] + analysis.loop_extra_flops,
                            analysis.collectives["all-to-all"]["count"])
  assert results["scanned"][0] == pytest.approx(results["unrolled"][0], rel=0.02)
  assert results["scanned"][1] == results["unrolled"][1] == 8
