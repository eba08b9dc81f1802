"""Reading gatewayd's /metrics in live tests, and the two-backend setup the metric tests
share (a good pinned backend and one whose pin never matches)."""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.support.gateway import Gateway, GatewaySpec, simple_spec

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(gw: Gateway) -> Samples:
    """Every sample of the admin endpoint's /metrics, keyed by (name, sorted labels)."""
    with urllib.request.urlopen(f"{gw.admin_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, metric: str, /, **labels: str) -> float:
    """Sum of the samples of `metric` whose labels include `labels`."""
    total = 0.0
    for (name, sample_labels), sample_value in samples.items():
        if name == metric and labels.items() <= dict(sample_labels).items():
            total += sample_value
    return total


def good_and_evil_spec(tmp_path: Path, pki: Any, good: Any, evil: Any,
                       probe: str) -> GatewaySpec:
    """Listener `front` for shop.test: `/evil/*` goes to a backend whose pin never matches,
    everything else to a good one; both probed once an hour by probe `probe`, so each
    prober fails exactly once on the evil backend (probe failures count in
    gatewayd_backend_failures_total too)."""
    spec = simple_spec(tmp_path, cert=pki.issue(["127.0.0.1", "shop.test"]),
                       backends={"good": good, "evil": evil}, workers=2)
    spec.settings[1]["pinned_public_keys"] = [pki.self_signed(["other"]).spki_pin]
    spec.listeners[0]["host_names"] = ["shop.test"]
    spec.rules[0]["path_rules"] = [{"name": "evil", "paths": ["/evil/*"],
                                    "backend_pool": "evil", "backend_settings": "evil-tls"}]
    spec.extra = f'[[probe]]\nname = "{probe}"\ninterval = 3600\n'
    for settings in spec.settings:
        settings["probe"] = probe
    return spec
