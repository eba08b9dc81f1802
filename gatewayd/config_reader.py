"""Problem collection for the config loader: positions, typed table access, the
not-yet-supported table, and the `Loader` helpers the section loaders share.

The loader in `gatewayd.config` asks a `Table` for each key with the type it needs; a
missing, unknown or mistyped key becomes a `Problem` (with file, line and key path) and
the getter returns a fallback so validation carries on.  That is how ``--check`` reports
every problem of a file in one run rather than one per edit-and-retry cycle.

TOML distinguishes booleans from integers, and so do we: ``workers = true`` is a type
error, not 1 (Python's ``bool`` is an ``int`` subclass, hence the explicit checks).
"""

from __future__ import annotations

import datetime
import difflib
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

from gatewayd.config_certs import FileProblem
from gatewayd.config_lines import LineIndex, Path
from gatewayd.model import SslPolicy

P = ParamSpec("P")
T = TypeVar("T")


@dataclass(frozen=True)
class Problem:
    """One finding, printed as ``FILE:LINE: key: message`` (CONTRACT §2)."""

    file: str
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


@dataclass(frozen=True)
class Where:
    """A position in the document: `path` finds the line, `label` is what we print
    (``listener[shop].host_names[1]``).  `path` None means "not from the file"
    (a command-line or environment override), so no line is given."""

    path: Path | None
    label: str

    def key(self, name: str) -> Where:
        path = None if self.path is None else (*self.path, name)
        return Where(path, f"{self.label}.{name}" if self.label else name)

    def index(self, position: int) -> Where:
        path = None if self.path is None else (*self.path, position)
        return Where(path, f"{self.label}[{position}]")


@dataclass
class Report:
    """Problems (fatal) and warnings of one load, with line numbers resolved."""

    source: str
    lines: LineIndex
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)

    def _problem(self, where: Where, message: str) -> Problem:
        line = None if where.path is None else self.lines.line(where.path)
        return Problem(self.source, line, where.label, message)

    def error(self, where: Where, message: str) -> None:
        self.problems.append(self._problem(where, message))

    def warn(self, where: Where, message: str) -> None:
        self.warnings.append(self._problem(where, message))

    def line_of(self, where: Where) -> int | None:
        return None if where.path is None else self.lines.line(where.path)


