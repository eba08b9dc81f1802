"""gatewayd: a self-hosted Layer-7 application gateway with end-to-end TLS."""

from pathlib import Path as _Path

from . import native as _native

__version__ = "0.1.0"

_native.prefer_source()  # GATEWAYD_PURE_PYTHON=1: the per-request modules as Python
_native.check_fresh(_Path(__file__).resolve().parent)  # no stale compiled module in a checkout
