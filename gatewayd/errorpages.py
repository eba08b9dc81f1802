"""Custom error pages for responses the gateway makes itself (Azure: custom error pages).

Pages are read at config time (`gatewayd.config`), so a worker never touches the disk
on an error path and `--check` proves every page exists.  A listener's page wins over a
global `[error_pages]` page; statuses without a page keep the plain-text default.
Backend responses are never replaced, whatever their status: only statuses the gateway
itself decided (CONTRACT §7) get a custom page.
"""

from __future__ import annotations

from gatewayd.model import GatewayConfig

__all__ = ["CONTENT_TYPE", "ERROR_PAGE_STATUSES", "MAX_PAGE_BYTES", "ErrorPages"]

# Azure allows 400, 403, 404, 405, 408, 500, 502, 503, 504; 421 is ours (SNI/Host).
ERROR_PAGE_STATUSES = (400, 403, 404, 405, 408, 421, 500, 502, 503, 504)
MAX_PAGE_BYTES = 1 << 20  # Azure's limit is 1 MB as well
CONTENT_TYPE = (b"Content-Type", b"text/html; charset=utf-8")


class ErrorPages:
    """status → body per listener (listener pages over global ones), built pre-fork."""

    __slots__ = ("_by_listener", "_global")

    def __init__(self, config: GatewayConfig) -> None:
        self._global = dict(config.error_pages)
        self._by_listener = {
            listener.name: {**self._global, **dict(listener.error_pages)}
            for listener in config.listeners
        }

    def page(self, listener: str | None, status: int) -> bytes | None:
        """The page for a gateway-made `status` on `listener` (None: not yet known, e.g.
        a request that could not be parsed or routed), or None for the default."""
        pages = self._by_listener.get(listener, self._global) if listener else self._global
        return pages.get(status)
