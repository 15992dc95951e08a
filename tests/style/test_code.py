"""The code's shape, checked in CI: no import cycles between kvfork's packages (issue 17), ruff and mypy clean."""

from __future__ import annotations

import graphlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def package_imports(package: str = "kvfork") -> dict[str, set[str]]:
    """Each child of `package` (a subpackage or a top-level module) -> the others it imports, counting every
    import: top-level, inside functions (lazy) and under TYPE_CHECKING (grimp's defaults)."""
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph(package, cache_dir=None)
    children = sorted(graph.find_children(package))
    return {a: {b for b in children if b != a and graph.direct_import_exists(importer=a, imported=b, as_packages=True)}
            for a in children}


def test_no_import_cycles_between_packages():
    edges = package_imports()
    assert len(edges) > 10 and any(edges.values())  # NOTE: the graph was read (kvfork's children, their imports)
    try:
        graphlib.TopologicalSorter(edges).prepare()
    except graphlib.CycleError as exc:
        pytest.fail(f"package-level import cycle: {' -> '.join(exc.args[1])}")


def test_ruff_is_clean():
    if shutil.which("ruff") is None and subprocess.run([sys.executable, "-m", "ruff", "--version"],
                                                       capture_output=True).returncode:
        pytest.skip("ruff is not installed (pip install -e '.[test]' installs it)")
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "src", "tests", "bench", "examples"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-1000:]


def test_mypy_is_clean():
    # NOTE: ~40 s on a cold cache (one worker); mypy's cache in .mypy_cache makes later local runs ~1 s.
    # Before this ran in CI, 16 type errors crept in unseen between two stops.
    if subprocess.run([sys.executable, "-m", "mypy", "--version"], capture_output=True).returncode:
        pytest.skip("mypy is not installed (pip install -e '.[test]' installs it)")
    proc = subprocess.run([sys.executable, "-m", "mypy", "src/kvfork"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-1000:]
