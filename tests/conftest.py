"""Generic fixtures for live tests: repo root, a throw-away PKI, backend processes.

Nothing gatewayd-specific lives here (that goes in its own fixture module).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest

_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:  # make `tests.support` importable however pytest runs
    sys.path.insert(0, str(_REPO_ROOT))

from tests.support.pki import Leaf, TestPKI  # noqa: E402
from tests.support.procs import Backend, BackendFactory, StrPath  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    """Register the markers used by the live tests."""
    config.addinivalue_line("markers", "slow: long-running live test (deselect: -m 'not slow')")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Any:
    """Remember each phase's report on the item so fixtures can tell a test failed."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (the cwd for ``python -m tests.support...``)."""
    return _REPO_ROOT


@pytest.fixture
def pki(tmp_path: Path) -> TestPKI:
    """A fresh :class:`TestPKI` in ``tmp_path / "pki"``; trust ``pki.ca_pem_path``."""
    return TestPKI(tmp_path / "pki")


@pytest.fixture
def backend_factory(
    pki: TestPKI, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[BackendFactory]:
    """Start backend processes; all are stopped (and killed if need be) at teardown.

    ``backend_factory(name="backend", *, tls=True, leaf=None, names=None, mode="http",
    record=True, host="127.0.0.1", client_ca=None) -> Backend`` (already READY).  With
    ``tls`` and no ``leaf``, a leaf for ``names`` (default ``["localhost", host, name]``)
    is issued by ``pki.ca``.  If the test failed, the backends' logs are printed.
    """
    started: list[Backend] = []

    def start(
        name: str = "backend",
        *,
        tls: bool = True,
        leaf: Leaf | None = None,
        names: list[str] | None = None,
        mode: Literal["http", "raw-record"] = "http",
        record: bool = True,
        host: str = "127.0.0.1",
        client_ca: StrPath | None = None,
    ) -> Backend:
        if any(b.name == name for b in started):
            raise ValueError(f"backend name {name!r} already used in this test")
        if tls and leaf is None:
            leaf = pki.issue(names or ["localhost", host, name], stem=f"backend-{name}")
        backend = Backend(
            name,
            workdir=tmp_path / "backends",
            cert=leaf.cert_path if leaf else None,
            key=leaf.key_path if leaf else None,
            host=host,
            mode=mode,
            record=record,
            client_ca=client_ca,
        )
        backend.leaf = leaf
        started.append(backend)
        return backend.start()

    try:
        yield start
    finally:
        failed = any(
            getattr(getattr(request.node, f"rep_{when}", None), "failed", False)
            for when in ("setup", "call")
        )
        for backend in reversed(started):
            backend.stop()
            if failed:
                print(backend.describe())
