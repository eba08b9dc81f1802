"""Test support for gatewayd's live tests.

Everything here works with real things: real sockets bound to loopback on ports picked
free, real TLS handshakes with certificates made by :mod:`tests.support.pki`, and real
backend server *processes* (:mod:`tests.support.backend`, driven by
:class:`tests.support.procs.Backend`).  Waiting is always on a condition with a deadline
(:func:`tests.support.procs.wait_for`), never a bare sleep.

Modules:

* :mod:`tests.support.pki` -- throw-away CAs, leaf / self-signed / expired certificates.
* :mod:`tests.support.backend` -- stdlib-only HTTP(S) backend, ``python -m``-runnable.
* :mod:`tests.support.procs` -- process wrappers, waiting helpers, curl and stdlib clients.
"""
