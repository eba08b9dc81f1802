"""Loaders for the frontend features: `[[redirect]]`, `[[rewrite_set]]`, `[error_pages]`
and the listener keys for mutual TLS, OCSP stapling, certificate watching and error
pages.  `gatewayd.config` and `gatewayd.config_sections` call them; like every loader
they report problems with file:line and return what could be built.

Regular expressions, templates, target URLs, CA files, OCSP responses and error pages
are all checked (and read) here, so `--check` catches what would otherwise fail on the
first request that needs them.
"""

from __future__ import annotations

import datetime
import re
from typing import Any

from cryptography import x509
from cryptography.x509 import ocsp

from gatewayd import config_certs as certs
from gatewayd.clientcert import normalize_dn
from gatewayd.config_reader import Loader, Table, Where, suggest, type_name
from gatewayd.errorpages import ERROR_PAGE_STATUSES, MAX_PAGE_BYTES
from gatewayd.model import (
    CertificateFile,
    Redirect,
    RewriteCondition,
    RewriteRule,
    RewriteSet,
)
from gatewayd.redirects import REDIRECT_STATUSES, check_target_url
from gatewayd.rewrites import forbidden_header, parse_template, variable_name

CLIENT_AUTH = ("none", "optional", "required")
_CONDITION_KEYS = ("variable", "pattern", "ignore_case", "negate")


# -- listener keys ----------------------------------------------------------------------

def listener_extras(loader: Loader, table: Table, protocol: str | None,
                    certificate: CertificateFile | None) -> dict[str, Any]:
    """The Listener keyword arguments of the frontend keys (mutual TLS, OCSP, watching,
    error pages); https-only keys on an http listener are errors."""
    where = table.where
    extras: dict[str, Any] = {}
    client_auth = table.get_str("client_auth", "none", choices=CLIENT_AUTH) or "none"
    https_only = ("client_auth", "client_ca", "client_allowed_issuers", "ocsp_response_file",
                  "watch_certificates")
    if protocol == "http":
        for key in https_only:
            if table.has(key) and table.data[key] not in ("none", [], "", False):
                loader.report.error(where.key(key), "only used by https listeners")
        extras["error_pages"] = error_pages(loader, table.data.get("error_pages"),
                                           where.key("error_pages"))
        return extras
    extras["client_auth"] = client_auth
    bundle = b""
    for shown, item_where in table.get_str_list("client_ca"):
        data = loader.attempt(item_where, certs.read_file, loader.path(shown), shown)
        chain = None if data is None else loader.attempt(item_where, certs.load_pem_chain,
                                                         data, shown)
        bundle += b"".join(certs.to_pem(cert) for cert in chain or [])
    issuers = []
    for text, item_where in table.get_str_list("client_allowed_issuers"):
        try:
            normalize_dn(text)
            issuers.append(text)
        except ValueError as exc:
            loader.report.error(item_where, str(exc))
    if client_auth != "none" and not table.data.get("client_ca"):
        loader.report.error(where.key("client_ca"),
                            f'client_auth = "{client_auth}" needs at least one CA file')
    elif client_auth == "none":
        for key in ("client_ca", "client_allowed_issuers"):
            if table.data.get(key):
                loader.report.error(where.key(key), 'has no effect with client_auth = "none"')
    extras["client_ca_pem"] = bundle
    extras["client_allowed_issuers"] = tuple(issuers)
    ocsp_shown = table.get_str("ocsp_response_file") or ""
    if ocsp_shown:
        der = loader.attempt(where.key("ocsp_response_file"), certs.read_file,
                             loader.path(ocsp_shown), ocsp_shown)
        if der is not None:
            problem = ocsp_problem(der, certificate, loader.now)
            if problem is not None and problem.startswith("warning: "):
                loader.report.warn(where.key("ocsp_response_file"), problem[9:])
            elif problem is not None:
                loader.report.error(where.key("ocsp_response_file"), f"{ocsp_shown!r}: {problem}")
            extras["ocsp_response"] = der
        extras["ocsp_response_path"] = loader.path(ocsp_shown)
    extras["watch_certificates"] = table.get_bool("watch_certificates")
    extras["error_pages"] = error_pages(loader, table.data.get("error_pages"),
                                        where.key("error_pages"))
    return extras


