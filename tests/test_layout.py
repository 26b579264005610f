"""README's layout promise: imports run one way, kernels -> models -> bridge/losses -> domains -> train -> entry
points, with the shared utilities (errors, sharding, checkpoints, data pipelines...) below them all. Every import
in the package, at any depth of a module (lazy imports inside functions included), is read from the source."""

import ast
import importlib.metadata
import pathlib
import re
import subprocess
import sys

import pytest
from readme_text import README

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
    proc = subprocess.run([sys.executable, "-c", NO_TORCH], capture_output=True, text=True, timeout=300,
                          cwd=ROOT.parent)
    assert proc.returncode == 0 and int(proc.stdout.split()[-1]) > 30, proc.stderr[-3000:]


def test_readmes_layout_names_every_module_and_only_modules_that_exist():
    """README's layout block: every module of the package is named there, and every module it names exists (its
    configs/ and launch/ lines name those directories' files)."""
    readme = README.read_text()
    block = readme[readme.index("```\ncab_jax/"):]
    block = block[: block.index("```", 4)]
    named = set(re.findall(r"\w+\.py", block))
    modules = {p.name for p in ROOT.rglob("*.py") if p.name != "__init__.py"}
    configs = {p.name for folder in ("configs", "launch") for p in (ROOT.parent / folder).glob("*.py")}
    assert modules <= named, f"not in README's layout: {sorted(modules - named)}"
    assert named <= modules | configs, f"named in README's layout but absent: {sorted(named - modules - configs)}"


# README's promises about the repository's own files: extras, links, lists of files, torch in the tests.

REPO = ROOT.parent


def requirement_name(requirement: str) -> str:
    """``"pytest-xdist>=3.5"`` -> ``"pytest_xdist"`` (PEP 503 normalised, ``-``/``.`` as ``_``)."""
    return re.sub(r"[-_.]+", "_", re.match(r"[A-Za-z0-9_.-]+", requirement.strip()).group()).lower()


