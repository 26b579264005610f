"""README's layout promise: imports run one way, kernels -> models -> bridge/losses -> domains -> train -> entry
points, with the shared utilities (errors, sharding, checkpoints, data pipelines...) below them all. Every import
in the package, at any depth of a module (lazy imports inside functions included), is read from the source."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).parents[1] / "cab_jax"

# Layers from the bottom; a module may import its own layer and those below it. Keyed by the first name under
# cab_jax (cab_jax.models.vim -> "models").
LAYERS = (
    {"errors", "timing", "prefetch", "plots", "sharding", "checkpoint", "cli", "preemption", "data"},  # utilities
    {"kernels"},
    {"models"},
    {"bridge", "losses", "convert"},
    {"domains", "config"},
    {"train", "summary"},
    {"main", "study", "analyze", "generate", "lower", "memory_plan"},  # entry points and their helpers
)


def layer_of(module: str) -> int | None:
    """The layer of a dotted cab_jax module name (None for the package itself)."""
    parts = module.split(".")
    if len(parts) < 2:
        return None
    found = [i for i, names in enumerate(LAYERS) if parts[1] in names]
    assert found, f"{module} is in no layer of LAYERS: add it where it belongs"
    return found[0]


def imported_modules(path: pathlib.Path) -> set[str]:
    """The cab_jax modules ``path`` imports (``from cab_jax import x`` counts as cab_jax.x)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= ({f"{node.module}.{alias.name}" for alias in node.names} if node.module == "cab_jax"
                      else {node.module})
    return {name for name in names if name.startswith("cab_jax.")}


def upward_imports(root: pathlib.Path = ROOT) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        module = ".".join(path.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__")
        own = layer_of(module)
        for name in sorted(imported_modules(path)):
            target = layer_of(name)
            if own is not None and target is not None and target > own:
                found.append(f"{module} (layer {own}) imports {name} (layer {target})")
    return found


def test_imports_run_one_way():
    assert upward_imports() == []


def test_an_upward_import_is_caught(tmp_path):
    package = tmp_path / "cab_jax"
    (package / "models").mkdir(parents=True)
    (package / "models" / "vim.py").write_text("def f():\n    from cab_jax import train\n")
    (package / "train.py").write_text("from cab_jax.models import vim\n")
    assert upward_imports(package) == ["cab_jax.models.vim (layer 2) imports cab_jax.train (layer 5)"]


NO_TORCH = """
import importlib, importlib.abc, pkgutil, sys

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is not installed (this test hides it)")

sys.meta_path.insert(0, NoTorch())
from absl import flags
import cab_jax
names = sorted(m.name for m in pkgutil.walk_packages(cab_jax.__path__, "cab_jax.")
               if not m.name.startswith("cab_jax.convert"))
for name in names:
    importlib.import_module(name)
    for flag in list(flags.FLAGS):  # entry points define flags of the same names at import
        delattr(flags.FLAGS, flag)
print(len(names))
"""


def test_only_checkpoint_conversion_needs_torch():
    """README: torch is needed only for checkpoint conversion. With torch hidden, every other module of the package
    imports."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", NO_TORCH], capture_output=True, text=True, timeout=300,
                          cwd=ROOT.parent)
    assert proc.returncode == 0 and int(proc.stdout.split()[-1]) > 30, proc.stderr[-3000:]


def test_readmes_layout_names_every_module_and_only_modules_that_exist():
    """README's layout block: every module of the package is named there, and every module it names exists (its
    configs/ and launch/ lines name those directories' files)."""
    import re

    readme = (ROOT.parent / "README.md").read_text()
    block = readme[readme.index("```\ncab_jax/"):]
    block = block[: block.index("```", 4)]
    named = set(re.findall(r"\w+\.py", block))
    modules = {p.name for p in ROOT.rglob("*.py") if p.name != "__init__.py"}
    configs = {p.name for folder in ("configs", "launch") for p in (ROOT.parent / folder).glob("*.py")}
    assert modules <= named, f"not in README's layout: {sorted(modules - named)}"
    assert named <= modules | configs, f"named in README's layout but absent: {sorted(named - modules - configs)}"

