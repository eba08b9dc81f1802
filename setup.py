"""Packaging for gatewayd: the control plane (`gatewayd`) and the data plane
(`gatewayd.workers`, kept in the top-level folder `workers/`).

The per-request modules (gatewayd/native.py lists them) are compiled with mypyc when the
build has mypy (pyproject.toml's build requirements), a C compiler and Python's headers:
about a third fewer instructions per keep-alive request (bench/README.md).  Without them,
or with GATEWAYD_PURE_PYTHON=1, the package installs as plain Python and says so."""

import importlib.machinery
import os
import runpy
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
NATIVE = runpy.run_path(str(ROOT / "gatewayd" / "native.py"))
PACKAGE_DIR = NATIVE["PACKAGE_DIR"]
STAGE = Path("build") / "mypyc-src"  # relative: mypyc names modules after these paths


def _say(message: str) -> None:
    print(f"gatewayd setup: {message}", file=sys.stderr)


def _stage() -> list[str]:
    """The sources laid out as the installed package (mypyc derives each module's name
    from its path, and `workers/` installs as `gatewayd/workers/`)."""
    shutil.rmtree(STAGE, ignore_errors=True)
    for package, folder in PACKAGE_DIR.items():
        target = STAGE.joinpath(*package.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for source in (ROOT / folder).glob("*.py"):
            shutil.copy2(source, target / source.name)
    return [str(STAGE.joinpath(*m.split(".")).with_suffix(".py")) for m in NATIVE["COMPILED"]]


def _remove_old_builds() -> None:
    """An in-place (editable) build leaves compiled modules beside the sources: remove
    them all first, so a module taken off the list, or a build that now fails, leaves
    no compiled file behind to shadow its source."""
    for folder in PACKAGE_DIR.values():
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            for path in (ROOT / folder).glob(f"*{suffix}"):
                path.unlink()


def _extensions() -> list:
    _remove_old_builds()
    if os.environ.get(NATIVE["PURE_ENV"]):
        _say(f"{NATIVE['PURE_ENV']} is set: installing the per-request modules as Python")
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        _say("mypy is not installed here: installing the per-request modules as Python")
        return []
    try:
        # pip builds in an isolated environment without gevent, pyOpenSSL...: mypy sees
        # those imports as Any there, so an ignore the checked-in code needs may be unused
        return mypycify([*_stage(), "--no-warn-unused-ignores"], opt_level="3",
                        group_name=NATIVE["GROUP"])
    except (Exception, SystemExit) as exc:  # a mypy error stops mypycify with SystemExit
        _say(f"mypyc could not compile ({exc}): installing the per-request modules as Python")
        return []


class OptionalBuildExt(build_ext):
    """Build the compiled modules if this machine can; otherwise install the Python ones
    (a missing compiler or Python.h must not make gatewayd uninstallable)."""

    def run(self) -> None:
        try:
            super().run()  # the first failing extension stops the whole build
        except Exception as exc:  # CompileError, LinkError, missing compiler...
            self._give_up(exc)

    def _give_up(self, exc: Exception) -> None:
        for path in self.get_outputs():  # never a half-compiled set
            Path(path).unlink(missing_ok=True)
        self.extensions = []
        _say(f"could not compile ({exc}); installing the per-request modules as Python "
             "(install gcc and python3-dev to compile them)")


setup(
    name="gatewayd",
    version="0.1.0",
    description="Self-hosted Layer-7 application gateway with end-to-end TLS",
    python_requires=">=3.11",
    packages=list(PACKAGE_DIR),
    package_dir=PACKAGE_DIR,
    ext_modules=_extensions(),
    cmdclass={"build_ext": OptionalBuildExt},
    install_requires=[
        "gevent>=24.2,<27",
        "pyOpenSSL>=25.0,<27",
        "service-identity>=24.1,<27",
        "httptools>=0.6.4,<0.10",
        "cryptography>=44,<51",
        "prometheus-client>=0.20,<0.30",
        "ConfigArgParse>=1.7,<2",
    ],
    extras_require={
        "test": [
            "pytest>=8,<10",
            "trustme>=1.1,<2",
            "ruff>=0.6",
            "mypy>=1.10",
            "hypothesis>=6.100,<7",
            "websockets>=13,<18",
        ],
    },
    entry_points={"console_scripts": ["gatewayd = gatewayd.cli:main"]},
)
