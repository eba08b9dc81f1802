"""The backend name cache: last good addresses survive a DNS failure (unit test: a DNS
server whose answers change on demand cannot exist on this machine, so the lookup
function is replaced; everything else is the real code)."""

from __future__ import annotations

import logging
import socket

import pytest
from gatewayd.workers import resolver as resolver_module
from gatewayd.workers.resolver import Resolver


def test_last_good_addresses_survive_a_failed_refresh(monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    answers: list[object] = [[(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.1", 443))]]

    def fake_getaddrinfo(host: str, port: int, *args: object) -> object:
        answer = answers[-1]
        if isinstance(answer, OSError):
            raise answer
        return answer

    monkeypatch.setattr(resolver_module.gsocket, "getaddrinfo", fake_getaddrinfo)
    resolver = Resolver()
    first = resolver.resolve("backend.internal", 443)
    assert first[0][4] == ("10.0.0.1", 443)
    answers.append(socket.gaierror(-2, "Name or service not known"))
    with caplog.at_level(logging.WARNING, "gatewayd.dns"):
        assert resolver._lookup("backend.internal", 443) == first  # refresh fails: kept
        assert resolver._lookup("backend.internal", 443) == first
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "keeping the last good addresses" in warnings[0]
    answers.append([(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.2", 443))])
    assert resolver._lookup("backend.internal", 443)[0][4] == ("10.0.0.2", 443)
    assert resolver.resolve("backend.internal", 443)[0][4] == ("10.0.0.2", 443)


def test_never_resolved_name_raises_and_ip_literals_skip_dns(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(*args: object) -> object:
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(resolver_module.gsocket, "getaddrinfo", failing)
    resolver = Resolver()
    with pytest.raises(OSError):
        resolver.resolve("nowhere.invalid", 443)
    assert resolver.resolve("127.0.0.1", 8443)[0][4] == ("127.0.0.1", 8443)
    assert resolver.resolve("::1", 8443)[0][0] == socket.AF_INET6
