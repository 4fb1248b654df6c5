"""The project's shape, read from the source: no import cycle, each wing imports only what its folder allows, one
place builds a TorchTrainer, and every job is a thin entry point (no sys.path tricks, --address on Ray jobs)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dalle_core", "pipelines", "jobs")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every project module ``name`` imports, at module level or inside functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            candidates = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in candidates:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                targets.add(target)
    return targets


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def test_no_import_cycle(graph):
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join(stack[stack.index(nxt):] + [node, nxt])
            if nxt not in state:
                visit(nxt, stack + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_each_wing_imports_only_what_its_folder_allows(graph):
    for name, targets in graph.items():
        if name.startswith("dalle_core"):
            assert not {t for t in targets if not t.startswith("dalle_core")}, (name, targets)
        if name.startswith("pipelines.data"):
            assert not {t for t in targets if t.startswith(("pipelines.train", "pipelines.serve"))}, (name, targets)
        if name.startswith("pipelines.train"):
            assert not {t for t in targets if t.startswith("pipelines.serve")}, (name, targets)
        if name.startswith("pipelines.serve"):
            assert not {t for t in targets if t.startswith("pipelines.train")}, (name, targets)
        assert not {t for t in targets if t.startswith("jobs")}, f"{name} imports a job: {targets}"
    core_sources = "\n".join(p.read_text() for p in (ROOT / "dalle_core").rglob("*.py"))
    assert "import ray" not in core_sources and "from ray" not in core_sources


def test_one_place_builds_a_torch_trainer():
    builders = []
    for path in [*(ROOT / "pipelines").rglob("*.py"), *(ROOT / "jobs").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            called = getattr(node.func, "id", getattr(node.func, "attr", "")) if isinstance(node, ast.Call) else ""
            if called == "TorchTrainer":
                builders.append(str(path.relative_to(ROOT)))
    assert builders == ["pipelines/train/runner.py"]


RAY_JOBS = ("demo", "evaluate", "ingest", "pretokenize", "train", "train_clip", "train_tokenizer", "train_vae")


def test_jobs_are_thin_entry_points():
    jobs = sorted(p.stem for p in (ROOT / "jobs").glob("*.py"))
    for job in jobs:
        source = (ROOT / "jobs" / f"{job}.py").read_text()
        assert "sys.path" not in source, f"jobs/{job}.py edits sys.path; the project is installed"
    helps = {job: subprocess.Popen([sys.executable, f"jobs/{job}.py", "--help"], cwd=ROOT, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE) for job in jobs}
    for job, proc in helps.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, (job, err[-2000:])
        assert ("--address" in out) == (job in RAY_JOBS), (job, out)
