"""The benchmark scripts are run on a GPU machine, never by the tests: each name they import from this repository
(``cab_jax``, ``benchmarks/common.py``, ``benchmarks/mamba_cuda/bench.py``), at any depth of a script (lazy imports
inside functions included), must exist, or the first sign of a rename is a lost device call."""

import ast
import importlib
import pathlib
import subprocess
import sys

import pytest
from test_launch import shellcheck

BENCHMARKS = pathlib.Path(__file__).parents[1] / "benchmarks"
SCRIPTS = sorted(BENCHMARKS.rglob("*.py"))
LOCAL = {"common": BENCHMARKS, "bench": BENCHMARKS / "mamba_cuda"}  # modules the scripts import off sys.path


def repository_imports(path: pathlib.Path) -> list[tuple[str, str]]:
    """(module, name) for every ``from <repository module> import name`` in ``path``."""
    pairs = []
    for node in ast.walk(ast.parse(path.read_text())):
        local = isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
        if local and (node.module in LOCAL or node.module.split(".")[0] == "cab_jax"):
            pairs += [(node.module, alias.name) for alias in node.names]
    return pairs


def test_the_scripts_are_found():
    assert {"train_throughput.py", "step.py", "bench.py"} <= {p.name for p in SCRIPTS}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(BENCHMARKS)))
def test_every_name_a_benchmark_imports_from_the_repository_exists(script, monkeypatch):
    for module, name in repository_imports(script):
        if module in LOCAL:
            monkeypatch.syspath_prepend(str(LOCAL[module]))
            monkeypatch.delitem(sys.modules, module, raising=False)
        imported = importlib.import_module(module)
        submodule = hasattr(imported, "__path__") and importlib.util.find_spec(f"{module}.{name}")
        assert hasattr(imported, name) or submodule, (
            f"{script.name}: `from {module} import {name}`: {module} has no {name}")


def test_the_benchmark_shell_scripts_are_shellcheck_clean():
    scripts = sorted(BENCHMARKS.rglob("*.sh"))
    assert {p.name for p in scripts} >= {"build.sh", "compare.sh"}
    proc = subprocess.run([shellcheck(), *scripts], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_matmul_flops_counts_products_convolutions_and_every_scan_iteration(monkeypatch):
    import jax
    import jax.numpy as jnp

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from common import matmul_flops

    w, x = jnp.ones((3, 8, 16)), jnp.ones((4, 8))
    layers = lambda w, x: jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi[:, :8]), None), x, w)[0]
    assert matmul_flops(layers, w, x) == 3 * 2 * 4 * 8 * 8
    images, kernel = jnp.ones((2, 3, 16, 16)), jnp.ones((5, 3, 4, 4))  # NCHW, OIHW; stride 4: 4 x 4 outputs
    patchify = lambda i, k: jax.lax.conv_general_dilated(i, k, (4, 4), "VALID")
    assert matmul_flops(patchify, images, kernel) == 2 * (2 * 5 * 4 * 4) * (3 * 4 * 4)
    assert matmul_flops(jax.jit(lambda a: a @ a.T), x) == 2 * 4 * 4 * 8  # inside a nested jit
