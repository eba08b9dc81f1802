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
import time
from json.encoder import encode_basestring_ascii as _quote  # C-accelerated
from typing import Any

import gevent
from gevent.hub import get_hub

FIELDS = (
    "time", "request_id", "client_ip", "client_port", "listener", "rule", "path_rule",
    "backend_pool", "backend_settings", "backend", "method", "uri", "host", "http_version",
    "status", "backend_status", "bytes_received", "bytes_sent", "duration",
    "backend_connect_time", "backend_first_byte_time", "tls_protocol", "tls_cipher", "sni",
    "user_agent", "error_info", "redirect_location", "client_cert_verify",
    "client_cert_subject", "client_cert_issuer", "client_cert_fingerprint",
)
# Field positions the combined format reads.
_REQUEST_ID, _CLIENT_IP, _METHOD, _URI, _HTTP_VERSION, _STATUS, _BYTES_SENT, _USER_AGENT, \
    _ERROR_INFO = (FIELDS.index(name) for name in (
        "request_id", "client_ip", "method", "uri", "http_version", "status", "bytes_sent",
        "user_agent", "error_info"))
FLUSH_INTERVAL = 0.1
MAX_PENDING = 1 << 20  # bytes queued before new lines are dropped (and counted)


class AccessLog:
    """Writes records to stdout ("-"), a file opened for append, or nowhere ("off", like
    nginx's `access_log off`); `reopen` after USR1."""

    def __init__(self, target: str, fmt: str) -> None:
        self._target = target
        self._format = fmt
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

    def write(self, record: tuple[Any, ...], started: float) -> None:
        """Queue one record: the values of FIELDS, in that order."""
        if self._format == "json":
            line = json_line(record)
        else:
            line = self._combined(record, started)
        data = line.encode("utf-8", "replace")
        if self._pending_bytes > MAX_PENDING:
            self.dropped += 1
            return
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

    @staticmethod
    def _combined(r: tuple[Any, ...], started: float) -> str:
        stamp = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(started))
        return (
            f'{r[_CLIENT_IP]} - - [{stamp}] "{r[_METHOD]} {r[_URI]} '
            f'HTTP/{r[_HTTP_VERSION]}" {r[_STATUS]} {r[_BYTES_SENT]} '
            f'"-" "{r[_USER_AGENT] or "-"}" {r[_REQUEST_ID]} {r[_ERROR_INFO] or "-"}\n'
        )

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# One JSON object per line, keys in FIELDS order.  Every value has a fixed type (str; int;
# float; float or None), so the line is one f-string with the keys already in it: no dict,
# no loop, no type dispatch, and the interpreter sizes the result once (a %-format over
# the same template costs half as much again).  Strings and ints come out byte for byte as
# json.dumps(..., separators=(",", ":")) writes them; the times in seconds are written with
# six decimals, like nginx's $request_time with three (tests check both).


def json_line(values: tuple[Any, ...], q: Any = _quote) -> str:
    """The JSON access-log line of one record (`q` is bound once: it runs per request)."""
    (stamp, request_id, client_ip, client_port, listener, rule, path_rule, backend_pool,
     backend_settings, backend, method, uri, host, http_version, status, backend_status,
     bytes_received, bytes_sent, duration, connect, first_byte, tls_protocol,
     tls_cipher, sni, user_agent, error_info, redirect_location, cert_verify, cert_subject,
     cert_issuer, cert_fingerprint) = values
    return (
        f'{{"time":{q(stamp)},"request_id":{q(request_id)},"client_ip":{q(client_ip)},'
        f'"client_port":{client_port},"listener":{q(listener)},"rule":{q(rule)},'
        f'"path_rule":{q(path_rule)},"backend_pool":{q(backend_pool)},'
        f'"backend_settings":{q(backend_settings)},"backend":{q(backend)},'
        f'"method":{q(method)},"uri":{q(uri)},"host":{q(host)},'
        f'"http_version":{q(http_version)},"status":{status},'
        f'"backend_status":{backend_status},"bytes_received":{bytes_received},'
        f'"bytes_sent":{bytes_sent},"duration":{duration:.6f},'
        f'"backend_connect_time":{"null" if connect is None else f"{connect:.6f}"},'
        f'"backend_first_byte_time":{"null" if first_byte is None else f"{first_byte:.6f}"},'
        f'"tls_protocol":{q(tls_protocol)},"tls_cipher":{q(tls_cipher)},"sni":{q(sni)},'
        f'"user_agent":{q(user_agent)},"error_info":{q(error_info)},'
        f'"redirect_location":{q(redirect_location)},"client_cert_verify":{q(cert_verify)},'
        f'"client_cert_subject":{q(cert_subject)},"client_cert_issuer":{q(cert_issuer)},'
        f'"client_cert_fingerprint":{q(cert_fingerprint)}}}\n')


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)  # not inside the slice: see tests/test_native.py
        view = view[written:]
