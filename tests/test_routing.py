"""Routing tables (CONTRACT §5): host patterns, listener choice, paths, normalisation."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from gatewayd.model import (
    Address,
    CertificateFile,
    GatewayConfig,
    Listener,
    PathRule,
    Rule,
    ServerSettings,
    SslPolicy,
)
from gatewayd.routing import (
    BindRouter,
    Route,
    Router,
    RoutingError,
    Target,
    compile_host_pattern,
    normalize_target,
)

BIND = Address("0.0.0.0", 8443)
OTHER_BIND = Address("::", 8080)
CERT = CertificateFile("/c.pem", "/c.key", b"", b"", 0.0)
POLICY = SslPolicy("p", "TLSv1.2", "TLSv1.3", (), ())


def listener(
    name: str,
    *host_names: str,
    protocol: str = "https",
    bind: Address = BIND,
    require_sni: bool = False,
) -> Listener:
    https = protocol == "https"
    return Listener(
        name=name,
        bind=bind,
        protocol=protocol,
        host_names=host_names,
        certificate=CERT if https else None,
        ssl_policy=POLICY if https else None,
        require_sni=require_sni,
    )


def rule(
    name: str, priority: int, path_rules: Sequence[PathRule] = (), *, listener: str = ""
) -> Rule:
    return Rule(
        name=name,
        priority=priority,
        listener=listener or name,
        backend_pool=f"{name}-pool",
        backend_settings=f"{name}-settings",
        path_rules=tuple(path_rules),
    )


def config(listeners: Sequence[Listener], rules: Sequence[Rule]) -> GatewayConfig:
    return GatewayConfig(
        source="test.toml",
        server=ServerSettings(),
        listeners=tuple(listeners),
        rules=tuple(sorted(rules, key=lambda r: r.priority)),
    )


def bind_router(*pairs: tuple[Listener, int | None]) -> BindRouter:
    rules = [rule(lst.name, prio) for lst, prio in pairs if prio is not None]
    return Router(config([lst for lst, _ in pairs], rules)).for_bind(BIND)


# ------------------------------------------------------------------ host patterns


@pytest.mark.parametrize(
    ("pattern", "host", "matches"),
    [
        ("shop.example.test", "shop.example.test", True),
        ("shop.example.test", "SHOP.Example.TEST", True),
        ("Shop.Example.Test", "shop.example.test", True),
        ("shop.example.test", "shop.example.tes", False),
        ("shop.example.test", "xshop.example.test", False),
        ("shop.example.test", "shop.example.test:8443", True),
        ("*.example.test", "a.example.test", True),
        ("*.example.test", "a.b.example.test", True),
        ("*.example.test", "A.B.C.EXAMPLE.TEST", True),
        ("*.example.test", "example.test", False),
        ("*.example.test", ".example.test", False),
        ("*.example.test", "a..example.test", False),
        ("*.example.test", "a.example.test.evil", False),
        ("*.example.test", "aexample.test", False),
        ("shop.*.test", "shop.eu.test", True),
        ("shop.*.test", "shop.eu.west.test", True),
        ("shop.*.test", "shop.test", False),
        ("*", "anything.at.all", True),
        ("shop?.example.test", "shop1.example.test", True),
        ("shop?.example.test", "SHOPX.example.test", True),
        ("shop?.example.test", "shop.example.test", False),
        ("shop?.example.test", "shop12.example.test", False),
        ("shop?example.test", "shop.example.test", False),  # '?' is never a dot
        ("??.example.test", "eu.example.test", True),
        ("??.example.test", "e.example.test", False),
        ("*.exa?ple.test", "a.b.example.test", True),
        ("shop.example.test.", "shop.example.test", True),
        ("shop.example.test", "shop.example.test.", True),
        ("[::1]", "[::1]:8443", True),
        ("::1", "[::1]", True),
        ("a+b.test", "aab.test", False),  # regex metacharacters are literal
    ],
)
def test_host_patterns(pattern: str, host: str, matches: bool) -> None:
    assert compile_host_pattern(pattern)(host) is matches


# -------------------------------------------------------------- listener choice


def test_listener_order_is_rule_priority_then_basic() -> None:
    basic = listener("basic")
    wild = listener("wild", "*.example.test")
    shop = listener("shop", "shop.example.test")
    orphan = listener("orphan", "orphan.example.test")
    router = bind_router((basic, 1), (wild, 30), (orphan, None), (shop, 20))
    assert [lst.name for lst in router.listeners] == ["shop", "wild", "orphan", "basic"]
    assert router.basic is basic


def test_priority_decides_between_exact_and_wildcard() -> None:
    shop = listener("shop", "shop.example.test")
    wild = listener("wild", "*.example.test")
    low_wild = bind_router((shop, 10), (wild, 20))
    assert low_wild.listener_for_host("shop.example.test") is shop
    assert low_wild.listener_for_host("img.example.test") is wild

    high_wild = bind_router((shop, 20), (wild, 10))
    assert high_wild.listener_for_host("shop.example.test") is wild
    assert high_wild.listener_for_host("SHOP.example.test:443") is wild


def test_priority_between_wildcards() -> None:
    deep = listener("deep", "*.eu.example.test")
    wide = listener("wide", "*.example.test")
    router = bind_router((wide, 5), (deep, 6))
    assert router.listener_for_host("a.eu.example.test") is wide
    router = bind_router((wide, 6), (deep, 5))
    assert router.listener_for_host("a.eu.example.test") is deep
    assert router.listener_for_host("a.us.example.test") is wide


def test_listener_with_several_host_names() -> None:
    shop = listener("shop", "shop.example.test", "*.shop.example.test", "shop?.test")
    router = bind_router((shop, 1))
    for host in ("shop.example.test", "eu.shop.example.test", "shop2.test"):
        assert router.listener_for_host(host) is shop
    assert router.listener_for_host("other.test") is None


@pytest.mark.parametrize(
    "host",
    [
        "shop.example.test",
        "SHOP.EXAMPLE.TEST",
        "shop.example.test:8443",
        "Shop.Example.Test:1",
        "shop.example.test.",
        "shop.example.test.:8443",
    ],
)
def test_host_forms(host: str) -> None:
    shop = listener("shop", "shop.example.test")
    assert bind_router((shop, 1)).listener_for_host(host) is shop


@pytest.mark.parametrize("host", ["[2001:db8::1]:8443", "[2001:DB8::1]", "2001:db8::1"])
def test_ipv6_hosts(host: str) -> None:
    v6 = listener("v6", "2001:db8::1")
    basic = listener("basic")
    assert bind_router((v6, 1), (basic, 2)).listener_for_host(host) is v6


def test_basic_listener_fallback_and_none() -> None:
    shop = listener("shop", "shop.example.test")
    basic = listener("basic")
    assert bind_router((shop, 1), (basic, 2)).listener_for_host("other.test") is basic
    assert bind_router((shop, 1), (basic, 2)).listener_for_host("") is basic
    assert bind_router((shop, 1)).listener_for_host("other.test") is None
    assert bind_router((shop, 1)).listener_for_host("") is None


def test_listener_for_sni_has_no_fallback() -> None:
    shop = listener("shop", "shop.example.test")
    basic = listener("basic")
    router = bind_router((shop, 1), (basic, 2))
    assert router.listener_for_sni("Shop.Example.Test") is shop
    assert router.listener_for_sni("other.test") is None
    assert router.listener_for_sni(None) is None
    assert router.listener_for_sni("") is None


def test_certificate_listener_fallbacks() -> None:
    shop = listener("shop", "shop.example.test")
    img = listener("img", "img.example.test")
    basic = listener("basic")
    with_basic = bind_router((shop, 2), (img, 1), (basic, 3))
    assert with_basic.certificate_listener("shop.example.test") is shop
    assert with_basic.certificate_listener("other.test") is basic
    assert with_basic.certificate_listener(None) is basic

    without_basic = bind_router((shop, 2), (img, 1))
    assert without_basic.certificate_listener("shop.example.test") is shop
    assert without_basic.certificate_listener(None) is img  # highest priority
    assert without_basic.certificate_listener("other.test") is img

    http_basic = listener("plain", protocol="http")  # has no certificate to offer
    mixed = bind_router((shop, 2), (img, 1), (http_basic, 3))
    assert mixed.certificate_listener(None) is img

    only_http = bind_router((listener("h", "h.test", protocol="http"), 1))
    assert only_http.certificate_listener("h.test") is None
    assert only_http.certificate_listener(None) is None


def test_select_by_host() -> None:
    shop = listener("shop", "shop.example.test")
    img = listener("img", "img.example.test")
    basic = listener("basic")
    router = bind_router((shop, 1), (img, 2), (basic, 3))
    assert router.select("shop.example.test", "shop.example.test") is shop
    assert router.select("SHOP.example.test:8443", "shop.example.TEST") is shop
    assert router.select("shop.example.test", None) is shop
    # SNI that matches no listener (certificate fell back): Host decides.
    assert router.select("img.example.test", "unknown.test") is img
    assert router.select("other.test", "unknown.test") is basic
    assert router.select("other.test", None) is basic


def test_select_421_when_sni_and_host_differ() -> None:
    shop = listener("shop", "shop.example.test")
    img = listener("img", "img.example.test")
    basic = listener("basic")
    router = bind_router((shop, 1), (img, 2), (basic, 3))
    for host in ("img.example.test", "other.test"):
        with pytest.raises(RoutingError) as info:
            router.select(host, "shop.example.test")
        assert (info.value.status, info.value.error_info) == (421, "sni_host_mismatch")


def test_select_404_without_listener() -> None:
    router = bind_router((listener("shop", "shop.example.test"), 1))
    with pytest.raises(RoutingError) as info:
        router.select("other.test", None)
    assert (info.value.status, info.value.error_info) == (404, "no_listener_for_host")


def test_router_binds() -> None:
    a = listener("a", "a.test")
    b = listener("b", "b.test", bind=OTHER_BIND, protocol="http")
    router = Router(config([a, b], [rule("a", 1), rule("b", 2)]))
    assert router.for_bind(BIND).listeners == (a,)
    assert router.for_bind(Address("::", 8080)).listeners == (b,)
    assert router.for_bind(OTHER_BIND).listener_for_host("a.test") is None
    with pytest.raises(KeyError):
        router.for_bind(Address("127.0.0.1", 1))


# ------------------------------------------------------------------------ paths


def path_router() -> tuple[Router, Listener]:
    shop = listener("shop", "shop.example.test")
    path_rules = [
        PathRule("images", ("/images/*",), "img-pool", "img-settings"),
        PathRule("api", ("/api*", "/v2/api/*"), "api-pool", "api-settings"),
        PathRule("exact", ("/health",), "health-pool", "health-settings"),
        PathRule("shadow", ("/images/big/*", "/apiary"), "never", "never"),
        PathRule("escaped", ("/%7euser/*", "/a%2fb"), "esc-pool", "esc-settings"),
    ]
    return Router(config([shop], [rule("shop", 1, path_rules)])), shop


@pytest.mark.parametrize(
    ("path", "path_rule"),
    [
        ("/images/", "images"),
        ("/images/a.png", "images"),
        ("/images/big/a.png", "images"),  # first listed match wins
        ("/IMAGES/A.PNG", "images"),
        ("/images", None),  # "/x/*" needs the slash
        ("/imagesx", None),
        ("/api", "api"),
        ("/apiary", "api"),
        ("/api/v1/x", "api"),
        ("/API/x", "api"),
        ("/v2/api/", "api"),
        ("/v2/api", None),
        ("/health", "exact"),
        ("/HEALTH", "exact"),
        ("/health?full=1", "exact"),  # query ignored, should a caller pass one
        ("/health/", None),
        ("/healthz", None),
        ("/~user/x", "escaped"),
        ("/a%2Fb", "escaped"),
        ("/a/b", None),
        ("/", None),
    ],
)
def test_path_rules(path: str, path_rule: str | None) -> None:
    router, shop = path_router()
    route = router.route(shop, path)
    assert route.listener is shop
    assert route.rule.name == "shop"
    if path_rule is None:
        assert route.path_rule is None
        assert (route.backend_pool, route.backend_settings) == ("shop-pool", "shop-settings")
    else:
        assert route.path_rule is not None
        assert route.path_rule.name == path_rule
        assert route.backend_pool == route.path_rule.backend_pool
        assert route.backend_settings == route.path_rule.backend_settings


def test_routes_are_prebuilt() -> None:
    router, shop = path_router()
    assert router.route(shop, "/images/a") is router.route(shop, "/images/b")
    assert router.route(shop, "/x") is router.route(shop, "/y")
    assert isinstance(router.route(shop, "/x"), Route)


def test_rule_without_path_rules() -> None:
    shop = listener("shop", "shop.example.test")
    router = Router(config([shop], [rule("shop", 1)]))
    route = router.route(shop, "/anything")
    assert route == Route(shop, rule("shop", 1), None, "shop-pool", "shop-settings")


def test_no_rule_is_404() -> None:
    shop = listener("shop", "shop.example.test")
    orphan = listener("orphan", "orphan.example.test")
    router = Router(config([shop, orphan], [rule("shop", 1)]))
    with pytest.raises(RoutingError) as info:
        router.route(orphan, "/")
    assert (info.value.status, info.value.error_info) == (404, "no_rule")


@pytest.mark.parametrize("pattern", ["images/*", "/a*b", "/*/x", ""])
def test_invalid_path_patterns(pattern: str) -> None:
    shop = listener("shop", "shop.example.test")
    bad = rule("shop", 1, [PathRule("bad", (pattern,), "p", "s")])
    with pytest.raises(ValueError, match="path pattern"):
        Router(config([shop], [bad]))


# ---------------------------------------------------------------- normalisation


@pytest.mark.parametrize(
    ("raw", "path", "query"),
    [
        (b"/", "/", ""),
        (b"/a/b", "/a/b", ""),
        (b"/a/b?x=1&y=2", "/a/b", "x=1&y=2"),
        (b"/a?", "/a", ""),
        (b"/a??b", "/a", "?b"),
        (b"/a?/b/../c", "/a", "/b/../c"),  # query untouched
        (b"/a?%2e%2e", "/a", "%2e%2e"),  # query escapes untouched
        (b"/a?list[]=1&j={}|^`\\", "/a", "list[]=1&j={}|^`\\"),  # browser-style query
        (b"/a/./b", "/a/b", ""),
        (b"/a/../b", "/b", ""),
        (b"/a/b/..", "/a/", ""),
        (b"/a/b/.", "/a/b/", ""),
        (b"/a/.", "/a/", ""),
        (b"/.", "/", ""),
        (b"/a/..", "/", ""),
        (b"/a/b/../../c", "/c", ""),
        (b"/a/./../b/./c/.", "/b/c/", ""),
        (b"/a//b", "/a//b", ""),  # no slash merging
        (b"//a/../b", "//b", ""),
        (b"/a//..", "/a/", ""),
        (b"/...", "/...", ""),
        (b"/..a/.b/a..", "/..a/.b/a..", ""),
        (b"/%2e%2e%2f", "/..%2F", ""),  # ".." is not a whole segment here
        (b"/a/%2e/b", "/a/b", ""),
        (b"/a/%2E%2e/b", "/b", ""),
        (b"/a/.%2e", "/", ""),
        (b"/a%2fb", "/a%2Fb", ""),  # %2F kept, hex upper-cased
        (b"/a%2Fb/../c", "/c", ""),  # %2F is no segment separator
        (b"/%7Euser", "/~user", ""),
        (b"/%41%5a%61%7a%30%39%2D%2E%5F%7E", "/AZaz09-._~", ""),
        (b"/%20%25%3a%c3%a9", "/%20%25%3A%C3%A9", ""),
        (b"/%252e", "/%252e", ""),  # decoded once only
        (b"/a:b@c!$&'()*+,;=", "/a:b@c!$&'()*+,;=", ""),
        (b"/a-b_c.d~e", "/a-b_c.d~e", ""),
    ],
)
def test_normalize_origin_form(raw: bytes, path: str, query: str) -> None:
    assert normalize_target(raw) == Target(path, query, None)


@pytest.mark.parametrize(
    "raw", [b"/..", b"/../x", b"/a/../../x", b"/a/../..", b"/%2e%2e/x", b"/%2E%2E", b"/./.."]
)
def test_climbing_above_root(raw: bytes) -> None:
    with pytest.raises(RoutingError) as info:
        normalize_target(raw)
    assert (info.value.status, info.value.error_info) == (400, "path_above_root")


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"a/b",
        b"example.test:443",  # authority-form (CONNECT)
        b"**",
        b"*x",
        b"ftp://example.test/",
        b"http:/x",
        b"http://",
        b"http:///x",
        b"http://user@example.test/",
        b"http://exa mple.test/",
        b"/a%zz",
        b"/a%2",
        b"/a%",
        b"/%%41",
        b"/a?b=%zz",
        b"/a?b=%",
        b"/a b",
        b"/a\tb",
        b"/a\x00b",
        b"/a\x7fb",
        b"/caf\xc3\xa9",
        b"/a#frag",
        b"/a\\..\\b",
        b'/a"b',
        b"/a<b>",
        b"/a[1]",
        b"/a|b",
        b"/a?b c",
        b"/a?b#c",
        b"/a?\xff",
        b"/a?<script>",
    ],
)
def test_bad_targets(raw: bytes) -> None:
    with pytest.raises(RoutingError) as info:
        normalize_target(raw)
    assert (info.value.status, info.value.error_info) == (400, "bad_target")


@pytest.mark.parametrize(
    ("raw", "target"),
    [
        (b"http://example.test/a?b", Target("/a", "b", "example.test")),
        (b"https://example.test:8443/a/../b", Target("/b", "", "example.test:8443")),
        (b"HTTPS://Example.Test", Target("/", "", "Example.Test")),
        (b"http://example.test?x=1", Target("/", "x=1", "example.test")),
        (b"http://[2001:db8::1]:80/%7e", Target("/~", "", "[2001:db8::1]:80")),
    ],
)
def test_normalize_absolute_form(raw: bytes, target: Target) -> None:
    assert normalize_target(raw) == target


def test_absolute_form_still_rejects_climbing() -> None:
    with pytest.raises(RoutingError) as info:
        normalize_target(b"http://example.test/../etc/passwd")
    assert info.value.error_info == "path_above_root"


def test_asterisk_form() -> None:
    assert normalize_target(b"*") == Target("*", "", None)


def test_routing_error_carries_detail() -> None:
    with pytest.raises(RoutingError) as info:
        normalize_target(b"/a%zz")
    assert "percent-escape" in str(info.value)
    assert info.value.detail == str(info.value)
