"""TOML config file → one validated, immutable `GatewayConfig` (CONTRACT §3).

Everything is checked at load, and every problem of the file is reported in one go as
``FILE:LINE: <table>.<key>: <message>`` (CONTRACT §2): unknown keys (with a "did you
mean"), wrong types, missing keys, out-of-range values, duplicate names, dangling
references, unreadable or unparsable certificate files, keys that do not match their
certificate, expired certificates and listeners that can never be reached.  Non-fatal
findings (a certificate expiring soon, a suite the local OpenSSL refuses) end up in
`GatewayConfig.warnings`.

Keys that are part of the contract but not implemented yet are accepted only with their
default value; anything else is an error rather than silently ignored (the table
`NOT_YET_SUPPORTED`, which later releases shrink).

The helpers live beside this module: `config_lines` (line numbers), `config_reader`
(typed table access and problem collection) and `config_certs` (certificate checks).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from typing import Any

from gatewayd import config_frontend as frontend
from gatewayd import config_sections as sections
from gatewayd.config_lines import index_lines
from gatewayd.config_probes import load_probes
from gatewayd.config_reader import (
    NOT_YET_SUPPORTED,
    Loader,
    Problem,
    Report,
    Table,
    Where,
    suggest,
)
from gatewayd.config_sections import SERVER_KEYS, parse_address
from gatewayd.model import BackendPool, BackendSettings, GatewayConfig, PathRule, Rule

__all__ = [
    "NOT_YET_SUPPORTED",
    "SERVER_KEYS",
    "ConfigError",
    "Problem",
    "load_config",
    "load_config_text",
    "parse_address",
]


class ConfigError(Exception):
    """The file is not valid; `problems` lists every finding, `str()` one per line.
    `warnings` carries the non-fatal findings of the same load, for ``--check``."""

    def __init__(self, problems: list[Problem], warnings: list[Problem] | None = None) -> None:
        self.problems = list(problems)
        self.warnings = list(warnings or [])
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(str(problem) for problem in self.problems)


_TOP_LEVEL = ("server", "listener", "ssl_policy", "backend_pool", "backend_settings", "rule",
              "probe", "redirect", "rewrite_set", "error_pages")
MAX_PRIORITY = 20000
_TOML_LINE = re.compile(r"\s*\(at line (\d+), column \d+\)")


def load_config(path: str, overrides: Mapping[str, object] | None = None) -> GatewayConfig:
    """Read and validate the file at `path`; relative paths inside resolve against its
    folder.  `overrides` are `[server]` values from flags/env and win over the file."""
    try:
        with open(path, "rb") as handle:
            text = handle.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = "no such file" if isinstance(exc, FileNotFoundError) else str(exc)
        raise ConfigError([Problem(path, None, "", f"cannot read config: {reason}")]) from None
    base_dir = os.path.dirname(os.path.abspath(path))
    return load_config_text(text, source=path, base_dir=base_dir, overrides=overrides)


def load_config_text(text: str, *, source: str, base_dir: str,
                     overrides: Mapping[str, object] | None = None) -> GatewayConfig:
    """Validate TOML `text`; `source` names it in messages, `base_dir` anchors paths."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = _TOML_LINE.search(str(exc))
        line = int(match.group(1)) if match else None
        message = _TOML_LINE.sub("", str(exc)).strip()
        raise ConfigError([Problem(source, line, "", f"invalid TOML: {message}")]) from None
    report = Report(source, index_lines(text))
    config = _GatewayLoader(report, base_dir).load(data, dict(overrides or {}))
    if report.problems:
        raise ConfigError(_in_file_order(report.problems), _in_file_order(report.warnings))
    assert config is not None
    return config


def _in_file_order(problems: list[Problem]) -> list[Problem]:
    return sorted(problems, key=lambda p: (p.line is None, p.line or 0))


