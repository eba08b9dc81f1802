"""Header rewrites (Azure: rewrite sets), sans-IO: templates and conditions are compiled
once per generation (before fork), evaluation takes header lists and returns new ones.

Azure's model, kept: a rewrite set is a list of rules; a rule runs its actions when all
its conditions hold; a condition matches a variable against a regular expression
(case-insensitive unless `ignore_case = false`, optionally negated).  Request actions
run before the request is forwarded, response actions before the backend's response is
relayed; conditions always see the *original* values (a rule never observes an earlier
rule's rewrite).  Setting a header to a value that expands to "" removes it (Azure:
"set it to an empty value").  Gateway-made responses (errors, redirects) are never
rewritten.

Variables, written `{name}`: the server variables in `SERVER_VARIABLES`,
`{http_req_<header>}` and `{http_resp_<header>}` where `_` stands for `-` and case is
ignored (`{http_req_user_agent}` is User-Agent); several fields of one name are joined
with ", " (RFC 9110 §5.3).  A missing header or variable expands to "".
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gatewayd.model import RewriteCondition, RewriteRule, RewriteSet

__all__ = [
    "SERVER_VARIABLES",
    "CompiledRewriteSet",
    "RequestVariables",
    "compile_rewrite_set",
    "forbidden_header",
    "parse_template",
]

SERVER_VARIABLES = (
    "client_ip", "client_port", "host", "request_uri", "uri_path", "query_string",
    "ssl_protocol", "ssl_cipher", "client_certificate_fingerprint",
)
_VARIABLE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_-]*)\}")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 §5.6.2

# Fields only the gateway may write: hop-by-hop and framing (it re-frames every
# message), and the headers it asserts to the backend (CONTRACT §6).
_FRAMING = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
    "upgrade", "content-length",
})
_REQUEST_OWNED = _FRAMING | {
    "host", "expect", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-port",
    "x-forwarded-host", "x-original-host", "x-request-id",
}


def forbidden_header(name: str, *, request: bool) -> str | None:
    """Why header `name` may not be rewritten in that direction, or None."""
    if not _TOKEN.fullmatch(name):
        return f"{name!r} is not a valid header name"
    lower = name.lower()
    owned = _REQUEST_OWNED if request else _FRAMING
    if lower in owned or (request and lower.startswith("x-client-cert-")):
        return f"{name!r} is set by the gateway and cannot be rewritten"
    return None


# A template part: a literal, or ("var", name) resolved at evaluation.
_Part = str | tuple[str, str]


def parse_template(text: str) -> tuple[_Part, ...]:
    """Split a header value into literals and variables; ValueError names an unknown
    variable or a character that cannot be in a header value (RFC 9110 §5.5)."""
    if any(c in text for c in "\r\n\0") or any(ord(c) < 0x20 and c != "\t" for c in text):
        raise ValueError("a header value cannot contain control characters")
    parts: list[_Part] = []
    position = 0
    for match in _VARIABLE.finditer(text):
        name = match.group(1).lower()
        if not _known_variable(name):
            raise ValueError(f"unknown variable {{{match.group(1)}}} (known: "
                             + ", ".join(f"{{{v}}}" for v in SERVER_VARIABLES)
                             + ", {http_req_<header>}, {http_resp_<header>})")
        if match.start() > position:
            parts.append(text[position:match.start()])
        parts.append(("var", name))
        position = match.end()
    if position < len(text):
        parts.append(text[position:])
    return tuple(parts)


def _known_variable(name: str) -> bool:
    return (name in SERVER_VARIABLES
            or (name.startswith(("http_req_", "http_resp_")) and len(name.split("_", 2)[2]) > 0))


def variable_name(text: str) -> str:
    """A condition's `variable` ("{http_req_user_agent}" or bare) → its lower-case name;
    ValueError when unknown."""
    bare = text[1:-1] if text.startswith("{") and text.endswith("}") else text
    name = bare.lower()
    if not _VARIABLE.fullmatch("{" + bare + "}") or not _known_variable(name):
        raise ValueError(f"unknown variable {text!r}")
    return name


@dataclass(slots=True)
class RequestVariables:
    """What a request's variables resolve from (filled by the proxy per request)."""

    client_ip: str
    client_port: int
    host: str
    request_uri: str
    uri_path: str
    query_string: str
    ssl_protocol: str
    ssl_cipher: str
    client_certificate_fingerprint: str
    request_headers: Sequence[tuple[bytes, bytes]]

    def get(self, name: str, response_headers: Sequence[tuple[bytes, bytes]] = ()) -> str:
        if name.startswith("http_req_"):
            return _header(self.request_headers, name[9:])
        if name.startswith("http_resp_"):
            return _header(response_headers, name[10:])
        if name == "client_port":
            return str(self.client_port)
        value: str = getattr(self, name)
        return value