def test_pyprojects_extras_hold_what_readme_says_they_do():
    """README's commands install extras: each one it names exists; `.[test]` runs `pytest -n 2` and gets every
    package a test imports; `.[convert]` what checkpoint conversion imports (torch, safetensors); `.[plot]`
    matplotlib for the figures; README's torch pin is pyproject's."""
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11's tomllib reads pyproject.toml")
    readme = README.read_text()
    text = (REPO / "pyproject.toml").read_text()
    project = tomllib.loads(text)["project"]
    extras = {name: {requirement_name(r) for r in reqs} for name, reqs in project["optional-dependencies"].items()}
    named = set(re.findall(r"pip install -e '?\.\[(\w+)\]", readme))
    assert {"test", "convert", "plot", "gpu"} <= named and named <= set(extras), (named, sorted(extras))
    assert "pip install torch==2.13.0 && pip install -e '.[test]' && python -m pytest tests -n 2" in readme
    assert {"pytest", "pytest_xdist"} <= extras["test"]
    assert {"torch", "safetensors"} <= extras["convert"]
    assert "matplotlib" in extras["plot"]
    assert set(re.findall(r"torch==([\d.]+)", readme)) == set(re.findall(r"torch==([\d.]+)", text)) == {"2.13.0"}

    def closure(roots: set[str]) -> set[str]:
        """The distributions ``roots`` install, their requirements' requirements included (markers ignored)."""
        seen, todo = set(), list(roots)
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            try:
                requires = importlib.metadata.requires(name) or []
            except importlib.metadata.PackageNotFoundError:
                continue
            todo += [requirement_name(r) for r in requires if "extra ==" not in r]
        return seen

    core = {requirement_name(r) for r in project["dependencies"]}
    with_extras = {"test": core | extras["test"] | extras["convert"] | extras["plot"],  # test pulls [convert,plot]
                   "convert": core | extras["convert"], "plot": core | extras["plot"]}
    assert "cab_jax[convert,plot]" in {r.replace("-", "_") for r in project["optional-dependencies"]["test"]}
    providers = {module: {requirement_name(d) for d in dists}
                 for module, dists in importlib.metadata.packages_distributions().items()}
    local = {p.stem for folder in ("tests", "benchmarks", "configs", "launch", "docs")  # scripts put on sys.path
             for p in (REPO / folder).rglob("*.py")} | {p.name for p in REPO.iterdir() if p.is_dir()}  # cab_jax...
    for extra, paths in {"test": sorted((REPO / "tests").glob("*.py")),
                         "convert": sorted((ROOT / "convert").glob("*.py")), "plot": [ROOT / "plots.py"]}.items():
        installed = closure(with_extras[extra])
        for path in paths:
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    tops = {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    tops = {node.module.split(".")[0]}
                else:
                    continue
                for top in tops - local - set(sys.stdlib_module_names):
                    assert providers.get(top, set()) & installed, (
                        f"{path.relative_to(REPO)} imports {top}, which pip install -e '.[{extra}]' does not install")


# The test modules allowed to import torch (or transformers, which imports it) at module level: README says torch
# is only for the checkpoint-conversion tests and names these.
CONVERSION_TESTS = "test_convert_*.py"
TORCH = {"torch", "transformers"}


def module_level_torch(path: pathlib.Path, tests: pathlib.Path) -> list[str]:
    """What makes importing the test module ``path`` import torch: its module-level imports (``if``/``try`` and
    class bodies included, function bodies not) of torch, transformers, a module-level ``importorskip`` of them, or
    of another test module that does."""
    found, todo = [], list(ast.parse(path.read_text()).body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "importorskip"
              and node.args and isinstance(node.args[0], ast.Constant)):
            names = [node.args[0].value]
        for name in names:
            top = name.split(".")[0]
            if top in TORCH:
                found.append(f"{path.name}:{node.lineno} imports {name}")
            elif (tests / f"{top}.py").exists() and (tests / f"{top}.py") != path:
                found += [f"{path.name}:{node.lineno} imports {top}, and " + why
                          for why in module_level_torch(tests / f"{top}.py", tests)]
        todo += list(ast.iter_child_nodes(node))
    return found


def test_only_the_conversion_tests_import_torch():
    """README: torch is only for the checkpoint-conversion tests (it names them). No other test module imports
    torch or transformers when it is collected: the tests that compare with them import them inside, and skip
    without them."""
    assert f"`tests/{CONVERSION_TESTS}`" in README.read_text()
    tests = REPO / "tests"
    conversion = set(tests.glob(CONVERSION_TESTS))
    assert len(conversion) >= 3
    found = [why for path in sorted(set(tests.glob("*.py")) - conversion) for why in module_level_torch(path, tests)]
    assert found == [], "torch outside the conversion tests (import it inside the test that needs it):\n" + "\n".join(
        found)


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation but ``-`` and ``_`` dropped, spaces -> ``-``."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_path_and_link_readme_gives_exists():
    """Every relative link of README.md and of the pages in docs/ (files, and README's #anchors to its headings),
    every repository path README writes (``configs/demo.py``, ``launch/tpu_pod.sh``, ``BENCHMARKS.md``...; not
    placeholders like ``configs/NAME.py``) and every ``python -m cab_jax...`` module it runs exists."""
    readme = README.read_text()
    missing = []
    for page in [README, *sorted((REPO / "docs").glob("*.md"))]:
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)  # not the comments in code blocks
        anchors = {github_anchor(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            if target.startswith("#"):
                missing += [f"{page.name}: {target}"] * (target[1:] not in anchors)
            elif not (page.parent / target.split("#")[0]).exists():
                missing.append(f"{page.name}: {target}")
    paths = set(re.findall(r"(?<![\w/.:-])((?:configs|launch|docs|benchmarks|cab_jax|tests)/[\w./*-]*|[A-Z]+\.md)",
                           readme))
    assert len(paths) > 20
    for path in sorted(paths):
        path = path.rstrip(".")
        if not re.search(r"/[A-Z_]+(\.\w+)?$", path) and not list(REPO.glob(path)):
            missing.append(f"README.md: {path}")
    modules = set(re.findall(r"python3? -m (cab_jax[\w.]*)", readme))
    assert len(modules) > 5
    for module in sorted(modules):
        base = REPO.joinpath(*module.split("."))
        if not (base.with_suffix(".py").exists() or (base / "__main__.py").exists()):
            missing.append(f"README.md: python -m {module}")
    assert missing == []


def markdown_sections(text: str, level: str = "## ") -> dict[str, str]:
    """Heading -> the text under it, for the headings of ``level``."""
    parts = re.split(rf"^{level}(.+)$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_the_pages_readme_links_hold_what_it_says_they_do():
    """docs/results.md: both demos' tables (vision, language), the digits study's table and plot, the variants
    tried; docs/running_at_scale.md: each launch script (the ones not sourced by the others), its NCCL and SLURM
    settings, exit status 75, the disk a run needs; docs/augmentation_gallery.png: eight draws per photo."""
    from PIL import Image

    results = (REPO / "docs" / "results.md").read_text()
    sections = markdown_sections(results)
    for words, what in [(("Vision", "Vim"), "the vision demo"), (("Language", "Phi-Mamba"), "the language demo"),
                        (("study", "configs/study_digits.py"), "the digits study")]:
        found = [body for heading, body in sections.items() if all(w in heading for w in words)]
        assert found and re.search(r"^\|.*\|$", found[0], flags=re.M), f"docs/results.md: no table for {what}"
    assert "study_digits.png" in results and re.search(r"^#+ .*(variant|ablation)", results, flags=re.M | re.I)

    scale = (REPO / "docs" / "running_at_scale.md").read_text()
    launch = REPO / "launch"
    sourced = {name for text in (p.read_text() for p in launch.iterdir()) for name in re.findall(
        r"^source .*/([\w.]+)\"?", text, flags=re.M)}
    scripts = {p.name for p in launch.iterdir() if p.is_file()} - sourced
    assert sourced == {"common.sh"} and len(scripts) == 6
    assert [name for name in sorted(scripts) if name not in scale] == [], "scripts docs/running_at_scale.md omits"
    assert all(word in scale for word in ("NCCL", "SLURM", "| 75 |", "requeue")) and "Disk" in markdown_sections(scale)

    gallery = (REPO / "docs" / "make_augmentation_gallery.py").read_text()
    draws, tile = (int(n) for n in re.search(r"^DRAWS, TILE, \w+ = (\d+), (\d+),", gallery, flags=re.M).groups())
    assert draws == 8 and Image.open(REPO / "docs" / "augmentation_gallery.png").width == (1 + draws) * tile


def layout_entry(name: str) -> str:
    """The text of README's layout block for the entry ``name`` (its first line and those indented under it)."""
    readme = README.read_text()
    block = readme[readme.index("```\ncab_jax/"):]
    lines = block[: block.index("```", 4)].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(name))
    end = next((i for i in range(start + 1, len(lines)) if lines[i][:1] not in (" ", "")), len(lines))
    return "\n".join(lines[start:end])[len(name):]


def test_readmes_configs_and_launch_lines_list_exactly_those_directories_files():
    for folder in ("configs", "launch"):
        listed = set(re.findall(r"[\w.]+\.(?:py|sh|sbatch)\b", layout_entry(f"{folder}/")))
        present = {p.name for p in (REPO / folder).iterdir() if p.is_file()}
        assert listed == present, f"README's {folder}/ line: {sorted(listed - present)} absent, " \
                                  f"{sorted(present - listed)} not listed"
