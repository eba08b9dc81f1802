"""Sans-IO tests of the frontend features: redirect Locations, rewrite evaluation and
variables, client-certificate headers, error pages, and their config validation."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

from gatewayd.clientcert import NO_CERTIFICATE, describe, normalize_dn
from gatewayd.config import ConfigError, load_config_text
from gatewayd.errorpages import ErrorPages
from gatewayd.model import Address, Listener, Redirect, RewriteCondition, RewriteRule, RewriteSet
from gatewayd.redirects import check_target_url, compile_redirect
from gatewayd.rewrites import CompiledRewriteSet, RequestVariables, parse_template
from gatewayd.routing import BindRouter, Router, RoutingError
from gatewayd.tlsconf import SNI_MEMO_SIZE, BindTLS, SNIChoice, bind_tls
from tests.support.gateway import GatewaySpec

# -- redirects ----------------------------------------------------------------------------


def _listener(name: str, port: int, protocol: str = "https", hosts: tuple[str, ...] = (),
              bind: str = "0.0.0.0", **kw: object) -> Listener:
    return Listener(name, Address(bind, port), protocol, hosts, None, None, **kw)  # type: ignore[arg-type]


LISTENERS = {
    "https443": _listener("https443", 443, hosts=("*.example.test", "shop.example.test")),
    "https8443": _listener("https8443", 8443),
    "http80": _listener("http80", 80, "http"),
}


@pytest.mark.parametrize(("redirect", "host", "path", "query", "expected"), [
    (Redirect("r", 301, target_listener="https443"), "shop.example.test", "/a/b", "x=1",
     "https://shop.example.test/a/b?x=1"),
    (Redirect("r", 308, target_listener="https443"), "shop.example.test:8080", "/a", "",
     "https://shop.example.test/a"),
    (Redirect("r", 301, target_listener="https8443"), "shop.example.test:8080", "/a", "q",
     "https://shop.example.test:8443/a?q"),
    (Redirect("r", 301, target_listener="https8443", include_path=False), "h", "/a", "q",
     "https://h:8443/?q"),
    (Redirect("r", 301, target_listener="https8443", include_query_string=False), "h", "/a",
     "q", "https://h:8443/a"),
    (Redirect("r", 302, target_listener="http80"), "[2001:db8::1]:8443", "/", "",
     "http://[2001:db8::1]/"),
    (Redirect("r", 301, target_listener="https443"), "", "/x", "",
     "https://shop.example.test/x"),  # no Host: the first exact host name
    (Redirect("r", 302, target_url="https://other.test"), "h", "/a/b", "q=1",
     "https://other.test/a/b?q=1"),
    (Redirect("r", 302, target_url="https://other.test/base/"), "h", "/a", "q=1",
     "https://other.test/base/a?q=1"),
    (Redirect("r", 302, target_url="https://other.test/base?k=v"), "h", "/a", "q=1",
     "https://other.test/base/a?k=v&q=1"),
    (Redirect("r", 302, target_url="https://other.test/fixed", include_path=False,
              include_query_string=False), "h", "/a", "q=1", "https://other.test/fixed"),
])
def test_redirect_location(redirect: Redirect, host: str, path: str, query: str,
                           expected: str) -> None:
    compiled = compile_redirect(redirect, LISTENERS)
    assert compiled.status == redirect.status
    assert compiled.location(host, path, query) == expected


def test_redirect_without_host_and_no_fallback_is_none() -> None:
    compiled = compile_redirect(Redirect("r", 301, target_listener="https8443"), LISTENERS)
    assert compiled.location("", "/", "") is None


@pytest.mark.parametrize("url", ["ftp://x", "/relative", "https://x/#frag", "https://u@x/",
                                 "https://x/a b"])
def test_bad_target_urls(url: str) -> None:
    assert check_target_url(url) is not None


# -- rewrites -------------------------------------------------------------------------------


def _env(headers: list[tuple[bytes, bytes]]) -> RequestVariables:
    return RequestVariables(
        client_ip="192.0.2.7", client_port=50123, host="shop.example.test",
        request_uri="/a/../b?x=1", uri_path="/b", query_string="x=1",
        ssl_protocol="TLSv1.3", ssl_cipher="TLS_AES_256_GCM_SHA384",
        client_certificate_fingerprint="ab" * 32, request_headers=headers)


def test_rewrite_request_set_remove_and_variables() -> None:
    rs = CompiledRewriteSet(RewriteSet("s", (RewriteRule(
        "r1",
        request_headers_set=(("X-Client", "{client_ip}:{client_port}"),
                             ("X-Info", "{host} {request_uri} {uri_path} {query_string} "
                                        "{ssl_protocol} {ssl_cipher}"),
                             ("X-UA", "ua={http_req_user_agent}"),
                             ("Accept", "text/plain")),
        request_headers_remove=("X-Debug",)),)))
    out = rs.rewrite_request(_env([(b"Accept", b"*/*"), (b"X-Debug", b"1"),
                                   (b"User-Agent", b"curl/8"), (b"accept", b"x")]))
    assert out == [
        (b"Accept", b"text/plain"), (b"User-Agent", b"curl/8"),
        (b"X-Client", b"192.0.2.7:50123"),
        (b"X-Info", b"shop.example.test /a/../b?x=1 /b x=1 TLSv1.3 TLS_AES_256_GCM_SHA384"),
        (b"X-UA", b"ua=curl/8"),
    ]


def test_rewrite_conditions_negate_ignore_case_and_original_values() -> None:
    rs = CompiledRewriteSet(RewriteSet("s", (
        RewriteRule("not-curl", (RewriteCondition("{http_req_user_agent}", "^curl",
                                                  negate=True),),
                    request_headers_set=(("X-Browser", "yes"),)),
        RewriteRule("curl", (RewriteCondition("{http_req_user_agent}", "^CURL"),),
                    request_headers_set=(("User-Agent", ""),)),  # empty value removes
        RewriteRule("case", (RewriteCondition("{http_req_user_agent}", "^CURL",
                                              ignore_case=False),),
                    request_headers_set=(("X-Never", "1"),)),
        # sees the original User-Agent even though rule "curl" removed it
        RewriteRule("after", (RewriteCondition("http_req_user_agent", "curl"),),
                    request_headers_set=(("X-Was-Curl", "{http_req_user_agent}"),)),
    )))
    out = rs.rewrite_request(_env([(b"User-Agent", b"curl/8")]))
    assert out == [(b"X-Was-Curl", b"curl/8")]
    out = rs.rewrite_request(_env([(b"User-Agent", b"Mozilla")]))
    assert out == [(b"User-Agent", b"Mozilla"), (b"X-Browser", b"yes")]


def test_rewrite_response_with_response_variables() -> None:
    rs = CompiledRewriteSet(RewriteSet("s", (
        RewriteRule("hsts", response_headers_set=(("Strict-Transport-Security",
                                                   "max-age=31536000"),)),
        RewriteRule("loc", (RewriteCondition("{http_resp_location}", r"^http://internal"),),
                    response_headers_set=(("Location", "https://{host}/moved"),),
                    response_headers_remove=("Server",)),
    )))
    assert rs.rewrites_response and not rs.rewrites_request
    out = rs.rewrite_response(_env([]), [(b"Server", b"x"),
                                         (b"Location", b"http://internal:8080/a")])
    assert out == [(b"Location", b"https://shop.example.test/moved"),
                   (b"Strict-Transport-Security", b"max-age=31536000")]
    out = rs.rewrite_response(_env([]), [(b"Server", b"x")])
    assert out == [(b"Server", b"x"), (b"Strict-Transport-Security", b"max-age=31536000")]


@pytest.mark.parametrize("template", ["{nope}", "{http_req_}", "a\r\nb"])
def test_bad_templates(template: str) -> None:
    with pytest.raises(ValueError):
        parse_template(template)


def test_literal_braces_are_kept() -> None:
    assert parse_template("a{ b }c") == ("a{ b }c",)


# -- client certificates ------------------------------------------------------------------


def _cert(subject: str, issuer: str) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Ex"),
                                    x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key()).serial_number(7)
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now)
            .sign(key, hashes.SHA256()))


def test_client_cert_headers() -> None:
    cert = _cert("alice", "Client CA")
    info = describe(cert, None)
    headers = dict(info.headers())
    assert headers[b"X-Client-Cert-Verify"] == b"SUCCESS"
    assert headers[b"X-Client-Cert-Fingerprint"] == cert.fingerprint(hashes.SHA256()).hex().encode()
    assert headers[b"X-Client-Cert-Subject"] == b"CN=alice"
    assert headers[b"X-Client-Cert-Issuer"] == b"CN=Client CA,O=Ex"
    assert headers[b"X-Client-Cert-Not-After"] == b"Jan  2 03:04:05 2030 GMT"
    assert describe(cert, "certificate has expired").verify == "FAILED:certificate has expired"
    assert NO_CERTIFICATE.headers() == ((b"X-Client-Cert-Verify", b"NONE"),)
    assert describe(_cert("bjørn", "x"), None).subject == "CN=bj\\C3\\B8rn"


def test_allowed_issuers_ignore_order_spaces_and_case() -> None:
    cert = _cert("alice", "Client CA")
    allowed = frozenset({normalize_dn("o=ex, CN=client ca")})
    assert describe(cert, None, allowed).verify == "SUCCESS"
    other = frozenset({normalize_dn("CN=Other CA")})
    assert describe(cert, None, other).verify == "FAILED:issuer_not_allowed"


def test_client_auth_listener_mismatch_is_421() -> None:
    mtls = _listener("mtls", 443, hosts=("secure.test",), client_auth="required")
    plain = _listener("plain", 443)
    router = BindRouter(Address("0.0.0.0", 443), [mtls, plain])
    assert router.select("secure.test", "secure.test") is mtls
    assert router.select("other.test", None) is plain
    # No SNI: the handshake was the basic listener's, without a certificate request.
    with pytest.raises(RoutingError) as caught:
        router.select("secure.test", None)
    assert caught.value.status == 421
    assert caught.value.error_info == "client_cert_listener_mismatch"


# -- config ---------------------------------------------------------------------------------


BASE = """
[[listener]]
name = "web"
bind = "127.0.0.1:8080"
protocol = "http"
{listener_extra}

