"""gatewayd: a self-hosted Layer-7 application gateway with end-to-end TLS."""

__version__ = "0.1.0"
