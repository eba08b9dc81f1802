"""One access-log record per request, as a JSON object or in Apache "combined" format.

Lines are queued in memory and written in batches by one flusher greenlet every 100 ms,
the `write` itself running in gevent's thread pool: a slow disk or a stdout pipe nobody
reads stalls the flusher, never the event loop.  A batch is cut at line boundaries into
writes of at most PIPE_BUF bytes when the target is a pipe, so lines from the workers
sharing it never interleave; files are opened with O_APPEND, where each write lands whole.
A worker killed with SIGKILL loses at most the last 100 ms of lines; a draining worker
flushes before it exits.
"""

from __future__ import annotations

import os
import select
import stat
from typing import Any, Final

import gevent
from gevent.hub import get_hub

from .logline import LineMemo, combined_line, json_line

FLUSH_INTERVAL: Final = 0.1
MAX_PENDING: Final = 1 << 20  # bytes queued before new lines are dropped (and counted)


class AccessLog:
    """Writes records to stdout ("-"), a file opened for append, or nowhere ("off", like
    nginx's `access_log off`); `reopen` after USR1."""

    def __init__(self, target: str, fmt: str) -> None:
        self._target = target
        self._json = fmt == "json"
        self._fd = -1
        self._is_pipe = False
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self.dropped = 0
        self._flusher: gevent.Greenlet | None = None
        self.reopen()

    def reopen(self) -> None:
        """Open the target again (after logrotate renamed it); queued lines go to the new
        file."""
        old = self._fd
        if self._target == "off":
            self._fd = -1
        elif self._target == "-":
            self._fd = os.dup(1)
        else:
            self._fd = os.open(self._target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._is_pipe = self._fd >= 0 and stat.S_ISFIFO(os.fstat(self._fd).st_mode)
        if old >= 0:
            os.close(old)

    def start(self) -> None:
        if self._flusher is None:
            self._flusher = gevent.spawn(self._flush_forever)

    @property
    def enabled(self) -> bool:
        return self._target != "off"

    def write(self, record: tuple[Any, ...], memo: LineMemo) -> None:
        """Queue one record: the values of logline.FIELDS, in that order; `memo` is its
        connection's (see logline.LineMemo)."""
        if self._pending_bytes > MAX_PENDING:
            self.dropped += 1
            return
        if self._json:  # ASCII by construction (every string is quoted with \u escapes):
            data = json_line(record, memo).encode()  # a plain copy, no error handler to set up
        else:
            data = combined_line(record).encode("utf-8", "replace")
        self._pending.append(data)
        self._pending_bytes += len(data)

    def _flush_forever(self) -> None:
        while True:
            gevent.sleep(FLUSH_INTERVAL)
            self.flush()

    def flush(self) -> None:
        """Write what is queued (from a greenlet; the write runs in the thread pool)."""
        if not self._pending:
            return
        lines, self._pending, self._pending_bytes = self._pending, [], 0
        try:
            get_hub().threadpool.apply(self._write_lines, (self._fd, lines, self._is_pipe))
        except OSError:
            pass  # a full disk or a closed pipe must not break request handling

    @staticmethod
    def _write_lines(fd: int, lines: list[bytes], is_pipe: bool) -> None:
        limit = select.PIPE_BUF if is_pipe else 1 << 20
        batch: list[bytes] = []
        size = 0
        for line in lines:
            if batch and size + len(line) > limit:
                _write_all(fd, b"".join(batch))
                batch, size = [], 0
            batch.append(line)
            size += len(line)
        if batch:
            _write_all(fd, b"".join(batch))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)  # not inside the slice: see tests/test_native.py
        view = view[written:]
