"""`watch_certificates = true`: pick up a listener's renewed certificate, key or OCSP
response without a reload.

Each worker polls the files' (inode, size, mtime) every `POLL_INTERVAL` seconds.  On a
change it reads and checks the new pair exactly as the config loader does (chain order,
key matches, not expired, OCSP response for this certificate) and builds a new TLS
context; only then does it replace the listener's entry in `BindTLS.by_listener`, which
the SNI callback consults for every new handshake.  Open connections keep the context
they started with.  A broken pair is refused with one log line per change and the old
certificate stays in service.  Session tickets keep resuming across workers because
they are sealed with the bind's accept context, which is never replaced.

A HUP reload re-reads every file anyway (it builds a new generation); this watcher is for
operators whose renewal tooling cannot signal the master.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import replace

import gevent

from gatewayd import config_certs as certs
from gatewayd.config_frontend import ocsp_problem
from gatewayd.model import CertificateFile, Listener
from gatewayd.tlsconf import BindTLS, check_certificate_pair

from .spec import BoundListener

log = logging.getLogger("gatewayd.certwatch")
POLL_INTERVAL = 5.0

_Signature = tuple[tuple[int, int, int], ...]


def _signature(paths: list[str]) -> _Signature:
    out = []
    for path in paths:
        try:
            st = os.stat(path)
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((0, -1, 0))
    return tuple(out)


def _paths(listener: Listener) -> list[str]:
    assert listener.certificate is not None
    paths = [listener.certificate.certificate_path, listener.certificate.private_key_path]
    if listener.ocsp_response_path:
        paths.append(listener.ocsp_response_path)
    return paths


class _Watched:
    __slots__ = ("listener", "signature", "tls")

    def __init__(self, listener: Listener, tls: BindTLS) -> None:
        self.listener = listener
        self.tls = tls
        self.signature = _signature(_paths(listener))


def load_pair(listener: Listener) -> Listener:
    """`listener` with its certificate, key and OCSP response re-read from disk and
    checked; ValueError says why the new files cannot be served."""
    assert listener.certificate is not None
    old = listener.certificate
    try:
        cert_pem = certs.read_file(old.certificate_path, old.certificate_path)
        key_pem = certs.read_file(old.private_key_path, old.private_key_path)
        chain = certs.load_pem_chain(cert_pem, old.certificate_path)
    except certs.FileProblem as exc:
        raise ValueError(str(exc)) from None
    fresh = CertificateFile(old.certificate_path, old.private_key_path, cert_pem, key_pem,
                            certs.not_after(chain[0]).timestamp())
    ocsp = b""
    if listener.ocsp_response_path:
        try:
            ocsp = certs.read_file(listener.ocsp_response_path, listener.ocsp_response_path)
        except certs.FileProblem as exc:
            raise ValueError(str(exc)) from None
        problem = ocsp_problem(ocsp, fresh, datetime.datetime.now(datetime.UTC))
        if problem is not None and not problem.startswith("warning: "):
            raise ValueError(f"OCSP response {listener.ocsp_response_path!r}: {problem}")
    return replace(listener, certificate=fresh, ocsp_response=ocsp)


def reload_listener(watched: _Watched) -> bool:
    """Try the files now on disk; True if the listener now serves them."""
    name = watched.listener.name
    try:
        listener = load_pair(watched.listener)
        context = check_certificate_pair(listener, listener.certificate)  # type: ignore[arg-type]
    except ValueError as exc:
        log.error("listener %s: new certificate refused, still serving the previous one: %s",
                  name, exc)
        return False
    watched.tls.by_listener[name] = context
    watched.listener = listener
    assert listener.certificate is not None
    log.warning("listener %s: certificate reloaded from %s (valid until %s)", name,
                listener.certificate.certificate_path,
                datetime.datetime.fromtimestamp(listener.certificate.not_after,
                                                datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"))
    return True


def watched_listeners(bound: tuple[BoundListener, ...]) -> list[_Watched]:
    return [
        _Watched(listener, b.tls)
        for b in bound if b.tls is not None
        for listener in b.router.listeners
        if listener.watch_certificates and listener.certificate is not None
    ]


def watch_forever(watched: list[_Watched], interval: float = POLL_INTERVAL) -> None:
    """The polling loop (a greenlet of the worker)."""
    while True:
        gevent.sleep(interval)
        for item in watched:
            signature = _signature(_paths(item.listener))
            if signature != item.signature:
                item.signature = signature
                reload_listener(item)