[[listener]]
name = "secure"
bind = "127.0.0.1:8443"
protocol = "http"

[[backend_pool]]
name = "app"
servers = ["127.0.0.1:9000"]

[[backend_settings]]
name = "app-http"
protocol = "http"

[[rule]]
name = "web"
priority = 10
listener = "web"
{rule}

[[rule]]
name = "secure"
priority = 20
listener = "secure"
backend_pool = "app"
backend_settings = "app-http"
{extra}
"""


def _load(tmp_path: Path, *, rule: str = 'redirect = "to-secure"', extra: str = "",
          listener_extra: str = "") -> object:
    text = BASE.format(rule=rule, extra=extra, listener_extra=listener_extra)
    return load_config_text(text, source="gw.toml", base_dir=str(tmp_path))


REDIRECT = """
[[redirect]]
name = "to-secure"
status = 308
target_listener = "secure"
"""


def test_config_redirect_rule_and_path_rule(tmp_path: Path) -> None:
    config = _load(tmp_path, rule='redirect = "to-secure"\n  [[rule.path_rule]]\n'
                   '  name = "old"\n  paths = ["/old/*"]\n  redirect = "away"\n',
                   extra=REDIRECT + '[[redirect]]\nname = "away"\nstatus = 302\n'
                   'target_url = "https://away.test/new"\ninclude_path = false\n')
    router = Router(config)  # type: ignore[arg-type]
    web = config.listeners[0]  # type: ignore[attr-defined]
    route = router.route(web, "/x")
    assert route.redirect is not None and route.backend_pool == ""
    assert route.redirect.location("h:8080", "/x", "a=1") == "http://h:8443/x?a=1"
    route = router.route(web, "/old/a")
    assert route.redirect is not None
    assert route.redirect.location("h", "/old/a", "") == "https://away.test/new"


@pytest.mark.parametrize(("kw", "message"), [
    ({"extra": REDIRECT.replace("308", "300")}, "must be one of 301, 302, 303, 307, 308"),
    ({"extra": REDIRECT.replace('target_listener = "secure"', "")},
     "needs exactly one of target_listener and target_url"),
    ({"extra": REDIRECT.replace('"secure"', '"secur"')}, "no listener named 'secur'"),
    ({"rule": 'redirect = "nope"'}, "no redirect named 'nope'"),
    ({"rule": 'redirect = "to-secure"\nbackend_pool = "app"', "extra": REDIRECT},
     "a rule with a redirect has no backend target"),
    ({"rule": 'backend_pool = "app"\nbackend_settings = "app-http"\nrewrite_set = "x"',
      "extra": REDIRECT}, "no rewrite_set named 'x'"),
    ({"extra": REDIRECT + '[[rewrite_set]]\nname = "s"\n[[rewrite_set.rule]]\n'
      'condition = { variable = "{http_req_ua}", pattern = "(" }\n'
      'request_headers_set = { X = "1" }\n'}, "invalid regular expression"),
    ({"extra": REDIRECT + '[[rewrite_set]]\nname = "s"\n[[rewrite_set.rule]]\n'
      'request_headers_set = { Host = "evil" }\n'}, "is set by the gateway"),
    ({"extra": REDIRECT + '[[rewrite_set]]\nname = "s"\n[[rewrite_set.rule]]\n'
      'request_headers_set = { X = "{bogus}" }\n'}, "unknown variable {bogus}"),
    ({"extra": REDIRECT + '[[rewrite_set]]\nname = "s"\n[[rewrite_set.rule]]\n'
      'condition = { variable = "{http_resp_server}", pattern = "x" }\n'
      'request_headers_set = { X = "1" }\n'}, "cannot guard request actions"),
    ({"extra": REDIRECT + '[error_pages]\n418 = "x.html"\n'}, "custom pages exist for"),
    ({"extra": REDIRECT + '[error_pages]\n502 = "missing.html"\n'}, "no such file"),
    ({"extra": REDIRECT, "listener_extra": 'client_auth = "required"'},
     "only used by https listeners"),
])
def test_config_errors(tmp_path: Path, kw: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, **kw)
    assert message in str(caught.value), str(caught.value)
    assert "gw.toml:" in str(caught.value)


def test_error_pages_listener_over_global(tmp_path: Path) -> None:
    (tmp_path / "g502.html").write_text("<h1>global 502</h1>")
    (tmp_path / "g404.html").write_text("<h1>global 404</h1>")
    (tmp_path / "l502.html").write_text("<h1>listener 502</h1>")
    config = _load(tmp_path, listener_extra='error_pages = { 502 = "l502.html" }',
                   extra=REDIRECT + '[error_pages]\n502 = "g502.html"\n404 = "g404.html"\n')
    pages = ErrorPages(config)  # type: ignore[arg-type]
    assert pages.page("web", 502) == b"<h1>listener 502</h1>"
    assert pages.page("web", 404) == b"<h1>global 404</h1>"
    assert pages.page("secure", 502) == b"<h1>global 502</h1>"
    assert pages.page(None, 404) == b"<h1>global 404</h1>"
    assert pages.page("web", 503) is None


# -- SNI: the callback's decision, remembered by name ---------------------------------------


def _sni_bind(tmp_path: Path, pki) -> tuple[BindTLS, dict[str, x509.Certificate]]:
    """Two https listeners on one bind: "shop" (shop.example.test) and "basic" (no host
    names: it answers anything else, and handshakes without SNI)."""
    port = 18443
    certs = {name: pki.issue([f"{name}.example.test"], stem=name) for name in ("shop", "basic")}
    spec = GatewaySpec(
        server={"workers": 1, "runtime_dir": str(tmp_path / "run")},
        listeners=[{"name": name, "bind": f"127.0.0.1:{port}", "protocol": "https",
                    "certificate": str(leaf.cert_path), "private_key": str(leaf.key_path),
                    **({"host_names": ["shop.example.test"]} if name == "shop" else {})}
                   for name, leaf in certs.items()],
        pools=[{"name": "app", "servers": ["127.0.0.1:9000"]}],
        settings=[{"name": "app-tls", "protocol": "https", "trusted_root_certificates":
                   [str(pki.ca_pem_path)]}],
        rules=[{"name": name, "priority": 10 + i, "listener": name, "backend_pool": "app",
                "backend_settings": "app-tls"} for i, name in enumerate(certs)])
    config = load_config_text(spec.render(), source="test", base_dir=str(tmp_path))
    tls = bind_tls(Router(config).for_bind(Address("127.0.0.1", port)))
    assert tls is not None
    return tls, {name: leaf.cert for name, leaf in certs.items()}


def _handshake(tls: BindTLS, sni: bytes | None) -> tuple[SSL.Connection, x509.Certificate]:
    """A real TLS handshake over memory BIOs: the server side and the certificate the
    client was shown."""
    server = SSL.Connection(tls.accept_context, None)
    server.set_accept_state()
    client = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
    if sni is not None:
        client.set_tlsext_host_name(sni)
    client.set_connect_state()
    done = {server: False, client: False}
    for _ in range(20):
        for side in (client, server):
            if not done[side]:
                try:
                    side.do_handshake()
                    done[side] = True
                except SSL.WantReadError:
                    pass
        for src, dst in ((client, server), (server, client)):
            try:
                dst.bio_write(src.bio_read(65536))
            except SSL.WantReadError:
                pass
        if all(done.values()):
            peer = client.get_peer_certificate()
            assert peer is not None
            return server, peer.to_cryptography()
    raise AssertionError("handshake did not finish")


def test_sni_choice_is_left_on_the_connection_and_remembered(tmp_path: Path, pki) -> None:
    tls, certs = _sni_bind(tmp_path, pki)
    cases = [(b"shop.example.test", SNIChoice("shop.example.test", "shop", "shop"), "shop"),
             (None, SNIChoice(None, None, "basic"), "basic"),
             (b"other.test", SNIChoice("other.test", None, "basic"), "basic"),
             (b"basic.example.test", SNIChoice("basic.example.test", None, "basic"), "basic")]
    first: dict[bytes | None, object] = {}
    for _round in range(2):
        for sni, expected, listener in cases:
            server, shown = _handshake(tls, sni)
            choice = server.get_app_data()
            assert choice == expected
            assert server.get_context() is tls.by_listener[listener]
            assert shown == certs[listener]
            # the second round reuses the first round's decision (the memo) ...
            assert first.setdefault(sni, choice) is choice
    # ... while the context is looked up at every handshake: a certificate hot reload
    # (a new context in by_listener) serves the next handshake for a remembered name.
    tls.by_listener["shop"] = tls.by_listener["basic"]
    server, shown = _handshake(tls, b"shop.example.test")
    assert server.get_app_data() is first[b"shop.example.test"]
    assert shown == certs["basic"]


def test_sni_memo_is_bounded_and_stays_right(tmp_path: Path, pki) -> None:
    """Client-chosen names cannot grow the memo without bound: it is emptied when full,
    and decisions after that are still the router's."""
    tls, certs = _sni_bind(tmp_path, pki)
    carrier = SSL.Connection(tls.accept_context, None)  # a connection to leave choices on
    names = [f"n{i}.test".encode() for i in range(SNI_MEMO_SIZE + 5)] + [b"shop.example.test"]
    for raw in names:
        carrier.get_servername = lambda raw=raw: raw  # type: ignore[method-assign]
        tls.switcher(carrier)
        shop = raw.startswith(b"shop")
        assert carrier.get_app_data() == SNIChoice(raw.decode(), "shop" if shop else None,
                                                   "shop" if shop else "basic")
        assert carrier.get_context() is tls.by_listener["shop" if shop else "basic"]
        assert 0 < len(tls.switcher.memo) <= SNI_MEMO_SIZE
    assert len(tls.switcher.memo) == 6  # emptied once, at SNI_MEMO_SIZE names
    _, shown = _handshake(tls, b"shop.example.test")
    assert shown == certs["shop"]
