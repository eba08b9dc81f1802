"""Host → listener → rule → path rule, as precompiled tables (CONTRACT §5).

Pure and sans-IO: built once per config generation (before fork), then consulted for
every request by the workers, so everything that can be decided at construction time —
host patterns, path patterns, the `Route` values themselves — is decided then.  A
lookup allocates nothing but the lower-cased host name.

Errors a peer can cause are `RoutingError`, carrying the status to answer with and the
`error_info` for the access log (the h11 split: the peer misbehaved, not the caller).
Misuse by the caller (an unknown bind) raises the ordinary `KeyError`.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from gatewayd.clientcert import normalize_dn
from gatewayd.errorpages import ErrorPages
from gatewayd.model import Address, GatewayConfig, Listener, PathRule, Rule
from gatewayd.redirects import CompiledRedirect, compile_redirect
from gatewayd.rewrites import CompiledRewriteSet

__all__ = [
    "BindRouter",
    "Route",
    "Router",
    "RoutingError",
    "Target",
    "compile_host_pattern",
    "compile_path_pattern",
    "normalize_target",
]


class RoutingError(Exception):
    """The peer's request cannot be routed.

    `status` is what the gateway answers (§7), `error_info` the short cause for the
    access log; `detail` (also the exception's message) is for debugging only.
    """

    status: int
    error_info: str
    detail: str

    def __init__(self, status: int, error_info: str, detail: str = "") -> None:
        super().__init__(detail or error_info)
        self.status = status
        self.error_info = error_info
        self.detail = detail


# --------------------------------------------------------------------------- hosts


def _host_regex(pattern: str) -> str:
    """Regex source for a lower-cased host pattern.

    `*` is one or more characters that never produce an empty label, so as a whole
    label it spans one or more labels (`*.example.test` matches `a.example.test` and
    `a.b.example.test`, never `example.test` nor `.example.test`); `?` is exactly one
    character other than a dot.  Everything else matches itself.
    """
    parts: list[str] = []
    for ch in pattern:
        if ch == "*":
            if parts and parts[-1] == _STAR:
                continue  # "**" means the same as "*"
            parts.append(_STAR)
        elif ch == "?":
            parts.append("[^.]")
        else:
            parts.append(re.escape(ch))
    return "".join(parts)


_STAR = r"[^.]+(?:\.[^.]+)*"


def _pattern_key(pattern: str) -> str:
    """A config host pattern in the form hosts are compared in: lower case, no
    brackets around an IPv6 literal, no trailing root dot (RFC 1034 §3.1)."""
    key = pattern.strip().lower()
    if key.startswith("[") and key.endswith("]"):
        key = key[1:-1]
    if key.endswith(".") and len(key) > 1:
        key = key[:-1]
    return key


def _host_key(host: str) -> str:
    """The name part of a Host header value or SNI, lower-cased.

    Host is `uri-host [ ":" port ]` (RFC 9110 §7.2) where an IPv6 literal is bracketed
    (RFC 3986 §3.2.2); the port is ignored for matching (§5.1).  A bare IPv6 literal
    (several colons, no brackets — not valid in Host, but harmless) is kept whole.  One
    trailing root dot is dropped so `example.test.` routes like `example.test`.
    """
    if host.startswith("["):
        end = host.find("]")
        name = host[1:end] if end > 0 else host
    else:
        colon = host.find(":")
        name = host[:colon] if colon >= 0 and host.find(":", colon + 1) < 0 else host
    return name.removesuffix(".").lower()


def compile_host_pattern(pattern: str) -> Callable[[str], bool]:
    """A predicate for one `host_names` entry; case-insensitive (RFC 4343).

    `*` spans one or more labels, `?` is one character that is not a dot, an exact name
    matches exactly.  The predicate takes a host name without port.
    """
    key = _pattern_key(pattern)
    if "*" not in key and "?" not in key:

        def exact(host: str) -> bool:
            return _host_key(host) == key

        return exact
    fullmatch = re.compile(_host_regex(key)).fullmatch

    def wildcard(host: str) -> bool:
        return fullmatch(_host_key(host)) is not None

    return wildcard


_NO_INDEX = sys.maxsize


class BindRouter:
    """The listeners sharing one bind address, and the Host/SNI lookups among them.

    `listeners` is the match order: listeners with `host_names` by their rule's
    priority (lowest first; file order breaks ties and listeners without a rule come
    last), then the basic listener(s).  Exact names live in a dict; a wildcard is only
    tried when it belongs to a listener that outranks the exact match.
    """

    __slots__ = ("_cert_fallback", "_exact", "_named", "_wild", "basic", "bind",
                 "has_client_auth", "listeners")

    bind: Address
    listeners: tuple[Listener, ...]
    basic: Listener | None

    def __init__(self, bind: Address, listeners: Iterable[Listener]) -> None:
        """`listeners` must already be in match order (see `Router`)."""
        self.bind = bind
        self.listeners = tuple(listeners)
        named = tuple(listener for listener in self.listeners if not listener.is_basic)
        self._named = named
        self.has_client_auth = any(lst.client_auth != "none" for lst in self.listeners)
        self.basic = next((lst for lst in self.listeners if lst.is_basic), None)
        exact: dict[str, int] = {}
        wild: list[tuple[int, Callable[[str], re.Match[str] | None], Listener]] = []
        for index, listener in enumerate(named):
            for pattern in listener.host_names:
                key = _pattern_key(pattern)
                if "*" in key or "?" in key:
                    wild.append((index, re.compile(_host_regex(key)).fullmatch, listener))
                else:
                    exact.setdefault(key, index)
        self._exact = exact
        self._wild = tuple(wild)
        if self.basic is not None and self.basic.protocol == "https":
            self._cert_fallback: Listener | None = self.basic
        else:
            self._cert_fallback = next(
                (lst for lst in self.listeners if lst.protocol == "https"), None
            )

    def __repr__(self) -> str:
        return f"BindRouter({self.bind}, {[lst.name for lst in self.listeners]})"

    def _match(self, name: str) -> Listener | None:
        """The highest-priority listener one of whose host names matches `name`."""
        index = self._exact.get(name, _NO_INDEX)
        for wild_index, fullmatch, listener in self._wild:
            if wild_index >= index:
                break
            if fullmatch(name) is not None:
                return listener
        return self._named[index] if index != _NO_INDEX else None

    def listener_for_host(self, host: str) -> Listener | None:
        """The listener for a Host header value (§5.1): a host-name match in priority
        order, else the basic listener, else None."""
        listener = self._match(_host_key(host))
        return listener if listener is not None else self.basic

    def listener_for_sni(self, sni: str | None) -> Listener | None:
        """The listener whose host names match the TLS SNI (RFC 6066 §3); no fallback,
        so None means the client named no host this bind serves by name."""
        if not sni:
            return None
        return self._match(_host_key(sni))

    def certificate_listener(self, sni: str | None) -> Listener | None:
        """The listener whose certificate to present (§5.2): the SNI match; else the
        basic listener if it is https; else the highest-priority https listener.

        `require_sni` is the caller's decision: it applies when
        `listener_for_sni(sni)` is None.
        """
        listener = self.listener_for_sni(sni)
        if listener is not None and listener.protocol == "https":
            return listener
        return self._cert_fallback

    def select(self, host: str, sni: str | None) -> Listener:
        """The listener that serves a request (§5.1, §5.2).

        RoutingError 404 when no listener takes the Host; 421 (RFC 9110 §15.5.20) when
        the SNI matched one listener and the Host selects another — the connection's
        certificate was chosen for a different site, so this connection must not
        serve the request.
        """
        listener = self.listener_for_host(host)
        if listener is None:
            raise RoutingError(404, "no_listener_for_host", f"no listener for host {host!r}")
        if sni:
            by_sni = self._match(_host_key(sni))
            if by_sni is not None and by_sni.name != listener.name:
                raise RoutingError(
                    421, "sni_host_mismatch", f"SNI {sni!r} and Host {host!r} differ"
                )
        if self.has_client_auth:
            # Mutual TLS is decided in the handshake by the listener whose context did it
            # (SNI match, else the fallback).  A request for another listener on that
            # connection would either skip that listener's client-certificate check or
            # borrow a certificate checked against other CAs: misdirected (RFC 9110
            # §15.5.20), the client must connect with that host as SNI.
            handshake = self.certificate_listener(sni)
            if (handshake is not None and handshake.name != listener.name
                    and (handshake.client_auth != "none" or listener.client_auth != "none")):
                raise RoutingError(421, "client_cert_listener_mismatch",
                                   f"handshake by listener {handshake.name!r}, Host selects "
                                   f"{listener.name!r}")
        return listener


# -------------------------------------------------------------------------- targets


@dataclass(frozen=True, slots=True)
class Target:
    """A normalised request-target.  `query` excludes the `?` and is "" when absent;
    `authority` is set only for the absolute form."""

    path: str
    query: str
    authority: str | None


def _chars(text: bytes) -> bytes:
    return bytes(sorted(set(text)))


_ALPHA_DIGIT = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_UNRESERVED = frozenset(_ALPHA_DIGIT + b"-._~")  # RFC 3986 §2.3
_SUB_DELIMS = b"!$&'()*+,;="  # RFC 3986 §2.2
# path = *( "/" / pchar ), pchar = unreserved / pct-encoded / sub-delims / ":" / "@"
# (RFC 3986 §3.3); "%" is here so the escapes can be checked separately.
_PATH_CHARS = _chars(_ALPHA_DIGIT + b"-._~" + _SUB_DELIMS + b":@/%")
# query = *( pchar / "/" / "?" ) (RFC 3986 §3.4), plus the printable characters that
# browsers send unescaped in a query (WHATWG URL, "query percent-encode set"): a
# strict 3986 check would answer 400 to every `?a[]=1`.  Controls, space, DEL,
# non-ASCII, `"`, `<`, `>` and `#` stay forbidden.
_QUERY_CHARS = _chars(_PATH_CHARS + b"?[]{}|\\^`")
_AUTHORITY_CHARS = _chars(_ALPHA_DIGIT + b"-._~" + _SUB_DELIMS + b":[]%")  # §3.2, no "@"


def _percent_table() -> dict[bytes, bytes]:
    """Every two-hex-digit escape body (any case) → its normal form (RFC 3986 §6.2.2):
    the character itself if unreserved (§2.3), else the escape with upper-case hex
    (§2.1)."""
    table: dict[bytes, bytes] = {}
    for value in range(256):
        upper = b"%02X" % value
        replacement = bytes((value,)) if value in _UNRESERVED else b"%" + upper
        for hi in {upper[:1], upper[:1].lower()}:
            for lo in {upper[1:], upper[1:].lower()}:
                table[hi + lo] = replacement
    return table


_PERCENT = _percent_table()
_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")
_ABSOLUTE = re.compile(rb"[Hh][Tt][Tt][Pp][Ss]?://([^/?]*)(.*)", re.DOTALL)
_ASTERISK = Target("*", "", None)


def _normalize_escapes(path: bytes) -> bytes:
    """Decode unreserved escapes, upper-case the others (RFC 3986 §6.2.2.1, §6.2.2.2).

    One pass, so nothing is decoded twice: `%252e` stays `%252e`, and since `%2F` and
    `%25` are never decoded no new `/` or `%` can appear.
    """
    pieces = path.split(b"%")
    out = [pieces[0]]
    table = _PERCENT
    for piece in pieces[1:]:
        replacement = table.get(piece[:2])
        if replacement is None:
            raise RoutingError(400, "bad_target", "invalid percent-escape in path")
        out.append(replacement)
        out.append(piece[2:])
    return b"".join(out)


def _remove_dot_segments(path: bytes) -> bytes:
    """RFC 3986 §5.2.4 for an absolute path, except that climbing above `/` is an error.

    The RFC silently clamps `/../x` to `/x`; a gateway must not, because a backend that
    resolves dot segments differently would then see another path than the one routed.
    Empty segments are kept (no slash merging), so `//` routes as sent.
    """
    segments = path.split(b"/")
    last = len(segments) - 1
    out: list[bytes] = []
    for position in range(1, last + 1):
        segment = segments[position]
        if segment == b".":
            if position == last:
                out.append(b"")
        elif segment == b"..":
            if not out:
                raise RoutingError(400, "path_above_root", "path climbs above /")
            out.pop()
            if position == last:
                out.append(b"")
        else:
            out.append(segment)
    return b"/" + b"/".join(out)


def normalize_target(raw: bytes) -> Target:
    """Validate and normalise a request-target (RFC 9112 §3.2, CONTRACT §5.3).

    Accepts origin-form (`/p?q`), absolute-form (`http(s)://authority/p?q`, path
    defaulting to `/`) and asterisk-form (`*`); authority-form and anything else is
    `RoutingError(400, "bad_target")`.  The path gets unreserved escapes decoded, other
    escapes upper-cased (`%2F` stays an escape) and dot segments removed — after the
    decoding, so `/%2e%2e/` is `..`; a path climbing above `/` is
    `RoutingError(400, "path_above_root")`.  The query is validated, not changed.
    """
    authority: str | None = None
    if raw[:1] == b"/":
        rest = raw
    elif raw == b"*":
        return _ASTERISK
    else:
        match = _ABSOLUTE.fullmatch(raw)
        if match is None:
            raise RoutingError(400, "bad_target", "not origin-, absolute- or asterisk-form")
        host = match.group(1)
        # RFC 9110 §4.2.1: an http(s) URI with an empty host is invalid; §4.2.4:
        # userinfo is not allowed.
        if not host or host.translate(None, _AUTHORITY_CHARS):
            raise RoutingError(400, "bad_target", "invalid authority")
        authority = host.decode("ascii")
        rest = match.group(2)
        if rest[:1] != b"/":
            rest = b"/" + rest

    mark = rest.find(b"?")
    if mark < 0:
        path, query = rest, b""
    else:
        path, query = rest[:mark], rest[mark + 1 :]

    if path.translate(None, _PATH_CHARS):
        raise RoutingError(400, "bad_target", "character not allowed in path")
    # `find`, not `in`: `b"%" in path` first tries the needle as an integer, and that
    # failed attempt raises (and clears) a TypeError inside CPython on every call.
    if path.find(b"%") >= 0:
        path = _normalize_escapes(path)
    if path.find(b"/.") >= 0:
        path = _remove_dot_segments(path)

    if query:
        if query.translate(None, _QUERY_CHARS):
            raise RoutingError(400, "bad_target", "character not allowed in query")
        if query.find(b"%") >= 0 and _BAD_ESCAPE.search(query) is not None:
            raise RoutingError(400, "bad_target", "invalid percent-escape in query")
        return Target(path.decode("ascii"), query.decode("ascii"), authority)
    return Target(path.decode("ascii"), "", authority)


# --------------------------------------------------------------------------- routes


@dataclass(frozen=True, slots=True)
class Route:
    """Where a request goes: the rule (and path rule, if one matched) and the pool and
    backend settings to use.  Built once per config, shared by every request."""

    listener: Listener
    rule: Rule
    path_rule: PathRule | None
    backend_pool: str
    backend_settings: str
    redirect: CompiledRedirect | None = None  # set: answer with it instead of proxying
    rewrites: CompiledRewriteSet | None = None


def compile_path_pattern(pattern: str) -> str:
    """Regex source for one path pattern (§5.3), to be matched case-insensitively at
    the start of a normalised path.

    `/x/*` and `/x*` are prefixes (`/x/` and below, anything starting `/x`); `/x` is
    exact, ignoring a query should the caller pass one.  The pattern is normalised
    like a path (escapes) so `/%7Euser` matches the normalised `/~user`.  A pattern
    that does not start with `/` or has `*` other than at its end is a ValueError.
    """
    prefix = pattern.endswith("*")
    body = pattern[:-1] if prefix else pattern
    if not body.startswith("/") or "*" in body:
        raise ValueError(f"path pattern {pattern!r}: must start with '/', '*' only at the end")
    raw = body.encode("utf-8")
    if b"%" in raw:
        try:
            raw = _normalize_escapes(raw)
        except RoutingError:
            raise ValueError(f"path pattern {pattern!r}: invalid percent-escape") from None
    source = re.escape(raw.decode("utf-8"))
    return source if prefix else source + r"(?=\?|\Z)"


class _RuleTable:
    """One rule's path rules as a single alternation: the regex engine tries the
    alternatives in order, so the first listed pattern that matches wins (§5.3), and
    the matching group's number indexes the prebuilt Route."""

    __slots__ = ("default", "match", "routes")

    def __init__(self, listener: Listener, rule: Rule, extras: _Extras | None = None) -> None:
        extras = extras or _Extras({}, {})
        self.default = Route(listener, rule, None, rule.backend_pool, rule.backend_settings,
                             extras.redirects.get(rule.redirect),
                             extras.rewrites.get(rule.rewrite_set))
        routes: list[Route] = [self.default]  # group numbers start at 1
        alternatives: list[str] = []
        for path_rule in rule.path_rules:
            route = Route(
                listener, rule, path_rule, path_rule.backend_pool, path_rule.backend_settings,
                extras.redirects.get(path_rule.redirect),
                extras.rewrites.get(path_rule.rewrite_set),
            )
            for pattern in path_rule.paths:
                alternatives.append(f"({compile_path_pattern(pattern)})")
                routes.append(route)
        self.routes = tuple(routes)
        self.match: Callable[[str], re.Match[str] | None] | None = None
        if alternatives:
            # re.ASCII: only ASCII letters fold, and a normalised path is ASCII.
            regex = re.compile("|".join(alternatives), re.IGNORECASE | re.ASCII)
            self.match = regex.match

    def route(self, path: str) -> Route:
        if self.match is not None:
            found = self.match(path)
            if found is not None:
                return self.routes[found.lastindex or 0]
        return self.default


@dataclass(frozen=True, slots=True)
class _Extras:
    """Redirects and rewrite sets compiled once per generation, by name."""

    redirects: dict[str, CompiledRedirect]
    rewrites: dict[str, CompiledRewriteSet]


class Router:
    """All routing tables of one config generation (plus its error pages)."""

    __slots__ = ("_binds", "_issuers", "_tables", "config", "error_pages")

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.error_pages = ErrorPages(config)
        self._issuers = {
            listener.name: frozenset(normalize_dn(dn) for dn in listener.client_allowed_issuers)
            for listener in config.listeners
        }
        by_name = {listener.name: listener for listener in config.listeners}
        extras = _Extras(
            {name: compile_redirect(r, by_name) for name, r in config.redirects.items()},
            {name: CompiledRewriteSet(r) for name, r in config.rewrite_sets.items()},
        )
        rules = sorted(config.rules, key=lambda rule: rule.priority)
        rule_of: dict[str, Rule] = {}
        for rule in rules:
            rule_of.setdefault(rule.listener, rule)
        no_rule = sys.maxsize
        grouped: dict[Address, list[tuple[bool, int, int, Listener]]] = {}
        for index, listener in enumerate(config.listeners):
            found = rule_of.get(listener.name)
            priority = found.priority if found is not None else no_rule
            grouped.setdefault(listener.bind, []).append(
                (listener.is_basic, priority, index, listener)
            )
        self._binds = {
            bind: BindRouter(bind, (entry[3] for entry in sorted(entries)))
            for bind, entries in grouped.items()
        }
        self._tables = {
            listener.name: _RuleTable(listener, rule_of[listener.name], extras)
            for listener in config.listeners
            if listener.name in rule_of
        }

    def allowed_issuers(self, listener: str) -> frozenset[frozenset[tuple[str, str]]]:
        """The normalised `client_allowed_issuers` of a listener (empty: any issuer)."""
        return self._issuers.get(listener, frozenset())

    def for_bind(self, bind: Address) -> BindRouter:
        """The router for one listen address; KeyError if no listener binds it."""
        return self._binds[bind]

    def route(self, listener: Listener, path: str) -> Route:
        """The route for a normalised path on a listener (§5.3): path rules in listed
        order, first match wins, else the rule's defaults; RoutingError(404, "no_rule")
        when no rule references the listener."""
        table = self._tables.get(listener.name)
        if table is None:
            raise RoutingError(404, "no_rule", f"no rule for listener {listener.name!r}")
        return table.route(path)