class _GatewayLoader(Loader):
    """One load: walks the document section by section, building model values and
    recording problems (see `Loader` for the shared helpers)."""

    def load(self, data: dict[str, Any], overrides: dict[str, object]) -> GatewayConfig | None:
        root = Where((), "")
        for key, value in data.items():
            if key in NOT_YET_SUPPORTED[""]:
                self.reject_unsupported("", key, value, root.key(key))
            elif key not in _TOP_LEVEL:
                self.report.error(root.key(key), "unknown key" + suggest(key, _TOP_LEVEL))
        server = sections.server_settings(self, data, overrides)
        sections.custom_policies(self, data)
        pools = self.backend_pools(data)
        probes = load_probes(self, data)
        settings = self.backend_settings(data)
        listeners = sections.listeners(self, data)
        redirects = frontend.redirects(self, data)
        rewrite_sets = frontend.rewrite_sets(self, data)
        global_pages = frontend.global_error_pages(self, data)
        rules = self.rules(data)
        self.unreferenced_listeners(data)
        if self.report.problems:
            return None
        return GatewayConfig(
            source=self.report.source,
            server=server,
            listeners=tuple(listeners),
            backend_pools=pools,
            backend_settings=settings,
            rules=tuple(sorted(rules, key=lambda rule: rule.priority)),
            probes=probes,
            redirects=redirects,
            rewrite_sets=rewrite_sets,
            error_pages=global_pages,
            warnings=tuple(str(w) for w in _in_file_order(self.report.warnings)),
        )

    def backend_pools(self, data: dict[str, Any]) -> dict[str, BackendPool]:
        items = self.array(data, "backend_pool", Where((), ""))
        self.check_unique("backend_pool", items)
        pools: dict[str, BackendPool] = {}
        for where, raw in items:
            table = self.table("backend_pool", where, raw)
            name = table.get_str("name", required=True)
            servers = []
            for server, server_where in table.get_str_list("servers", required=True):
                try:
                    sections.split_host_port(server)
                except ValueError as exc:
                    self.report.error(server_where, str(exc))
                    continue
                servers.append(server)
            if name is not None:
                pools.setdefault(name, BackendPool(name, tuple(servers)))
        return pools

    def backend_settings(self, data: dict[str, Any]) -> dict[str, BackendSettings]:
        items = self.array(data, "backend_settings", Where((), ""))
        self.check_unique("backend_settings", items)
        result: dict[str, BackendSettings] = {}
        for where, raw in items:
            built = sections.backend_settings(self, self.table("backend_settings", where, raw))
            if built is not None:
                result.setdefault(built.name, built)
        return result

    def rules(self, data: dict[str, Any]) -> list[Rule]:
        items = self.array(data, "rule", Where((), ""))
        self.check_unique("rule", items)
        by_priority: dict[int, Where] = {}
        by_listener: dict[str, Where] = {}
        rules = []
        for where, raw in items:
            table = self.table("rule", where, raw)
            name = table.get_str("name", required=True)
            priority = table.get_int("priority", required=True, low=1, high=MAX_PRIORITY)
            listener = self.reference(table, "listener", "listener")
            pool, settings, redirect, rewrite_set = self.target(table)
            if priority is not None:
                self.once(by_priority, priority, where, "priority", f"priority {priority}")
            if listener is not None:
                self.once(by_listener, listener, where, "listener",
                          f"listener {listener!r}", " (one rule per listener)")
            path_rules = self.path_rules(where, raw)
            if None in (name, priority, listener, pool, settings, redirect, rewrite_set) \
                    or path_rules is None:
                continue
            if not name:
                continue  # an empty name is reported by `array`
            assert priority and listener and pool is not None and settings is not None
            assert redirect is not None and rewrite_set is not None
            rules.append(Rule(name, priority, listener, pool, settings, path_rules,
                              redirect=redirect, rewrite_set=rewrite_set))
        return rules

    def target(self, table: Table) -> tuple[str | None, str | None, str | None, str | None]:
        """(backend_pool, backend_settings, redirect, rewrite_set) of a rule or path rule:
        a redirect replaces the pool and settings (Azure: a rule targets either a backend
        or a redirect); None marks a reported problem, "" an absent key."""
        redirect = frontend.optional_reference(self, table, "redirect", "redirect")
        rewrite_set = frontend.optional_reference(self, table, "rewrite_set", "rewrite_set")
        if table.has("redirect"):
            for key in ("backend_pool", "backend_settings"):
                if table.has(key):
                    self.report.error(table.where.key(key),
                                      "a rule with a redirect has no backend target")
            return "", "", redirect, rewrite_set
        pool = self.reference(table, "backend_pool", "backend_pool")
        settings = self.reference(table, "backend_settings", "backend_settings")
        return pool, settings, redirect, rewrite_set

    def once(self, seen: dict[Any, Where], value: object, where: Where, key: str, what: str,
             why: str = "") -> None:
        """Report `value` at `where.key` if an earlier rule already claimed it."""
        if value in seen:
            self.report.error(where.key(key), f"{what} is already used by {seen[value].label}{why}")
        else:
            seen[value] = where

    def path_rules(self, rule_where: Where, raw: dict[str, Any]) -> tuple[PathRule, ...] | None:
        items = self.array(raw, "path_rule", rule_where)
        self.check_unique("path_rule", items)
        built: list[PathRule] = []
        ok = True
        for where, item in items:
            table = self.table("path_rule", where, item)
            name = table.get_str("name", required=True)
            paths = [p for p, pw in table.get_str_list("paths", required=True)
                     if self.path_pattern(p, pw)]
            if isinstance(item.get("paths"), list) and not item["paths"]:
                self.report.error(where.key("paths"), "needs at least one path pattern")
            pool, settings, redirect, rewrite_set = self.target(table)
            if None in (name, pool, settings, redirect, rewrite_set) or not paths:
                ok = False
                continue
            assert name is not None and pool is not None and settings is not None
            assert redirect is not None and rewrite_set is not None
            built.append(PathRule(name, tuple(paths), pool, settings, redirect=redirect,
                                  rewrite_set=rewrite_set))
        return tuple(built) if ok else None

    def path_pattern(self, pattern: str, where: Where) -> bool:
        """Azure path patterns: ``/x``, ``/x*``, ``/x/*`` — one `*`, only at the end."""
        if not pattern.startswith("/"):
            self.report.error(where, f"a path pattern must start with '/', got {pattern!r}")
        elif "*" in pattern[:-1]:
            self.report.error(where, f"'*' is only allowed at the end of a path, got {pattern!r}")
        elif any(c in pattern for c in "?# ") or any(c.isspace() for c in pattern):
            self.report.error(
                where, f"a path pattern cannot contain '?', '#' or spaces, got {pattern!r}"
            )
        else:
            return True
        return False

    def unreferenced_listeners(self, data: dict[str, Any]) -> None:
        """A listener no rule points at can never serve a request (Azure requires one)."""
        rules = data.get("rule", [])
        referenced = {
            rule.get("listener") for rule in (rules if isinstance(rules, list) else [])
            if isinstance(rule, dict) and isinstance(rule.get("listener"), str)
        }
        listeners = data.get("listener", [])
        if not isinstance(listeners, list):
            return
        for position, raw in enumerate(listeners):
            name = raw.get("name") if isinstance(raw, dict) else None
            if isinstance(name, str) and name not in referenced:
                where = Where(("listener", position, "name"), f"listener[{name}].name")
                self.report.error(
                    where, "no rule references this listener, so it can never be reached"
                )
