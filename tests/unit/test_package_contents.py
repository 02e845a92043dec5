"""What ships is what users run: the installed package imports no test or bench tool.

The fakes and the benchmark live outside it (`tests/support/`, `scripts/harness/`);
the runtime stand-ins that `make run` and `make demo` start are `responses_ws_bridge.local`.
"""

from __future__ import annotations

import ast
import importlib.util
import pkgutil
import sys
from pathlib import Path

import responses_ws_bridge

from tests.support.data import SCRIPTS

PACKAGE = "responses_ws_bridge"


def _package_modules() -> dict[str, Path]:
    """Every module of the installed package, by name, with its source file."""
    modules = {PACKAGE: Path(responses_ws_bridge.__file__ or "")}
    for info in pkgutil.walk_packages(responses_ws_bridge.__path__, f"{PACKAGE}."):
        spec = importlib.util.find_spec(info.name)
        assert spec is not None and spec.origin is not None, info.name
        modules[info.name] = Path(spec.origin)
    return modules


def _imported(module: str, path: Path) -> set[str]:
    """The absolute names of what a module imports, anywhere in it (lazy imports too)."""
    is_package = path.name == "__init__.py"
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                names.add(".".join([*base, *([node.module] if node.module else [])]))
            else:
                assert node.module is not None
                names.add(node.module)
    return names


def _tool_roots() -> set[str]:
    """Top-level names a test or bench tool goes by: the test package and what scripts/ holds."""
    roots = {"tests", "scripts", "pytest"}
    roots.update(path.stem for path in SCRIPTS.glob("*.py"))
    roots.update(path.parent.name for path in SCRIPTS.glob("*/__init__.py"))
    return roots


def test_the_walk_sees_the_whole_package() -> None:
    modules = _package_modules()
    assert {
        "responses_ws_bridge.addons.responses_bridge",
        "responses_ws_bridge.recording.replay",
        "responses_ws_bridge.local.upstream",
        "responses_ws_bridge.local.state_server",
    } <= modules.keys()
    assert all(path.is_file() for path in modules.values())


def test_no_module_of_the_package_imports_a_test_or_bench_tool() -> None:
    roots = _tool_roots()
    assert {"tests", "harness", "bench"} <= roots
    offenders = {
        f"{module} imports {name}"
        for module, path in _package_modules().items()
        for name in _imported(module, path)
        if name.split(".")[0] in roots or name.startswith(f"{PACKAGE}.testing")
    }
    assert not offenders


def test_imports_are_read_as_absolute_names_lazy_and_relative_ones_too(tmp_path: Path) -> None:
    module = tmp_path / "mod.py"
    module.write_text(
        "import json\nfrom . import sibling\nfrom ..core import sse\n"
        "def later() -> None:\n    from harness.bench import run\n"
    )
    package = tmp_path / "__init__.py"
    package.write_text("from .mod import later\n")
    assert _imported(f"{PACKAGE}.shell.mod", module) == {
        "json",
        f"{PACKAGE}.shell",
        f"{PACKAGE}.core",
        "harness.bench",
    }
    assert _imported(f"{PACKAGE}.shell", package) == {f"{PACKAGE}.shell.mod"}


def test_the_package_has_no_testing_subpackage() -> None:
    assert not any(
        name == f"{PACKAGE}.testing" or name.startswith(f"{PACKAGE}.testing.")
        for name in _package_modules()
    )
    assert not (Path(responses_ws_bridge.__path__[0]) / "testing" / "__init__.py").exists()


# What `core/` may import besides the standard library and itself: close codes, and the
# decompressors a request body is decoded with (incremental, capped: still no I/O).
# (`from backports import zstd`, `from compression import zstd` on Python 3.14.)
CORE_ALLOWED = {"websockets.frames", "brotli", "backports", "compression"}
# Standard-library modules that do I/O or run things: never in the core.
CORE_FORBIDDEN = {"asyncio", "socket", "ssl", "subprocess", "threading", "selectors", "os"}


def test_the_core_is_the_standard_library_and_itself_and_does_no_io() -> None:
    offenders = set()
    for module, path in _package_modules().items():
        if not module.startswith(f"{PACKAGE}.core"):
            continue
        for name in _imported(module, path):
            root = name.split(".")[0]
            if name.startswith(f"{PACKAGE}.core") or name == "__future__":
                continue
            if name in CORE_ALLOWED or any(name.startswith(f"{a}.") for a in CORE_ALLOWED):
                continue
            if root in sys.stdlib_module_names and root not in CORE_FORBIDDEN:
                continue
            offenders.add(f"{module} imports {name}")
    assert not offenders
