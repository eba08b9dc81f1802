"""One access-log record per request, as a JSON object or in Apache "combined" format.

Records are built by the proxy as plain dicts (field names as in the docs) and written as
whole lines with one `write` each, so lines from the workers sharing a file or pipe never
interleave (O_APPEND files and pipes keep writes up to PIPE_BUF atomic).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

FIELDS = (
    "time", "request_id", "client_ip", "client_port", "listener", "rule", "path_rule",
    "backend_pool", "backend_settings", "backend", "method", "uri", "host", "http_version",
    "status", "backend_status", "bytes_received", "bytes_sent", "duration",
    "backend_connect_time", "backend_first_byte_time", "tls_protocol", "tls_cipher", "sni",
    "user_agent", "error_info",
)


class AccessLog:
    """Writes records to stdout ("-") or a file opened for append; `reopen` after USR1."""

    def __init__(self, target: str, fmt: str) -> None:
        self._target = target
        self._format = fmt
        self._fd = -1
        self.reopen()

    def reopen(self) -> None:
        old = self._fd
        if self._target == "-":
            self._fd = os.dup(1)
        else:
            self._fd = os.open(self._target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        if old >= 0:
            os.close(old)

    def write(self, record: dict[str, Any], started: float) -> None:
        if self._format == "json":
            line = self._json(record)
        else:
            line = self._combined(record, started)
        try:
            os.write(self._fd, line.encode("utf-8", "replace"))
        except OSError:
            pass  # a full disk or closed pipe must not break request handling

    @staticmethod
    def _json(record: dict[str, Any]) -> str:
        return json.dumps(record, separators=(",", ":"), default=str) + "\n"

    @staticmethod
    def _combined(r: dict[str, Any], started: float) -> str:
        stamp = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(started))
        return (
            f'{r.get("client_ip", "-")} - - [{stamp}] "{r.get("method", "-")} {r.get("uri", "-")} '
            f'HTTP/{r.get("http_version", "1.1")}" {r.get("status", 0)} {r.get("bytes_sent", 0)} '
            f'"-" "{r.get("user_agent") or "-"}" {r.get("request_id", "-")} '
            f'{r.get("error_info") or "-"}\n'
        )

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
