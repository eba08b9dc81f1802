"""The compiled hot path (gatewayd/native.py): what is compiled, the stale-build guard in a
checkout, and GATEWAYD_PURE_PYTHON=1, which runs the Python sources instead."""

from __future__ import annotations

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
