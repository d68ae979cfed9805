"""The import rule (DESIGN.md "Layers"): the pure core never imports `ray`, and imports only
other core modules, deferred imports included; and no import cycle anywhere in gpa_ray."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import gpa_ray

PACKAGE = Path(gpa_ray.__file__).parent

CORE = (
    "gpa_ray.config",
    "gpa_ray.config_loading",
    "gpa_ray.credentials",
    "gpa_ray.storage",
    "gpa_ray.checkpoints",
    "gpa_ray.pretrained",
    "gpa_ray.losses",
    "gpa_ray.metrics",
    "gpa_ray.sinkhorn",
    "gpa_ray.sinkhorn_fast",
    "gpa_ray.bias_file",
    "gpa_ray.embedding_table",
    "gpa_ray.audio",
    "gpa_ray.models",
    "gpa_ray.data.schema",
    "gpa_ray.data.captions",
    "gpa_ray.data.lexicon",
    "gpa_ray.data.corpora",
    "gpa_ray.data.hf_dataset",
    "gpa_ray.data.audioset_index",
    "gpa_ray.data.synthetic_audioset",
    "gpa_ray.data.synthetic",
    "gpa_ray.data.work_units",
    "gpa_ray.data.failure_report",
    "gpa_ray.data.weighted_sampling",
    "gpa_ray.index.ann",
    "gpa_ray.index.store",
    "gpa_ray.index.shard_files",
    "gpa_ray.index.mapped",
    "gpa_ray.index.search",
    "gpa_ray.index.reuse",
)
"""The pure core, the one list of it: these modules and every module of these packages."""


def package_modules() -> dict[str, Path]:
    """Every module of gpa_ray by dotted name (a package by its `__init__.py`)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def is_core(name: str) -> bool:
    return any(name == core or name.startswith(core + ".") for core in CORE)


def core_module_names() -> list[str]:
    return [name for name in package_modules() if is_core(name)]


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every module `path` imports, at module level or inside a function: `from a import b`
    counts as `a.b` when that is a module of gpa_ray, else as `a`."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            submodules = {f"{node.module}.{alias.name}" for alias in node.names}
            named = submodules & modules.keys()
            found.update(named or {node.module})
            if len(named) < len(submodules):
                found.add(node.module)
    return found


def test_core_list_names_real_modules() -> None:
    modules = package_modules()
    for core in CORE:
        assert core in modules, f"{core} in CORE is not a module of gpa_ray"
    assert len(core_module_names()) > len(CORE)


def test_core_imports_only_core_modules_and_never_ray() -> None:
    modules = package_modules()
    for name in core_module_names():
        for target in imports_of(modules[name], modules):
            assert target.split(".")[0] != "ray", f"{name} imports {target}"
            if target.startswith("gpa_ray.") or target == "gpa_ray":
                assert is_core(target), f"core module {name} imports {target} (not core)"


def test_no_import_cycle_in_the_package() -> None:
    modules = package_modules()
    graph = {
        name: {t for t in imports_of(path, modules) if t in modules and t != name}
        for name, path in modules.items()
    }
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                cycle = path[path.index(target) :] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, [*path, target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_core_imports_without_ray() -> None:
    names = core_module_names()
    script = (
        "import sys\n"
        "sys.modules['ray'] = None  # any `import ray` now raises ImportError\n"
        f"for name in {names!r}:\n"
        "    __import__(name)\n"
        "assert 'ray' not in sys.modules or sys.modules['ray'] is None\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
