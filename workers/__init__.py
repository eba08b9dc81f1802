"""gatewayd's data plane: the only package that imports gevent."""