def ocsp_problem(der: bytes, certificate: CertificateFile | None,
                 now: datetime.datetime) -> str | None:
    """Why a DER OCSP response cannot be stapled for `certificate` (None: fine).  A
    response past its nextUpdate is only a warning ("warning: " prefix): clients ignore
    a stale staple, and the operator's updater may be about to replace it."""
    try:
        response = ocsp.load_der_ocsp_response(der)
    except ValueError:
        return "is not a DER OCSP response"
    if response.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        return f"OCSP response status is {response.response_status.name}, not SUCCESSFUL"
    if certificate is not None:
        leaf = x509.load_pem_x509_certificates(certificate.certificate_pem)[0]
        if response.serial_number != leaf.serial_number:
            return "the OCSP response is for another certificate (serial number differs)"
    if response.certificate_status != ocsp.OCSPCertStatus.GOOD:
        return f"the OCSP response says the certificate is {response.certificate_status.name}"
    next_update = response.next_update_utc
    if next_update is not None and next_update < now:
        return f"warning: the OCSP response expired on {next_update:%Y-%m-%d %H:%M:%S} UTC"
    return None


def error_pages(loader: Loader, raw: object, where: Where) -> tuple[tuple[int, bytes], ...]:
    """`{ 502 = "pages/502.html", … }` → ((502, body), …), every file read now."""
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        loader.report.error(where, f"expected a table of status = file, got {type_name(raw)}")
        return ()
    pages: list[tuple[int, bytes]] = []
    allowed = ", ".join(map(str, ERROR_PAGE_STATUSES))
    for key, shown in raw.items():
        item = where.key(key)
        if not key.isdigit() or int(key) not in ERROR_PAGE_STATUSES:
            loader.report.error(item, f"custom pages exist for gateway-made {allowed}; "
                                f"got {key!r}")
            continue
        if not isinstance(shown, str):
            loader.report.error(item, f"expected a file name, got {type_name(shown)}")
            continue
        body = loader.attempt(item, certs.read_file, loader.path(shown), shown)
        if body is None:
            continue
        if len(body) > MAX_PAGE_BYTES:
            loader.report.error(item, f"{shown!r} is larger than {MAX_PAGE_BYTES} bytes")
            continue
        pages.append((int(key), body))
    return tuple(pages)


def global_error_pages(loader: Loader, data: dict[str, Any]) -> dict[int, bytes]:
    return dict(error_pages(loader, data.get("error_pages"), Where(("error_pages",),
                                                                      "error_pages")))


# -- [[redirect]] -----------------------------------------------------------------------

def redirects(loader: Loader, data: dict[str, Any]) -> dict[str, Redirect]:
    """Every `[[redirect]]`; listeners must be loaded first (target_listener names)."""
    items = loader.array(data, "redirect", Where((), ""))
    loader.check_unique("redirect", items)
    result: dict[str, Redirect] = {}
    for where, raw in items:
        table = loader.table("redirect", where, raw)
        name = table.get_str("name", required=True)
        status = table.get_int("status", 301)
        if status is not None and status not in REDIRECT_STATUSES:
            loader.report.error(where.key("status"), "must be one of "
                                + ", ".join(map(str, REDIRECT_STATUSES)) + f"; got {status}")
            status = None
        listener = table.get_str("target_listener") or ""
        url = table.get_str("target_url") or ""
        if bool(listener) == bool(url):
            loader.report.error(where, "needs exactly one of target_listener and target_url")
        if listener and listener not in loader.names.get("listener", []):
            known = loader.names.get("listener", [])
            loader.report.error(where.key("target_listener"),
                                f"no listener named {listener!r}" + suggest(listener, known))
            listener = ""
        if url and (problem := check_target_url(url)) is not None:
            loader.report.error(where.key("target_url"), problem)
            url = ""
        if name is None or status is None or not (listener or url):
            continue
        result.setdefault(name, Redirect(
            name, status, target_listener=listener, target_url=url,
            include_path=table.get_bool("include_path", True),
            include_query_string=table.get_bool("include_query_string", True)))
    return result


# -- [[rewrite_set]] --------------------------------------------------------------------

def rewrite_sets(loader: Loader, data: dict[str, Any]) -> dict[str, RewriteSet]:
    items = loader.array(data, "rewrite_set", Where((), ""))
    loader.check_unique("rewrite_set", items)
    result: dict[str, RewriteSet] = {}
    for where, raw in items:
        table = loader.table("rewrite_set", where, raw)
        name = table.get_str("name", required=True)
        rules = []
        for position, (rule_where, rule_raw) in enumerate(loader.array(raw, "rule", where)):
            rule = _rewrite_rule(loader, rule_where, rule_raw, position)
            if rule is not None:
                rules.append(rule)
        if name is not None:
            result.setdefault(name, RewriteSet(name, tuple(rules)))
    return result


