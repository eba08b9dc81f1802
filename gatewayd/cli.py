"""The `gatewayd` command (CONTRACT §2).

Every `[server]` key is also a flag (`--worker-connections 500`) and an environment
variable (`GATEWAYD_WORKER_CONNECTIONS=500`); configargparse resolves flag > environment,
and the config loader applies those over the file.  Exit codes: 0 normal stop,
1 runtime error, 3 workers failed to boot, 4 config error.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

import configargparse

from gatewayd import __version__
from gatewayd.config import SERVER_KEYS, ConfigError, load_config

EXIT_OK, EXIT_RUNTIME, EXIT_BOOT, EXIT_CONFIG = 0, 1, 3, 4


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def build_parser() -> configargparse.ArgumentParser:
    parser = configargparse.ArgumentParser(
        prog="gatewayd",
        description="Layer-7 application gateway with end-to-end TLS.",
        formatter_class=configargparse.ArgumentDefaultsRawHelpFormatter,
    )
    parser.add_argument("-c", "--config", metavar="FILE", help="the TOML config file")
    parser.add_argument("--check", action="store_true",
                        help="validate the config and exit (0 valid, 4 invalid)")
    parser.add_argument("--connect", action="store_true",
                        help="with --check: also handshake every backend server")
    parser.add_argument("--pin", metavar="CERT",
                        help="print the SPKI pin of a certificate (PEM or DER) and exit")
    parser.add_argument("--demo", action="store_true",
                        help="run the built-in demo on https://localhost:8443")
    parser.add_argument("--demo-port", type=int, default=8443, metavar="PORT",
                        help="with --demo: the port of the demo listener")
    parser.add_argument("--version", action="version", version=f"gatewayd {__version__}")
    server = parser.add_argument_group("[server] settings (flag > environment > file)")
    for key, kind in SERVER_KEYS.items():
        flag = "--" + key.replace("_", "-")
        env = "GATEWAYD_" + key.upper()
        convert = _bool if kind is bool else kind
        server.add_argument(flag, dest=key, type=convert, default=None, env_var=env,
                            metavar=kind.__name__.upper(), help=f"[server].{key} (${env})")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    overrides = {key: getattr(args, key) for key in SERVER_KEYS
                 if getattr(args, key) is not None}
    if args.pin:
        return _print_pin(args.pin)
    if args.demo:
        from gatewayd.demo import run_demo

        return run_demo(overrides, args.demo_port)
    if not args.config:
        parser.error("-c FILE is required (or --demo, --pin CERT, --version)")
    if args.connect and not args.check:
        parser.error("--connect goes with --check")
    try:
        config = load_config(args.config, overrides)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_CONFIG
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.check:
        if args.connect:
            from gatewayd.connectcheck import check_all

            return EXIT_OK if check_all(config, sys.stdout) else EXIT_CONFIG
        print(f"{args.config}: OK", file=sys.stderr)
        return EXIT_OK
    return serve(args.config, config, overrides)


def serve(path: str, config: object, overrides: dict[str, object]) -> int:
    from gatewayd.master import Arbiter
    from gatewayd.model import GatewayConfig

    assert isinstance(config, GatewayConfig)
    setup_logging(config.server.log_level)
    logging.getLogger("gatewayd").info("gatewayd %s starting (pid %d)", __version__,
                                       os.getpid())
    return Arbiter(path, config, overrides).run()


def setup_logging(level: str) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s gatewayd[%(process)d] %(levelname)s %(name)s: %(message)s",
    )


def _print_pin(path: str) -> int:
    from gatewayd.pins import format_pin, load_first_certificate, spki_sha256

    try:
        with open(path, "rb") as fh:
            cert = load_first_certificate(fh.read())
    except (OSError, ValueError) as exc:
        print(f"gatewayd: {path}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(format_pin(spki_sha256(cert)))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
