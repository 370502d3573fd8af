"""Every test sees 8 CPU devices (set before jax is imported anywhere)."""
import os

os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split()
     if not f.startswith("--xla_force_host_platform_device_count")]
    + ["--xla_force_host_platform_device_count=8"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import jax  # noqa: E402  pylint: disable=g-import-not-at-top

jax.config.update("jax_threefry_partitionable", True)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def shared_data_dir():
  """The Multi30k data shipped beside the project (``../shared/data``)."""
  here = os.path.dirname(os.path.abspath(__file__))
  path = os.environ.get("MOE_JAX_TEST_DATA_DIR",
                        os.path.join(here, "..", "..", "shared", "data", "multi30k"))
  if not os.path.isdir(path):
    pytest.skip(f"Multi30k data not found at {path}")
  return os.path.abspath(path)


@pytest.fixture
def compilation_cache(tmp_path):
  """A persistent XLA compilation cache for one test: a test whose runs build
  identical train steps as new closures (stop, resume, resume) reuses the
  first run's executables instead of recompiling on the CPU."""
  from jax.experimental.compilation_cache import compilation_cache as cc  # pylint: disable=g-import-not-at-top
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  saved = {n: getattr(jax.config, n) for n in names}
  jax.config.update("jax_compilation_cache_dir", str(tmp_path / "xla_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  cc.reset_cache()
  yield
  for name, value in saved.items():
    jax.config.update(name, value)
  cc.reset_cache()