def _rewrite_rule(loader: Loader, where: Where, raw: dict[str, Any],
                  position: int) -> RewriteRule | None:
    table = loader.table("rewrite_rule", where, raw)
    name = table.get_str("name", f"rule{position + 1}") or f"rule{position + 1}"
    conditions = _conditions(loader, where.key("condition"), raw.get("condition"))
    request_set = _header_values(loader, table, "request_headers_set", request=True)
    request_remove = _header_names(loader, table, "request_headers_remove", request=True)
    response_set = _header_values(loader, table, "response_headers_set", request=False)
    response_remove = _header_names(loader, table, "response_headers_remove", request=False)
    if not (request_set or request_remove or response_set or response_remove):
        loader.report.error(where, "a rewrite rule needs at least one action "
                            "(request_headers_set/_remove, response_headers_set/_remove)")
        return None
    reads_response = any(c.variable.strip("{}").lower().startswith("http_resp_")
                         for c in conditions)
    if reads_response and (request_set or request_remove):
        loader.report.error(where.key("condition"), "a condition on a response header "
                            "cannot guard request actions (the request is sent first)")
    for _, value in request_set:
        if "{http_resp_" in value.lower():
            loader.report.error(where.key("request_headers_set"),
                                "{http_resp_*} is not known when the request is sent")
            break
    return RewriteRule(name, conditions, request_set, request_remove, response_set,
                       response_remove)


def _conditions(loader: Loader, where: Where, raw: object) -> tuple[RewriteCondition, ...]:
    """`condition` is one table or an array of tables (all must hold)."""
    if raw is None:
        return ()
    entries = raw if isinstance(raw, list) else [raw]
    built = []
    for position, entry in enumerate(entries):
        item = where.index(position) if isinstance(raw, list) else where
        if not isinstance(entry, dict):
            loader.report.error(item, f"expected a table {{ variable = …, pattern = … }}, "
                                f"got {type_name(entry)}")
            continue
        table = Table(loader.report, item, entry, _CONDITION_KEYS)
        variable = table.get_str("variable", required=True)
        pattern = table.get_str("pattern", required=True)
        ignore_case = table.get_bool("ignore_case", True)
        if variable is not None:
            try:
                variable_name(variable)
            except ValueError as exc:
                loader.report.error(item.key("variable"), str(exc))
                variable = None
        if pattern is not None:
            try:
                re.compile(pattern, re.IGNORECASE if ignore_case else 0)
            except re.error as exc:
                loader.report.error(item.key("pattern"), f"invalid regular expression: {exc}")
                pattern = None
        if variable is not None and pattern is not None:
            built.append(RewriteCondition(variable, pattern, ignore_case,
                                          table.get_bool("negate")))
    return tuple(built)


def _header_values(loader: Loader, table: Table, key: str,
                   *, request: bool) -> tuple[tuple[str, str], ...]:
    raw = table.data.get(key)
    if raw is None:
        return ()
    where = table.where.key(key)
    if not isinstance(raw, dict):
        loader.report.error(where, f"expected a table of Header-Name = \"value\", "
                            f"got {type_name(raw)}")
        return ()
    result = []
    for name, value in raw.items():
        item = where.key(name)
        problem = forbidden_header(name, request=request)
        if problem is None and not isinstance(value, str):
            problem = f"expected a string value, got {type_name(value)}"
        if problem is None:
            try:
                parse_template(value)
            except ValueError as exc:
                problem = str(exc)
        if problem is not None:
            loader.report.error(item, problem)
        else:
            result.append((name, value))
    return tuple(result)


def _header_names(loader: Loader, table: Table, key: str, *, request: bool) -> tuple[str, ...]:
    names = []
    for name, item in table.get_str_list(key):
        problem = forbidden_header(name, request=request)
        if problem is not None:
            loader.report.error(item, problem)
        else:
            names.append(name)
    return tuple(names)


def optional_reference(loader: Loader, table: Table, key: str, kind: str) -> str | None:
    """An optional name that must exist among the `kind` items: "" when absent, None
    when invalid (reported)."""
    if not table.has(key):
        return ""
    name = table.get_str(key)
    known = loader.names.get(kind, [])
    if name and name not in known:
        loader.report.error(table.where.key(key), f"no {kind} named {name!r}"
                            + suggest(name, known))
        return None
    return name
