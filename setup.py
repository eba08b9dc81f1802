"""Packaging for gatewayd: the control plane (`gatewayd`) and the data plane
(`gatewayd.workers`, kept in the top-level folder `workers/`)."""

from setuptools import setup

setup(
    name="gatewayd",
    version="0.1.0",
    description="Self-hosted Layer-7 application gateway with end-to-end TLS",
    python_requires=">=3.11",
    packages=["gatewayd", "gatewayd.workers", "gatewayd.workers.http1"],
    package_dir={"gatewayd": "gatewayd", "gatewayd.workers": "workers",
                 "gatewayd.workers.http1": "workers/http1"},
    install_requires=[
        "gevent>=24.2,<27",
        "pyOpenSSL>=25.0,<27",
        "service-identity>=24.1,<27",
        "httptools>=0.6.4,<0.10",
        "cryptography>=44,<51",
        "prometheus-client>=0.20,<0.30",
        "ConfigArgParse>=1.7,<2",
    ],
    extras_require={
        "test": [
            "pytest>=8,<10",
            "trustme>=1.1,<2",
            "ruff>=0.6",
            "mypy>=1.10",
            "hypothesis>=6.100,<7",
            "websockets>=13,<18",
        ],
    },
    entry_points={"console_scripts": ["gatewayd = gatewayd.cli:main"]},
)