def suggest(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` when a close match exists, else empty."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def type_name(value: object) -> str:
    """TOML's names for value types, for "expected X, got Y" messages."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, (datetime.date, datetime.time)):
        return "a date/time"
    return type(value).__name__


def is_default(value: object, default: object) -> bool:
    """Equality that does not confuse ``false`` with ``0``."""
    if isinstance(value, bool) or isinstance(default, bool):
        return value is default
    return value == default


_MISSING = object()


class Table:
    """Typed access to one TOML table; every getter records its own problems.

    `known` is every key the table may hold; anything else is reported once, at
    construction, with a close-match suggestion.
    """

    def __init__(self, report: Report, where: Where, data: Mapping[str, Any],
                 known: Iterable[str]) -> None:
        self.report = report
        self.where = where
        self.data = data
        known_keys = list(known)
        for key in data:
            if key not in known_keys:
                report.error(where.key(key), "unknown key" + suggest(key, known_keys))

    def has(self, key: str) -> bool:
        return key in self.data

    def _get(self, key: str, required: bool) -> Any:
        if key not in self.data:
            if required:
                self.report.error(self.where.key(key), "required key is missing")
            return _MISSING
        return self.data[key]

    def _wrong(self, key: str, expected: str, value: object) -> None:
        self.report.error(self.where.key(key), f"expected {expected}, got {type_name(value)}")

    def get_str(self, key: str, default: str = "", *, required: bool = False,
                choices: tuple[str, ...] = ()) -> str | None:
        """A string; None when missing-and-required or invalid (already reported)."""
        value = self._get(key, required)
        if value is _MISSING:
            return None if required else default
        if not isinstance(value, str):
            self._wrong(key, "a string", value)
            return None
        if choices and value not in choices:
            self.report.error(
                self.where.key(key), f"must be one of {', '.join(choices)}; got {value!r}"
            )
            return None
        return value

    def get_bool(self, key: str, default: bool = False) -> bool:
        value = self._get(key, False)
        if value is _MISSING:
            return default
        if not isinstance(value, bool):
            self._wrong(key, "a boolean (true or false)", value)
            return default
        return value

    def get_int(self, key: str, default: int | None = None, *, required: bool = False,
                low: int | None = None, high: int | None = None) -> int | None:
        """An integer within [low, high]; None when invalid (reported) or missing."""
        value = self._get(key, required)
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self._wrong(key, "an integer", value)
            return None
        message = range_problem(value, low, high)
        if message:
            self.report.error(self.where.key(key), message)
            return None
        return value

    def get_seconds(self, key: str, default: float) -> float:
        """A positive number of seconds (integer or float)."""
        value = self._get(key, False)
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self._wrong(key, "a number of seconds", value)
            return default
        if not value > 0:
            self.report.error(self.where.key(key), f"must be greater than 0; got {value}")
            return default
        return float(value)

    def get_str_list(self, key: str, *, required: bool = False) -> list[tuple[str, Where]]:
        """A list of strings, each with its own position for element-level messages."""
        value = self._get(key, required)
        if value is _MISSING:
            return []
        if not isinstance(value, list):
            self._wrong(key, "an array of strings", value)
            return []
        items: list[tuple[str, Where]] = []
        for position, item in enumerate(value):
            where = self.where.key(key).index(position)
            if isinstance(item, str):
                items.append((item, where))
            else:
                self.report.error(where, f"expected a string, got {type_name(item)}")
        return items


def range_problem(value: float, low: float | None, high: float | None) -> str | None:
    """The message for a number outside [low, high], or None."""
    if low is not None and high is not None and not low <= value <= high:
        return f"must be between {low} and {high}; got {value}"
    if low is not None and value < low:
        return f"must be at least {low}; got {value}"
    if high is not None and value > high:
        return f"must be at most {high}; got {value}"
    return None


_ABSENT = object()  # default of a top-level table that is not implemented: any use is an error

NOT_YET_SUPPORTED: dict[str, dict[str, tuple[object, str]]] = {
    "": {},
    "server": {},
}
"""Contract keys parsed but not implemented yet: table kind → key → (default, feature).
Present with a non-default value they are an error; later releases delete entries."""

KEYS: dict[str, tuple[str, ...]] = {
    "listener": ("name", "bind", "protocol", "host_names", "certificate", "private_key",
                 "ssl_policy", "require_sni", "x_forwarded_for_port", "client_auth",
                 "client_ca", "client_allowed_issuers", "ocsp_response_file",
                 "watch_certificates", "error_pages"),
    "redirect": ("name", "status", "target_listener", "target_url", "include_path",
                 "include_query_string"),
    "rewrite_set": ("name", "rule"),
    "rewrite_rule": ("name", "condition", "request_headers_set", "request_headers_remove",
                     "response_headers_set", "response_headers_remove"),
    "ssl_policy": ("min_protocol", "cipher_suites"),
    "backend_pool": ("name", "servers"),
    "backend_settings": ("name", "protocol", "port", "host_name",
                         "pick_host_name_from_backend_address", "sni_name",
                         "pinned_public_keys", "pinned_certificates",
                         "trusted_root_certificates", "min_protocol", "connect_timeout",
                         "request_timeout", "cookie_based_affinity", "affinity_cookie_name",
                         "connection_draining_timeout", "path", "probe"),
    "probe": ("name", "protocol", "host", "path", "interval", "timeout",
              "unhealthy_threshold", "match_status_codes", "match_body"),
    "rule": ("name", "priority", "listener", "backend_pool", "backend_settings", "path_rule",
             "redirect", "rewrite_set"),
    "path_rule": ("name", "paths", "backend_pool", "backend_settings", "redirect",
                  "rewrite_set"),
}
"""The implemented keys of each array-of-tables kind (NOT_YET_SUPPORTED adds the rest)."""


class Loader:
    """State and helpers shared by the section loaders of one load.

    References are checked against the names *written* in the file (`names`), so one
    broken item does not cascade into "no listener named …" noise elsewhere.
    """

    def __init__(self, report: Report, base_dir: str) -> None:
        self.report = report
        self.base_dir = base_dir
        self.now = datetime.datetime.now(datetime.UTC)
        self.names: dict[str, list[str]] = {}
        self.custom_policies: dict[str, SslPolicy | None] = {}  # None: invalid, reported

    def attempt(self, where: Where, fn: Callable[P, T], *args: P.args,
                **kwargs: P.kwargs) -> T | None:
        """Run a certificate check; its FileProblem becomes a problem at `where`."""
        try:
            return fn(*args, **kwargs)
        except FileProblem as exc:
            self.report.error(where, str(exc))
            return None

    def path(self, shown: str) -> str:
        """Absolute path of a file named in the config (relative to its folder)."""
        return os.path.normpath(os.path.join(self.base_dir, os.path.expanduser(shown)))

    def reject_unsupported(self, kind: str, key: str, value: object, where: Where) -> None:
        entry = NOT_YET_SUPPORTED.get(kind, {}).get(key)
        if entry is not None and not is_default(value, entry[0]):
            self.report.error(where, f"not supported yet ({entry[1]} arrives in a later release)")

    def table(self, kind: str, where: Where, raw: Mapping[str, Any]) -> Table:
        """A `Table` of `kind` whose not-yet-supported keys have been checked."""
        unsupported = NOT_YET_SUPPORTED.get(kind, {})
        table = Table(self.report, where, raw, (*KEYS.get(kind, ()), *unsupported))
        for key in unsupported:
            if key in raw:
                self.reject_unsupported(kind, key, raw[key], where.key(key))
        return table

    def array(self, raw: Mapping[str, Any], key: str,
              parent: Where) -> list[tuple[Where, dict[str, Any]]]:
        """The tables of ``[[key]]`` inside `raw`, each with its position and label
        (``listener[shop]``, or the index when the item has no usable name)."""
        value = raw.get(key, [])
        base = parent.key(key)
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            self.report.error(
                base, f"expected an array of tables ([[{key}]]), got {type_name(value)}"
            )
            return []
        items = []
        for position, item in enumerate(value):
            name = item.get("name")
            label = name if isinstance(name, str) and name else str(position)
            path = None if base.path is None else (*base.path, position)
            where = Where(path, f"{base.label}[{label}]")
            if name == "":
                self.report.error(where.key("name"), "must not be empty")
            items.append((where, item))
        names = [item["name"] for _, item in items if isinstance(item.get("name"), str)]
        self.names[key] = self.names.get(key, []) + names
        return items

    def check_unique(self, kind: str, items: list[tuple[Where, dict[str, Any]]]) -> None:
        """Second and later uses of a name are errors (names are how items refer)."""
        first: dict[str, Where] = {}
        for where, item in items:
            name = item.get("name")
            if not isinstance(name, str):
                continue
            if name in first:
                line = self.report.line_of(first[name])
                at = f" at line {line}" if line is not None else ""
                self.report.error(
                    where.key("name"), f"duplicate {kind} name {name!r} (first defined{at})"
                )
            else:
                first[name] = where

    def reference(self, table: Table, key: str, kind: str) -> str | None:
        """A required name that must exist among the `kind` items of the file."""
        name = table.get_str(key, required=True)
        known = self.names.get(kind, [])
        if name is not None and name not in known:
            self.report.error(
                table.where.key(key), f"no {kind} named {name!r}" + suggest(name, known)
            )
            return None
        return name