def _header(headers: Sequence[tuple[bytes, bytes]], key: str) -> str:
    wanted = key.replace("_", "-").encode("latin-1")
    values = [v for n, v in headers if n.lower().replace(b"_", b"-") == wanted]
    return b", ".join(values).decode("latin-1")


@dataclass(frozen=True, slots=True)
class _Condition:
    variable: str
    search: Callable[[str], re.Match[str] | None]
    negate: bool

    def holds(self, env: RequestVariables, response: Sequence[tuple[bytes, bytes]]) -> bool:
        return (self.search(env.get(self.variable, response)) is not None) != self.negate


@dataclass(frozen=True, slots=True)
class _Actions:
    set: tuple[tuple[bytes, bytes, tuple[_Part, ...]], ...]  # name, lower name, template
    remove: frozenset[bytes]  # lower-case names


@dataclass(frozen=True, slots=True)
class _Rule:
    conditions: tuple[_Condition, ...]
    request: _Actions | None
    response: _Actions | None


def _compile_condition(condition: RewriteCondition) -> _Condition:
    flags = re.IGNORECASE if condition.ignore_case else 0
    return _Condition(variable_name(condition.variable),
                      re.compile(condition.pattern, flags).search, condition.negate)


def _compile_actions(values: tuple[tuple[str, str], ...],
                     removes: tuple[str, ...]) -> _Actions | None:
    if not values and not removes:
        return None
    sets = tuple((name.encode("latin-1"), name.lower().encode("latin-1"), parse_template(value))
                 for name, value in values)
    return _Actions(sets, frozenset(name.lower().encode("latin-1") for name in removes))


def _compile_rule(rule: RewriteRule) -> _Rule:
    return _Rule(
        tuple(_compile_condition(c) for c in rule.conditions),
        _compile_actions(rule.request_headers_set, rule.request_headers_remove),
        _compile_actions(rule.response_headers_set, rule.response_headers_remove),
    )


def uses_response_variable(rule: RewriteRule) -> bool:
    """True when a condition reads the response: such a rule cannot rewrite the
    request, which is sent before any response exists (checked at load)."""
    return any(variable_name(c.variable).startswith("http_resp_") for c in rule.conditions)


class CompiledRewriteSet:
    """One rewrite set, ready to evaluate.  Regexes are compiled here (at load)."""

    __slots__ = ("name", "rewrites_request", "rewrites_response", "rules")

    def __init__(self, rewrite_set: RewriteSet) -> None:
        self.name = rewrite_set.name
        self.rules = tuple(_compile_rule(rule) for rule in rewrite_set.rules)
        self.rewrites_request = any(r.request is not None for r in self.rules)
        self.rewrites_response = any(r.response is not None for r in self.rules)

    def rewrite_request(self, env: RequestVariables) -> list[tuple[bytes, bytes]]:
        """The request headers after every applicable rule's request actions."""
        headers = list(env.request_headers)
        for rule in self.rules:
            if rule.request is not None and all(c.holds(env, ()) for c in rule.conditions):
                headers = _apply(rule.request, headers, env, ())
        return headers

    def rewrite_response(
        self, env: RequestVariables, response: Sequence[tuple[bytes, bytes]]
    ) -> list[tuple[bytes, bytes]]:
        """The backend's response headers after every applicable rule's response actions
        (`{http_resp_*}` and conditions read the original response headers)."""
        headers = list(response)
        for rule in self.rules:
            if rule.response is not None and all(c.holds(env, response)
                                                 for c in rule.conditions):
                headers = _apply(rule.response, headers, env, response)
        return headers


def _expand(template: tuple[_Part, ...], env: RequestVariables,
            response: Sequence[tuple[bytes, bytes]]) -> bytes:
    out = [part if isinstance(part, str) else env.get(part[1], response) for part in template]
    return "".join(out).encode("latin-1", "replace")


def _apply(actions: _Actions, headers: list[tuple[bytes, bytes]], env: RequestVariables,
           response: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Removes, then sets: a set replaces every field of that name with one, at the
    place of the first (or at the end), and an empty expansion removes it."""
    if actions.remove:
        headers = [(n, v) for n, v in headers if n.lower() not in actions.remove]
    for name, lower, template in actions.set:
        value = _expand(template, env, response).strip(b" \t")
        out: list[tuple[bytes, bytes]] = []
        placed = False
        for n, v in headers:
            if n.lower() == lower:
                if not placed and value:
                    out.append((name, value))
                placed = True
            else:
                out.append((n, v))
        if not placed and value:
            out.append((name, value))
        headers = out
    return headers


def compile_rewrite_set(rewrite_set: RewriteSet) -> CompiledRewriteSet:
    return CompiledRewriteSet(rewrite_set)
