"""The package layout the README describes: one subpackage per concern, faces that import nothing,
the import rule covering every room, modules of a readable size, and the entry points working."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 450


def _layers() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contract = config["tool"]["importlinter"]["contracts"][0]
    return [name.strip() for layer in contract["layers"] for name in layer.replace("|", ":").split(":")]


def _rooms(package: str) -> list[str]:
    rooms = []
    for child in sorted((ROOT / package).iterdir()):
        if child.name.startswith(("_", ".")):
            continue
        if child.is_dir() and (child / "__init__.py").exists():
            rooms.append(f"{package}.{child.name}")
        elif child.suffix == ".py":
            rooms.append(f"{package}.{child.stem}")
    return rooms


def test_every_launcher_room_is_placed_by_the_import_rule() -> None:
    layers = _layers()
    covered = set(layers)
    missing = [room for room in _rooms("launcher") if room not in covered]
    assert not missing, f"add these to [tool.importlinter] layers in pyproject.toml: {missing}"
    assert layers.index("gateway") < layers.index("launcher.models") < layers.index("launcher.facts")


def _package_faces() -> list[Path]:
    return sorted(p for d in ("gateway", "launcher") for p in (ROOT / d).rglob("__init__.py"))


@pytest.mark.parametrize("face", _package_faces(), ids=lambda p: str(p.relative_to(ROOT)))
def test_a_package_face_maps_its_rooms_and_imports_nothing(face: Path) -> None:
    tree = ast.parse(face.read_text())
    assert ast.get_docstring(tree), f"{face} needs a docstring that maps the package"
    imports = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    assert not imports, f"{face} imports {[ast.unparse(n) for n in imports]}"


def test_no_module_is_too_long_to_read() -> None:
    long = {
        str(p.relative_to(ROOT)): n
        for d in ("gateway", "launcher", "bench")
        for p in (ROOT / d).rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"split these modules (over {MAX_MODULE_LINES} lines): {long}"


def test_benchmarks_import_no_test_module() -> None:
    sources = {p: p.read_text() for p in (ROOT / "bench").rglob("*.py")}
    offenders = [str(p) for p, text in sources.items() if "from tests" in text or "import tests" in text]
    assert not offenders


def test_importing_the_facts_drags_nothing_else_of_corral_in() -> None:
    script = (
        "import sys, launcher.facts.ollama, launcher.facts.perf, launcher.facts.catalog, launcher.facts.faults; "
        "print(sorted(m for m in sys.modules "
        "if m.startswith(('gateway', 'launcher.')) and not m.startswith('launcher.facts')))"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["corral", "--help"],
        ["corral-sim", "--help"],
        [sys.executable, "-m", "launcher.gpus", "--help"],
    ],
    ids=["corral", "corral-sim", "python -m launcher.gpus"],
)
def test_entry_points_run(argv: list[str]) -> None:
    if argv[0] != sys.executable:
        argv = [str(Path(sys.executable).parent / argv[0]), *argv[1:]]
    out = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout


def test_python_m_launcher_gpus_reports_without_nvml() -> None:
    # No NVIDIA driver here: discovery says so in one line and exits non-zero, without a traceback.
    argv = [sys.executable, "-m", "launcher.gpus", "--json"]
    out = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert "Traceback" not in out.stderr, out.stderr
