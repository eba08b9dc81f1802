"""Redirects (Azure: redirect configurations), compiled once per generation, sans-IO.

A `[[redirect]]` sends the client elsewhere with 301/302/303/307/308 instead of
proxying.  Two kinds, as in Azure Application Gateway:

- `target_listener`: the same host on another listener — the classic HTTP → HTTPS
  redirect.  The URL is ``<listener protocol>://<request host>[:<listener port>]``; the
  port is left out when it is the scheme's default (80/443), as browsers do.
- `target_url`: a fixed absolute URL.

`include_path` appends the request's (normalised, as routed) path, `include_query_string`
its query.  For `target_url` the path is appended to the URL's own path (without its
trailing "/"), and the request query to the URL's own query with "&" — Azure documents
the appending but not the joining; this is the join that never loses a parameter.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from gatewayd.model import Listener, Redirect

__all__ = ["REDIRECT_STATUSES", "CompiledRedirect", "check_target_url", "compile_redirect"]

REDIRECT_STATUSES = (301, 302, 303, 307, 308)
_DEFAULT_PORTS = {"http": 80, "https": 443}
_WILDCARD_BINDS = ("0.0.0.0", "::", "")


def check_target_url(url: str) -> str | None:
    """The problem with a `target_url`, or None: absolute http(s), a host, no fragment
    (a fragment would swallow the appended path and query), ASCII printable only (it
    becomes a header value)."""
    if any(not 0x21 <= ord(c) <= 0x7E for c in url):
        return "must be ASCII without spaces or control characters (percent-encode the rest)"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return f"must be an absolute http:// or https:// URL, got {url!r}"
    if parts.fragment or url.endswith("#"):
        return "must not have a fragment ('#')"
    if "@" in parts.netloc:
        return "must not contain user information ('@')"
    return None


@dataclass(frozen=True, slots=True)
class CompiledRedirect:
    """A redirect with its target listener resolved (scheme, port, fallback host)."""

    name: str
    status: int
    url: str  # target_url, or "" for a listener redirect
    scheme: str = ""
    port: int | None = None  # None: the scheme's default port, left out of the URL
    fallback_host: str = ""  # when the request carried no Host (HTTP/1.0)
    include_path: bool = True
    include_query: bool = True

    def location(self, host: str, path: str, query: str) -> str | None:
        """The Location value for a request with Host `host` (as received, port and
        all), normalised `path` and `query` (without "?"); None when a listener
        redirect cannot name a host (no Host and no fallback)."""
        if self.url:
            return self._url_location(path, query)
        name = _host_without_port(host) or self.fallback_host
        if not name:
            return None
        port = "" if self.port is None else f":{self.port}"
        out = f"{self.scheme}://{name}{port}"
        out += path if self.include_path else "/"
        if self.include_query and query:
            out += "?" + query
        return out

    def _url_location(self, path: str, query: str) -> str:
        base, _, own_query = self.url.partition("?")
        if self.include_path:
            parts = urlsplit(base)
            prefix = base[: len(base) - len(parts.path)] if parts.path else base
            base = prefix + parts.path.rstrip("/") + path
        queries = [q for q in (own_query, query if self.include_query else "") if q]
        return base + ("?" + "&".join(queries) if queries else "")


def _host_without_port(host: str) -> str:
    """`host` minus a `:port` suffix; an IPv6 literal keeps its brackets."""
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end > 0 else ""
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def compile_redirect(redirect: Redirect, listeners: dict[str, Listener]) -> CompiledRedirect:
    """Resolve `redirect` against the listeners (validated config: the target exists)."""
    if redirect.target_url:
        return CompiledRedirect(redirect.name, redirect.status, redirect.target_url,
                                include_path=redirect.include_path,
                                include_query=redirect.include_query_string)
    target = listeners[redirect.target_listener]
    port: int | None = target.bind.port
    if port == _DEFAULT_PORTS[target.protocol]:
        port = None
    exact = [h for h in target.host_names if "*" not in h and "?" not in h]
    fallback = exact[0] if exact else ""
    if not fallback and target.bind.host not in _WILDCARD_BINDS:
        bind_host = target.bind.host
        fallback = f"[{bind_host}]" if ":" in bind_host else bind_host
    return CompiledRedirect(redirect.name, redirect.status, "", scheme=target.protocol,
                            port=port, fallback_host=fallback,
                            include_path=redirect.include_path,
                            include_query=redirect.include_query_string)
