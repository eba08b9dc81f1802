"""`gatewayd --demo`: the whole end-to-end TLS picture with no files to write.

Makes a throw-away CA and a certificate for localhost, two self-signed backend
certificates whose public keys are pinned, starts two demo HTTPS backends, writes a
config routing `/images/*` to one and everything else to the other, prints the curl
commands to try, and runs the master on https://localhost:8443 until Ctrl-C.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

DEMO_PORT = 8443


@dataclass
class _Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(names: list[str], issuer: _Issued | None, ca: bool = False) -> _Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    subject = _name(names[0])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        sans: list[x509.GeneralName] = []
        for name in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                sans.append(x509.DNSName(name))
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    signer = issuer.key if issuer else key
    return _Issued(builder.sign(signer, hashes.SHA256()), key)


def _write(folder: str, stem: str, issued: _Issued, chain: list[x509.Certificate]) -> str:
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in [issued.cert, *chain])
    with open(os.path.join(folder, f"{stem}.pem"), "wb") as fh:
        fh.write(pem)
    key_path = os.path.join(folder, f"{stem}.key")
    with open(key_path, "wb") as fh:
        fh.write(issued.key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    os.chmod(key_path, 0o600)
    return os.path.join(folder, f"{stem}.pem")


def _start_backend(name: str, folder: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "gatewayd.demo_backend", "--name", name,
         "--cert", os.path.join(folder, f"{name}.pem"),
         "--key", os.path.join(folder, f"{name}.key")],
        stdout=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    if len(line) != 2 or line[0] != "READY":
        proc.kill()
        raise RuntimeError(f"demo backend {name} did not start")
    return proc, int(line[1])


CONFIG = """\
# Written by `gatewayd --demo`; every key is explained in conf/gatewayd.toml.
[server]
workers = 2
runtime_dir = "{run}"
admin_bind = "127.0.0.1:9180"

[[listener]]
name = "demo"
bind = "127.0.0.1:{port}"
protocol = "https"
certificate = "localhost.pem"
private_key = "localhost.key"
ssl_policy = "AppGwSslPolicy20220101S"

[[backend_pool]]
name = "images"
servers = ["127.0.0.1:{images_port}"]

[[backend_pool]]
name = "web"
servers = ["127.0.0.1:{web_port}"]

[[backend_settings]]
name = "images-tls"
protocol = "https"
port = 443
pinned_certificates = ["images.pem"]

[[backend_settings]]
name = "web-tls"
protocol = "https"
port = 443
pinned_public_keys = ["{web_pin}"]

[[rule]]
name = "demo"
priority = 10
listener = "demo"
backend_pool = "web"
backend_settings = "web-tls"
  [[rule.path_rule]]
  name = "images"
  paths = ["/images/*"]
  backend_pool = "images"
  backend_settings = "images-tls"
"""


def run_demo(overrides: dict[str, object], port: int = DEMO_PORT) -> int:
    from gatewayd.cli import serve
    from gatewayd.config import ConfigError, load_config
    from gatewayd.pins import format_pin, spki_sha256

    folder = tempfile.mkdtemp(prefix="gatewayd-demo-")
    backends: list[subprocess.Popen[str]] = []
    try:
        ca = _issue(["gatewayd demo CA"], None, ca=True)
        _write(folder, "ca", ca, [])
        _write(folder, "localhost", _issue(["localhost", "127.0.0.1", "::1"], ca), [])
        web = _issue(["web.demo.internal"], None)
        _write(folder, "images", _issue(["images.demo.internal"], None), [])
        _write(folder, "web", web, [])
        images_proc, images_port = _start_backend("images", folder)
        web_proc, web_port = _start_backend("web", folder)
        backends = [images_proc, web_proc]
        path = os.path.join(folder, "gatewayd.toml")
        with open(path, "w") as fh:
            fh.write(CONFIG.format(run=os.path.join(folder, "run"), port=port,
                                   images_port=images_port, web_port=web_port,
                                   web_pin=format_pin(spki_sha256(web.cert))))
        try:
            config = load_config(path, overrides)
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            return 4
        ca_path = os.path.join(folder, "ca.pem")
        print(f"""
gatewayd demo: https://localhost:{port}  (files in {folder}; Ctrl-C stops everything)
  backend "web"    https://127.0.0.1:{web_port}     pinned {format_pin(spki_sha256(web.cert))}
  backend "images" https://127.0.0.1:{images_port}     pinned via {folder}/images.pem

Try:
  curl --cacert {ca_path} https://localhost:{port}/
  curl --cacert {ca_path} https://localhost:{port}/images/cat.png
  curl --cacert {ca_path} -d 'hello' https://localhost:{port}/api/echo
  curl --cacert {ca_path} -sv -o /dev/null https://localhost:{port}/ 2>&1 | grep -E 'SSL|HTTP/'
  gatewayd --pin {folder}/web.pem
""", flush=True)
        return serve(path, config, overrides)
    finally:
        for proc in backends:
            proc.terminate()
        for proc in backends:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(folder, ignore_errors=True)
