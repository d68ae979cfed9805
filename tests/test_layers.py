"""The import rule: the pure core never imports `ray` (DESIGN.md "Layers")."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gpa_ray

PACKAGE = Path(gpa_ray.__file__).parent

# Modules of the pure core; every file under these folders is core too.
CORE_MODULES = ["config", "storage", "pretrained", "losses", "metrics", "sinkhorn", "checkpoints"]
CORE_FOLDERS = ["audio", "models"]
CORE_DATA_MODULES = ["data/schema", "data/synthetic", "data/corpora"]


def core_module_names() -> list[str]:
    names = [f"gpa_ray.{m}" for m in CORE_MODULES if (PACKAGE / f"{m}.py").exists()]
    names += [
        "gpa_ray." + m.replace("/", ".")
        for m in CORE_DATA_MODULES
        if (PACKAGE / f"{m}.py").exists()
    ]
    for folder in CORE_FOLDERS:
        for path in sorted((PACKAGE / folder).glob("*.py")):
            stem = path.stem
            names.append(f"gpa_ray.{folder}" if stem == "__init__" else f"gpa_ray.{folder}.{stem}")
    return names


def test_core_imports_without_ray() -> None:
    names = core_module_names()
    assert "gpa_ray.config" in names and len(names) >= 5
    script = (
        "import sys\n"
        "sys.modules['ray'] = None  # any `import ray` now raises ImportError\n"
        f"for name in {names!r}:\n"
        "    __import__(name)\n"
        "assert 'ray' not in sys.modules or sys.modules['ray'] is None\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_core_source_has_no_ray_import() -> None:
    for name in core_module_names():
        path = PACKAGE.parent / (name.replace(".", "/") + ".py")
        if not path.exists():
            path = PACKAGE.parent / name.replace(".", "/") / "__init__.py"
        for line in path.read_text().splitlines():
            stripped = line.strip()
            assert not stripped.startswith(("import ray", "from ray")), f"{path}: {stripped}"
