"""The access log as operators parse it: every documented field, both formats."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from gatewayd.workers.logline import FIELDS

from tests.support.gateway import Gateway, simple_spec
from tests.support.procs import https_get, wait_for

_INTS = {"client_port", "status", "backend_status", "bytes_received", "bytes_sent"}


def test_json_record_has_every_field_with_the_right_values(tmp_path: Path, pki,
                                                           backend_factory) -> None:
    app = backend_factory("app")
    spec = simple_spec(tmp_path, cert=pki.issue(["127.0.0.1"]), backends={"app": app})
    with Gateway(tmp_path, spec) as gw:
        status, _, _ = https_get("127.0.0.1", gw.port, "/a/./b/../c?q=1",
                                       sni="127.0.0.1", cafile=pki.ca_pem_path,
                                       headers={"User-Agent": "probe/1.0"})
        assert status == 200
        record = gw.wait_log(lambda r: r["uri"] == "/a/c?q=1")
        assert list(record) == list(FIELDS)
        assert record["status"] == record["backend_status"] == 200
        assert record["client_ip"] == "127.0.0.1" and record["client_port"] > 0
        assert (record["listener"], record["rule"], record["path_rule"]) == ("front", "main", "")
        assert (record["backend_pool"], record["backend_settings"]) == ("app", "app-tls")
        assert record["backend"] == f"127.0.0.1:{app.port}"
        assert record["method"] == "GET" and record["http_version"] == "1.1"
        assert record["host"] == f"127.0.0.1:{gw.port}"
        assert record["sni"] == ""  # clients never send an IP literal as SNI
        assert record["tls_protocol"] == "TLSv1.3" and record["tls_cipher"].startswith("TLS_")
        assert record["user_agent"] == "probe/1.0"
        assert re.fullmatch(r"[0-9a-f]{32}", record["request_id"])
        assert record["bytes_sent"] > 0 and record["bytes_received"] == 0
        assert 0 < record["backend_first_byte_time"] <= record["duration"]
        assert record["backend_connect_time"] > 0
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["time"])
        assert record["error_info"] == ""
        # The request id in the log is the one the backend received.
        seen = [r for r in app.records() if r["target"] == "/a/c?q=1"]
        ids = [v for k, v in seen[0]["headers"] if k.lower() == "x-request-id"]
        assert ids == [record["request_id"]]


def test_combined_format(tmp_path: Path, pki, backend_factory) -> None:
    app = backend_factory("app")
    spec = simple_spec(tmp_path, cert=pki.issue(["127.0.0.1"]), backends={"app": app},
                       server={"access_log_format": "combined"})
    with Gateway(tmp_path, spec) as gw:
        assert https_get("127.0.0.1", gw.port, "/x", sni=None, cafile=None,
                         headers={"User-Agent": "probe/2"})[0] == 200
        line = wait_for(lambda: gw.access_log.exists() and gw.access_log.read_text().strip(),
                        10, "a combined log line")
        assert re.fullmatch(
            r'127\.0\.0\.1 - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d \+0000\] "GET /x HTTP/1\.1" '
            r'200 \d+ "-" "probe/2" [0-9a-f]{32} -', line), line


def test_fast_json_lines_equal_json_dumps() -> None:
    """The access log's template encoder must write what json.dumps writes, for every
    field with values of its type: str (ASCII, Latin-1, BMP, quotes, control characters)
    and int byte for byte; the times (tiny to huge, None where a timing may be missing)
    with six decimals, parsing back to the value rounded to the microsecond.  The time
    stamp and the request id are the gateway's own ASCII, written as they are (not
    quoted): they get values of their real form.  Half the lines are written with a
    connection's memo of its last line, records following one another as a connection's
    do (most values the last record's), so that every group is hit and missed."""
    import json
    import random

    from gatewayd.workers.logline import LineMemo, json_line

    rng = random.Random(7)
    ints = _INTS
    floats = {"duration", "backend_connect_time", "backend_first_byte_time"}

    def text() -> str:
        return "".join(chr(rng.choice([rng.randint(0, 0x7F), rng.randint(0x80, 0x3000)]))
                       for _ in range(rng.randint(0, 8)))

    # Half the records draw these fields from a few values, as a connection's requests
    # do, so that the lines rendered from remembered pieces are checked too.
    repeating = set(FIELDS[2:10] + FIELDS[21:24] + FIELDS[27:31]) | {
        "method", "host", "http_version", "error_info"}
    pools: dict[str, list[object]] = {}

    def value(name: str) -> object:
        if name in repeating and rng.random() < 0.5:
            if name not in pools:
                pools[name] = [fresh_value(name) for _ in range(3)]
            return rng.choice(pools[name])
        return fresh_value(name)

    def fresh_value(name: str) -> object:
        if name == "time":  # any day of 2026, to the microsecond
            return 1767225600.0 + rng.randint(0, 365 * 86400 * 10 ** 6) / 10 ** 6
        if name == "request_id":
            return rng.randbytes(16).hex()
        if name in ints:  # half of them below 1000, where texts come from tables
            return rng.randint(0, 999 if rng.random() < 0.5 else 10 ** 12)
        if name in floats:
            if name != "duration" and rng.random() < 0.3:
                return None
            return rng.random() * 10 ** rng.randint(-8, 8)
        return text()

    def expected_text(name: str, v: object) -> str:
        if name == "time":
            assert isinstance(v, float)
            return json.dumps(_iso_millis(v))
        if name in floats:
            return "null" if v is None else f"{v:.6f}"
        return json.dumps(v)

    memo = LineMemo()
    last = tuple(value(name) for name in FIELDS)
    hits = 0
    for _ in range(6000):
        values = tuple(value(name) for name in FIELDS)
        if rng.random() < 0.5:
            values = tuple(old if rng.random() < 0.95 else new
                           for old, new in zip(last, values, strict=True))
            hits += values[2:11] == memo.peer
            line = json_line(values, memo)
        else:
            line = json_line(values)
        last = values
        expected = "{" + ",".join(f"{json.dumps(name)}:{expected_text(name, v)}"
                                  for name, v in zip(FIELDS, values, strict=True)) + "}\n"
        assert line == expected
        assert line.isascii()  # AccessLog.write encodes it without an error handler
        parsed = json.loads(line)
        assert list(parsed) == list(FIELDS)
        for name, v in zip(FIELDS, values, strict=True):
            if name == "time":
                assert parsed[name] == json.loads(expected_text(name, v))
            elif name in floats and v is not None:
                assert isinstance(v, float)
                assert parsed[name] == round(v, 6), (name, v, parsed[name])
            else:
                assert parsed[name] == v
    assert hits > 300  # the memo's pieces were used, not only made

    def duration_text(duration: float) -> str:
        values = tuple(duration if name == "duration" else None if name in floats else
                       0 if name in ints else 0.0 if name == "time" else "" for name in FIELDS)
        found = re.search(r'"duration":([^,]*),', json_line(values))
        assert found
        return found.group(1)

    assert duration_text(0.0) == "0.000000"
    assert duration_text(0.0000004) == "0.000000"
    assert duration_text(1.0000006) == "1.000001"
    assert duration_text(12.5) == "12.500000"
    assert duration_text(-0.25) == "-0.250000"  # the clock stepped back
    assert duration_text(3e9) == "3000000000.000000"
    # Sub-second times take a shortcut (integer microseconds); it must write exactly what
    # "%.6f" writes, including at the halves where the seventh decimal decides.
    halves = [(k + 0.5) / 1e6 for k in range(0, 1000000, 997)]
    near = [v + d for v in halves[:200] for d in (-1e-15, 1e-15, -1e-12, 1e-12)]
    samples = [rng.random() for _ in range(20000)] + halves + near + [
        0.0000005, 0.0000015, 0.9999994, 0.9999995, 0.9999996, 1.0 - 2 ** -53, 5e-324]
    for v in samples:
        assert duration_text(v) == f"{v:.6f}", v


def _iso_millis(started: float) -> str:
    """What the log's "time" must read for a record started at `started`: a full
    strftime of its whole second, and its milliseconds (truncated)."""
    import time

    millis = int(started * 1000)
    second = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(millis // 1000))
    return f"{second}.{millis % 1000:03d}Z"


def _time_field(started: float) -> str:
    """The "time" a JSON line writes for a record that started at `started`."""
    import json

    from gatewayd.workers.logline import FIELDS, json_line

    values = tuple(started if name == "time" else None if name.endswith("_time") else
                   0.0 if name == "duration" else 0 if name in _INTS else ""
                   for name in FIELDS)
    return str(json.loads(json_line(values))["time"])


def test_log_timestamp_is_iso_8601_with_milliseconds() -> None:
    """The record's time stamp (strftime once a second, the milliseconds from a table) is
    what a full strftime writes, across second boundaries and back in time."""

    start = 1764460800.0  # 2025-11-30T00:00:00Z
    for started in [start + k * 0.0137 for k in range(300)] + [
            start - 0.0005, start + 59.9995, start + 86399.999, start - 3600.25, start + 0.0]:
        assert _time_field(started) == _iso_millis(started), started
    assert _time_field(start + 1.5) == "2025-11-30T00:00:01.500Z"
    assert _time_field(start - 0.001) == "2025-11-29T23:59:59.999Z"


def test_queued_lines_are_written_whole_and_pipe_writes_stay_atomic(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Queued lines are written in batches: every byte arrives, in order, and no write
    to a pipe exceeds PIPE_BUF or splits a line (so that the lines of workers sharing a
    pipe never interleave)."""
    import fcntl
    import os
    import random
    import select

    from gatewayd.workers import accesslog

    rng = random.Random(5)
    lines = [(("x" * rng.randint(0, 900)) + rng.choice(["", "é", "€", "\U0001f600"])
              * rng.randint(0, 300) + "\n").encode() for _ in range(200)]
    expected = b"".join(lines)
    writes: list[bytes] = []
    real_write_all = accesslog._write_all

    def spy(fd: int, data: bytes) -> None:  # the real write, with its size seen
        writes.append(data)
        real_write_all(fd, data)

    monkeypatch.setattr(accesslog, "_write_all", spy)
    read_end, write_end = os.pipe()
    try:  # room for every line, so that no reader is needed while writing
        fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 1 << 20)
        accesslog.AccessLog._write_lines(write_end, lines, True)
        os.close(write_end)
        received = b"".join(iter(lambda: os.read(read_end, 1 << 16), b""))
    finally:
        os.close(read_end)
    assert received == expected and len(expected) > 20 * select.PIPE_BUF
    assert all(len(w) <= select.PIPE_BUF and w.endswith(b"\n") for w in writes)
