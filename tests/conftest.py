"""Shared test settings.

Before JAX starts: XLA's CPU backend compiles without its expensive LLVM passes, with its older fusion emitters and
its LLVM module in one piece (the tests' programs compile in about a third of the time: the vision test model's
train step in 4-5 s instead of 9-14 s, with the same losses to float32 rounding; they run a little slower, the right
trade for a few steps each), and every compiled program goes to one persistent cache shared by pytest-xdist's
workers and the subprocesses tests start (they inherit the environment), so a program that several tests (or runs of
the entry point) build compiles once.

XLA's CPU runtime runs the fake devices' collectives on one thread pool, sized by the cores (at least one thread per
device): a device waiting at an all-reduce holds a thread, and when every thread waits at a collective that another
device can only reach through a free thread, the run deadlocks (seen twice: a 1-process 8-device language step,
some threads at an all-gather, the others at an all-reduce). NPROC, which XLA reads as the core count, gives the
pool 64 threads. XLA also aborts after 40 s at a collective; the tests give it 10 minutes, so a slow device on a
loaded two-core machine is waited for, and a hang still fails at the test's own timeout."""

import importlib.metadata
import importlib.util
import os
import tempfile

# XLA's CPU compile flags: a JAX with a GPU plugin (the GPU machine) gets none of them unless JAX_PLATFORMS=cpu (its
# XLA may not know them: unknown flags end the process while pytest captures its output, and the GPU tests want
# optimised code).
ON_GPU_HOST = os.environ.get("JAX_PLATFORMS", "") != "cpu" and any(
    importlib.util.find_spec(plugin) for plugin in ("jax_cuda12_plugin", "jax_cuda13_plugin"))
# jaxlib 0.11's XLA no longer knows --xla_cpu_use_fusion_emitters (checked with 0.11.2); it knows the other three.
OLD_XLA = tuple(int(part) for part in importlib.metadata.version("jaxlib").split(".")[:2]) < (0, 11)
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                      "--xla_cpu_parallel_codegen_split_count=1" + (" --xla_cpu_use_fusion_emitters=false" * OLD_XLA))
PATIENT_COLLECTIVE_FLAGS = ("--xla_cpu_collective_call_warn_stuck_timeout_seconds=120 "
                            "--xla_cpu_collective_call_terminate_timeout_seconds=600")
if not ON_GPU_HOST:
    CPU_FLAGS = f"{FAST_COMPILE_FLAGS} {PATIENT_COLLECTIVE_FLAGS}"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {CPU_FLAGS}".strip()
os.environ.setdefault("NPROC", "64")
CACHE = os.path.join(tempfile.gettempdir(), "cab_jax_test_compilation_cache")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402  (after the environment it reads)
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def float32_matmuls():
    """Tests compare against float32/float64 references, so float32 matmuls must be float32: GPUs default to TF32
    (10-bit mantissa) for them. On CPU this changes nothing."""
    with jax.default_matmul_precision("highest"):
        yield


def pytest_collection_modifyitems(items):
    """The slow end-to-end tests first: pytest-xdist's workers then fill the rest of their time with the short tests
    instead of finishing on one long test while the other worker idles."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture
def plot_warnings_without_matplotlib(monkeypatch) -> list[str]:
    """matplotlib made unimportable; returns the list that ``cab_jax.plots``' warnings are appended to."""
    import builtins

    from cab_jax import plots

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    warnings = []
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    monkeypatch.setattr(plots.logging, "warning", lambda msg, *a: warnings.append(msg % a))
    return warnings
