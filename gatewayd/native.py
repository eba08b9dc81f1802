"""Which modules are compiled with mypyc, and the two guards that go with compiling them.

The per-request path is compiled to C with mypyc when the build can (setup.py reads
COMPILED from here): the same type-checked source, run as native code, costs a keep-alive
request about a third fewer instructions (bench/README.md, "Compiled hot path").  A build
without a C compiler or Python's headers, or with GATEWAYD_PURE_PYTHON=1, installs the
same modules as plain Python; both run the same tests.

Two things can go wrong with compiled modules, and this module prevents both:

* **A stale build in a source checkout** (an editable install, `make run`): the compiled
  module sits next to its source and wins the import, so an edited or pulled `.py` would
  silently not run.  `check_fresh` refuses to start then, naming the file and the command
  that rebuilds (`make` rebuilds by itself: its install stamp depends on these sources).
* **Needing the Python code at run time** (to rule the compiled code out when chasing a
  bug): GATEWAYD_PURE_PYTHON=1 in the environment makes `prefer_source` load these modules
  from their `.py` files even where a compiled one is installed.

Standard library only: setup.py runs this file before anything is installed.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

#: The per-request modules, compiled together (one shared library).  Each must stay
#: mypy-clean, since mypyc enforces annotations at run time.
COMPILED = (
    "gatewayd.forwarding",
    "gatewayd.health",
    "gatewayd.workers.http1.common",
    "gatewayd.workers.http1.request",
    "gatewayd.workers.http1.response",
    "gatewayd.workers.accesslog",
    "gatewayd.workers.balancer",
    "gatewayd.workers.exchange",
    "gatewayd.workers.logline",
    "gatewayd.workers.proxy",
    "gatewayd.workers.record",
    "gatewayd.workers.routeplan",
    "gatewayd.workers.runtime",
    "gatewayd.workers.stats",
    "gatewayd.workers.tlsio",
    "gatewayd.workers.upstream",
)
#: The shared library mypyc builds for them (inside the package, not at the top level).
GROUP = "gatewayd.hotpath"
PURE_ENV = "GATEWAYD_PURE_PYTHON"
#: Where each package's source lives in a checkout (setup.py's package_dir).
PACKAGE_DIR = {
    "gatewayd": "gatewayd",
    "gatewayd.workers": "workers",
    "gatewayd.workers.http1": "workers/http1",
}


def source_path(module: str, root: Path) -> Path:
    """The `.py` file of a compiled module in a checkout at `root`."""
    package, _, name = module.rpartition(".")
    return root / PACKAGE_DIR[package] / f"{name}.py"


def _compiled_path(source: Path) -> Path | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = source.with_name(source.stem + suffix)
        if candidate.exists():
            return candidate
    return None


def stale(root: Path) -> list[str]:
    """Sources in a checkout changed after their compiled module was built."""
    out = []
    for module in COMPILED:
        source = source_path(module, root)
        compiled = _compiled_path(source)
        if compiled is not None and source.stat().st_mtime > compiled.stat().st_mtime:
            out.append(str(source.relative_to(root)))
    return out


def check_fresh(package_dir: Path) -> None:
    """In a source checkout, refuse compiled modules older than their source."""
    root = package_dir.parent
    if os.environ.get(PURE_ENV) or not (root / "setup.py").exists():
        return  # an installed wheel (no sources to be newer), or the sources are used
    changed = stale(root)
    if changed:
        raise ImportError(
            f"gatewayd: {', '.join(changed)} changed after it was compiled; rebuild with "
            f"`make` (or `.venv/bin/pip install -e .`), or run the sources with {PURE_ENV}=1")


class _SourceFinder:
    """Loads the compiled modules from their `.py` files (GATEWAYD_PURE_PYTHON=1)."""

    @staticmethod
    def find_spec(name: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if name not in COMPILED or not path:
            return None
        for folder in path:
            source = Path(folder) / f"{name.rpartition('.')[2]}.py"
            if source.exists():
                return importlib.util.spec_from_file_location(name, source)
        return None


def prefer_source() -> None:
    """With GATEWAYD_PURE_PYTHON=1, import the compiled modules' Python sources."""
    if os.environ.get(PURE_ENV) and _SourceFinder not in sys.meta_path:
        sys.meta_path.insert(0, _SourceFinder)


def installed_compiled() -> list[str]:
    """The compiled modules that an import would load as native code (without importing
    them)."""
    out = []
    for name in COMPILED:
        spec = importlib.util.find_spec(name)
        if spec is not None and not (spec.origin or "").endswith(".py"):
            out.append(name)
    return out


def describe(compiled: list[str] | None = None) -> str:
    """One line for the install and the logs: compiled or not, and why it matters
    (`compiled`: installed_compiled(), if the caller has it already)."""
    if compiled is None:
        compiled = installed_compiled()
    if len(compiled) == len(COMPILED):
        return f"per-request modules compiled with mypyc ({len(compiled)} modules)"
    if os.environ.get(PURE_ENV):
        return f"per-request modules run as Python ({PURE_ENV} is set)"
    return (f"per-request modules run as Python ({len(compiled)} of {len(COMPILED)} "
            "compiled): about a third more CPU per request; install gcc and python3-dev, "
            "then reinstall, to compile them")


if __name__ == "__main__":  # the Makefile's list of the sources its install stamp depends on
    here = Path(__file__).resolve().parent.parent
    print(" ".join(str(source_path(m, here).relative_to(here)) for m in COMPILED))
