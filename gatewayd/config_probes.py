"""`[[probe]]` tables: custom health probes (Azure Application Gateway semantics).

Status ranges are written as Azure does ("200-399", "200", "401"); they are parsed once
here into (low, high) pairs so the prober only compares integers.
"""

from __future__ import annotations

from typing import Any

from gatewayd.config_reader import Loader, Where
from gatewayd.model import Probe

MAX_PROBE_INTERVAL = 86400.0


def parse_status_range(text: str) -> tuple[int, int]:
    """"200-399" → (200, 399); "204" → (204, 204).  ValueError with a clear message."""
    low_text, dash, high_text = text.strip().partition("-")
    try:
        low = int(low_text)
        high = int(high_text) if dash else low
    except ValueError:
        raise ValueError(
            f"expected a status code or a range like '200-399', got {text!r}") from None
    if not (100 <= low <= high <= 599):
        raise ValueError(f"status range must lie within 100-599 with low <= high, got {text!r}")
    return low, high


def load_probes(loader: Loader, data: dict[str, Any]) -> dict[str, Probe]:
    items = loader.array(data, "probe", Where((), ""))
    loader.check_unique("probe", items)
    probes: dict[str, Probe] = {}
    for where, raw in items:
        table = loader.table("probe", where, raw)
        name = table.get_str("name", required=True)
        ranges = []
        for text, range_where in table.get_str_list("match_status_codes"):
            try:
                ranges.append(parse_status_range(text))
            except ValueError as exc:
                loader.report.error(range_where, str(exc))
        path = table.get_str("path", "/") or "/"
        if not path.startswith("/"):
            loader.report.error(where.key("path"), f"must start with '/', got {path!r}")
        interval = table.get_seconds("interval", 30.0)
        if interval > MAX_PROBE_INTERVAL:
            loader.report.error(where.key("interval"), f"must be at most {MAX_PROBE_INTERVAL:.0f}")
        probe = Probe(
            name=name or "",
            protocol=table.get_str("protocol", "", choices=("", "http", "https")) or "",
            host=table.get_str("host") or "",
            path=path,
            interval=interval,
            timeout=table.get_seconds("timeout", 30.0),
            unhealthy_threshold=table.get_int("unhealthy_threshold", 3, low=1, high=20) or 3,
            match_status_codes=tuple(ranges) or ((200, 399),),
            match_body=table.get_str("match_body") or "",
        )
        if name:
            probes.setdefault(name, probe)
    return probes
