"""The compiled hot path (gatewayd/native.py): what is compiled, the stale-build guard in a
checkout, and GATEWAYD_PURE_PYTHON=1, which runs the Python sources instead."""

from __future__ import annotations

import ast
import importlib.machinery
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gatewayd import native

REPO = Path(__file__).resolve().parent.parent
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


def _checkout(tmp_path: Path) -> Path:
    """A fake checkout: setup.py and every compiled module's source, with a compiled file
    beside each that is newer than its source."""
    (tmp_path / "setup.py").write_text("")
    for module in native.COMPILED:
        source = native.source_path(module, tmp_path)
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_text("")
        compiled = source.with_name(source.stem + SUFFIX)
        compiled.write_bytes(b"")
        os.utime(source, (1_000_000, 1_000_000))
        os.utime(compiled, (2_000_000, 2_000_000))
    return tmp_path


def test_sources_of_the_compiled_modules_exist() -> None:
    for module in native.COMPILED:
        assert native.source_path(module, REPO).is_file(), module


def test_a_source_newer_than_its_compiled_module_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(native.PURE_ENV, raising=False)
    root = _checkout(tmp_path)
    native.check_fresh(root / "gatewayd")  # all compiled after their sources: fine
    assert native.stale(root) == []
    edited = native.source_path("gatewayd.workers.proxy", root)
    os.utime(edited, (3_000_000, 3_000_000))
    assert native.stale(root) == ["workers/proxy.py"]
    with pytest.raises(ImportError, match=r"workers/proxy.py changed after it was compiled.*"
                                          r"make"):
        native.check_fresh(root / "gatewayd")
    monkeypatch.setenv(native.PURE_ENV, "1")  # the sources run then: nothing is stale
    native.check_fresh(root / "gatewayd")


def test_no_check_outside_a_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An installed wheel has no setup.py beside the package; its files share one install
    time, so their order says nothing."""
    monkeypatch.delenv(native.PURE_ENV, raising=False)
    root = _checkout(tmp_path)
    (root / "setup.py").unlink()
    os.utime(native.source_path("gatewayd.workers.proxy", root), (3_000_000, 3_000_000))
    native.check_fresh(root / "gatewayd")


def _imported_from(env_pure: bool) -> dict[str, str]:
    """Where a fresh interpreter imports each compiled module from."""
    env = {k: v for k, v in os.environ.items() if k != native.PURE_ENV}
    if env_pure:
        env[native.PURE_ENV] = "1"
    code = ("import importlib, json, gatewayd.native as n\n"
            "print(json.dumps({m: importlib.import_module(m).__file__ for m in n.COMPILED}))")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, check=True,
                         capture_output=True, text=True, timeout=60).stdout
    return dict(json.loads(out))


def test_pure_python_switch_imports_the_sources() -> None:
    files = _imported_from(env_pure=True)
    assert all(path.endswith(".py") for path in files.values()), files


@pytest.mark.skipif(bool(os.environ.get(native.PURE_ENV)),
                    reason="this run tests the Python sources on purpose")
def test_the_suite_runs_the_compiled_build() -> None:
    """`make test` installs a compiler (system-deps) and builds with mypyc, so the suite
    tests what ships.  A silent fall-back to Python would make this run test something
    else: fail instead, naming the remedy."""
    files = _imported_from(env_pure=False)
    python = sorted(m for m, path in files.items() if path.endswith(".py"))
    assert not python, (
        f"{native.describe()}; run as Python: {python}.  Install gcc and python3-dev and "
        f"reinstall (make), or set {native.PURE_ENV}=1 to test the Python build")
    assert "compiled with mypyc" in native.describe()


def _calls_in_slice_bounds(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Slice):
            for bound in (node.slice.lower, node.slice.upper, node.slice.step):
                calls = [c for c in ast.walk(bound) if isinstance(c, ast.Call)] if bound else []
                if any(ast.unparse(c.func) != "len" for c in calls):
                    found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_no_call_inside_a_slice_bound_in_compiled_modules() -> None:
    """mypyc evaluates a slice bound twice when it slices a memoryview (or an untyped
    object): `view[os.write(fd, view):]` wrote every access-log line twice, and
    `view[:sock.recv_into(view)]` lost a read.  So the compiled modules compute a bound
    into a local first (len() aside: it has no effect to repeat)."""
    offenders = {
        module: found for module in native.COMPILED
        if (found := _calls_in_slice_bounds(native.source_path(module, REPO).read_text()))
    }
    assert not offenders, offenders
    assert _calls_in_slice_bounds("v = view[os.write(fd, view):]")  # the check can fail


def _reused_except_names(source: str) -> list[str]:
    found = []
    for func in ast.walk(ast.parse(source)):
        if isinstance(func, ast.FunctionDef):
            types: dict[str, set[str]] = {}
            for node in ast.walk(func):
                if isinstance(node, ast.ExceptHandler) and node.name and node.type:
                    types.setdefault(node.name, set()).add(ast.unparse(node.type))
            found += [f"{func.name}: {name} {sorted(t)}" for name, t in types.items()
                      if len(t) > 1]
    return found


def test_no_except_name_reused_for_another_type_in_compiled_modules() -> None:
    """Compiled, one name is one typed variable per function: `except A as exc` then
    `except B as exc` made every B fail a run-time type check (a TypeError instead of
    the 502 that B means)."""
    offenders = {
        module: found for module in native.COMPILED
        if (found := _reused_except_names(native.source_path(module, REPO).read_text()))
    }
    assert not offenders, offenders
    assert _reused_except_names(
        "def f():\n try: pass\n except A as e: pass\n except B as e: pass\n")


def _module_names_not_final(source: str) -> list[str]:
    """Module-level names assigned without a Final annotation, apart from type aliases
    (CapWords names: `Chunk = Any`) and `__all__`."""
    found = []
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign):
            names = [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            annotation = ast.unparse(node.annotation)
            names = [] if annotation.startswith(("Final", "ClassVar")) else [node.target.id]
        else:
            continue
        found += [f"line {node.lineno}: {name}" for name in names
                  if name != "__all__" and not (name[0].isupper() and not name.isupper())]
    return found


def test_module_constants_of_compiled_modules_are_final() -> None:
    """Compiled, a module global is looked up in the module's dict on every use; a Final
    one is a C static (or an inlined literal).  Marking them Final took a keep-alive
    request from 112,736 to 102,370 instructions (bench.instructions)."""
    offenders = {
        module: found for module in native.COMPILED
        if (found := _module_names_not_final(native.source_path(module, REPO).read_text()))
    }
    assert not offenders, offenders
    assert _module_names_not_final("LIMIT = 3\n_cache: dict[str, int] = {}\n") == [
        "line 1: LIMIT", "line 2: _cache"]  # the check can fail
    assert not _module_names_not_final("Chunk = Any\nLIMIT: Final = 3\n")
