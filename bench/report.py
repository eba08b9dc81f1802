"""From raw measurements to figures (median of runs), ratios and bench/RESULTS.md."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Result = dict[str, Any]


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    scenario: str
    value: Callable[[Result], float]
    higher_is_better: bool
    fmt: str = "{:,.0f}"


def _div(a: float, b: float) -> float:
    return a / b if b else math.nan


METRICS = [
    Metric("ka_rps", "keep-alive req/s", "ka", lambda r: r["rps"], True),
    Metric("ka_p50", "keep-alive p50 ms", "ka", lambda r: r["p50_ms"], False, "{:.2f}"),
    Metric("ka_p99", "keep-alive p99 ms", "ka", lambda r: r["p99_ms"], False, "{:.2f}"),
    Metric("ka_cpu_us", "proxy CPU µs / request", "ka",
           lambda r: 1e6 * _div(r["proxy_cpu_s"], r["requests"]), False, "{:.1f}"),
    Metric("ka_cpu_10k", "proxy CPU-s / 10k requests", "ka",
           lambda r: 1e4 * _div(r["proxy_cpu_s"], r["requests"]), False, "{:.3f}"),
    Metric("ka_per_cpu", "keep-alive req / proxy CPU-s", "ka",
           lambda r: _div(r["requests"], r["proxy_cpu_s"]), True),
    Metric("hs_full_ec_cps", "new conn/s, full, ECDSA P-256", "hs_full_ec",
           lambda r: r["cps"], True),
    Metric("hs_full_ec_per_cpu", "full ECDSA handshakes / proxy CPU-s", "hs_full_ec",
           lambda r: _div(r["connections"], r["proxy_cpu_s"]), True),
    Metric("hs_res_ec_cps", "new conn/s, resumed, ECDSA", "hs_res_ec",
           lambda r: r["cps"], True),
    Metric("hs_res_ec_per_cpu", "resumed handshakes / proxy CPU-s", "hs_res_ec",
           lambda r: _div(r["connections"], r["proxy_cpu_s"]), True),
    Metric("hs_full_rsa_cps", "new conn/s, full, RSA-2048", "hs_full_rsa",
           lambda r: r["cps"], True),
    Metric("hs_full_rsa_per_cpu", "full RSA handshakes / proxy CPU-s", "hs_full_rsa",
           lambda r: _div(r["connections"], r["proxy_cpu_s"]), True),
    Metric("mib_s", "1 MiB responses: MiB/s", "mib",
           lambda r: _div(r["requests"], r["duration_s"]), True, "{:,.1f}"),
    Metric("mib_per_cpu", "MiB / proxy CPU-s", "mib",
           lambda r: _div(r["requests"], r["proxy_cpu_s"]), True, "{:,.1f}"),
    Metric("idle_kib", "RSS KiB / idle TLS conn", "idle",
           lambda r: r["kib_per_conn"], False, "{:.1f}"),
]
BY_KEY = {m.key: m for m in METRICS}
PAIRS = [("gatewayd-1w", "nginx-1w"), ("gatewayd-1w", "haproxy-1t"),
         ("gatewayd-2w", "nginx-2w"), ("gatewayd-2w", "haproxy-2t"),
         ("floor-1w", "nginx-1w"), ("gatewayd-1w", "floor-1w"), ("floor-tls", "direct")]
COLUMNS = ["gatewayd-1w", "nginx-1w", "haproxy-1t", "gatewayd-2w", "nginx-2w", "haproxy-2t",
           "direct", "mitmproxy", "floor-1w", "floor-tls", "gatewayd-1w-all-on",
           "gatewayd-1w-all-off"]


def one_line(r: Result) -> str:
    """Progress line for one measurement."""
    cpu = r["proxy_cpu_s"]
    extra = f"cpu {cpu:.2f}s foreign {r['foreign_cpu_pct']:.0f}%"
    if r["scenario"] in ("ka", "ka_i", "mib"):
        return (f"{r['rps']:9.0f} req/s p50 {r['p50_ms']:.2f} p99 {r['p99_ms']:.2f} ms "
                f"{1e6 * _div(cpu, r['requests']):7.1f} µs/req errors {r['errors']} {extra}")
    if r["scenario"].startswith("hs_"):
        return (f"{r['cps']:9.0f} conn/s {1e6 * _div(cpu, r['connections']):7.1f} µs/conn "
                f"resp {r['bytes_per_conn_min']}-{r['bytes_per_conn_max']} B {extra}")
    return (f"{r['connections']}/{r['wanted']} conns in {r['open_s']:.1f}s "
            f"{r['kib_per_conn']:.1f} KiB/conn {extra}")


def values(results: list[Result], metric: Metric, config: str) -> dict[int, float]:
    """run → value of *metric* for *config*."""
    return {r["run"]: metric.value(r) for r in results
            if r["config"] == config and r["scenario"] == metric.scenario}


def median(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return statistics.median(xs) if xs else math.nan


def figure(results: list[Result], metric: Metric, config: str) -> float:
    return median(list(values(results, metric, config).values()))


def ratio(results: list[Result], metric: Metric, a: str, b: str) -> float:
    """Median over runs of a/b, each ratio taken within one run."""
    va, vb = values(results, metric, a), values(results, metric, b)
    return median([_div(va[run], vb[run]) for run in va if run in vb])


def rounds(results: list[Result], metric: Metric, config: str) -> dict[tuple[int, int], float]:
    """(run, round) → value of *metric* for *config* in the interleaved measurement of
    its scenario (scenario + "_i": "ka_i", "hs_full_ec_i"...; see run.Bench.interleaved)."""
    scenario = metric.scenario + "_i"
    return {(r["run"], r["round"]): metric.value(r) for r in results
            if r["config"] == config and r["scenario"] == scenario}


def round_ratios(results: list[Result], metric: Metric, a: str, b: str) -> list[float]:
    """a/b for each round in which both were measured, seconds apart."""
    va, vb = rounds(results, metric, a), rounds(results, metric, b)
    return [_div(va[k], vb[k]) for k in sorted(va) if k in vb]


def target_figure(results: list[Result], metric: Metric, config: str) -> float:
    """A figure as the targets use it: the median of the interleaved rounds when there
    are any, else the median of the runs."""
    per_round = rounds(results, metric, config)
    return median(list(per_round.values())) if per_round else figure(results, metric, config)


def target_ratio(results: list[Result], metric: Metric, a: str, b: str) -> tuple[float, str]:
    """The ratio the targets use, and where it comes from: the median of the interleaved
    rounds when there are any, else the median of the per-run ratios."""
    per_round = round_ratios(results, metric, a, b)
    if per_round:
        return median(per_round), f"median of {len(per_round)} interleaved rounds"
    return ratio(results, metric, a, b), "median of runs"


def _fmt(metric: Metric, x: float) -> str:
    return "-" if math.isnan(x) else metric.fmt.format(x)


def _r(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.2f}x"


def _target_rows(results: list[Result]) -> list[str]:
    rows = []

    def row(name: str, got: float, ok: bool | None, goal: str) -> None:
        verdict = "n/a" if ok is None or math.isnan(got) else ("**met**" if ok else "missed")
        # three decimals where two would round a miss up to the goal ("0.90x ... missed")
        shown = _r(got) if math.isnan(got) else f"{got:.3f}x"
        rows.append(f"| {name} | {goal} | {shown} | {verdict} |")

    def reference(what: str, key: str, a: str, b: str, about: str) -> None:
        """A ratio shown beside the targets, with no goal of its own: where the stack's
        floors stand against nginx, or gatewayd against them (left out if not measured)."""
        x, source = target_ratio(results, BY_KEY[key], a, b)
        if not math.isnan(x):
            row(f"... reference: {what}, {a} / {b} ({about}; {source})", x, None, "-")

    per_cpu, source = target_ratio(results, BY_KEY["ka_per_cpu"], "gatewayd-1w", "nginx-1w")
    row(f"keep-alive req per CPU-s vs nginx (1 worker; {source})", per_cpu, per_cpu >= 0.35,
        "≥ 0.35x (then 0.5x)")
    # The contract's default config logs every request as JSON: the issue's "every
    # feature on" (nginx in the bench logs nothing, so this is the harder comparison).
    on_cpu, source = target_ratio(results, BY_KEY["ka_per_cpu"], "gatewayd-1w-all-on", "nginx-1w")
    row(f"... with the JSON access log on, as by default (1 worker; {source})", on_cpu,
        on_cpu >= 0.35, "≥ 0.35x (then 0.5x)")
    reference("keep-alive req per CPU-s", "ka_per_cpu", "floor-1w", "nginx-1w",
              "the lean gevent + pyOpenSSL + httptools forwarder the targets were derived "
              "from (no routing, metrics or log)")
    reference("keep-alive req per CPU-s", "ka_per_cpu", "gatewayd-1w-all-on", "floor-1w",
              "gatewayd with everything on against that forwarder")
    us = target_figure(results, BY_KEY["ka_cpu_us"], "gatewayd-1w")
    # 57 µs is the 0.35x of nginx's 20 µs on the machine it was measured on;
    # nginx's own figure from this run says how this machine compares
    peer = target_figure(results, BY_KEY["ka_cpu_us"], "nginx-1w")
    rows.append(f"| keep-alive CPU per request, gatewayd 1 worker (nginx-1w here: "
                f"{_fmt(BY_KEY['ka_cpu_us'], peer)} µs) | ≤ 57 µs | "
                f"{_fmt(BY_KEY['ka_cpu_us'], us)}{'' if math.isnan(us) else ' µs'} | "
                f"{'n/a' if math.isnan(us) else ('**met**' if us <= 57 else 'missed')} |")
    for key, name in (("hs_full_ec_cps", "full handshakes/s ECDSA vs nginx"),
                      ("hs_full_rsa_cps", "full handshakes/s RSA vs nginx"),
                      ("hs_full_ec_per_cpu", "full ECDSA handshakes per CPU-s vs nginx"),
                      ("hs_full_rsa_per_cpu", "full RSA handshakes per CPU-s vs nginx")):
        x, source = target_ratio(results, BY_KEY[key], "gatewayd-1w", "nginx-1w")
        row(f"{name} (1 worker; {source})", x, x >= 0.9, "≥ 0.9x")
    for key, name in (("hs_full_ec_per_cpu", "full ECDSA"), ("hs_full_rsa_per_cpu", "full RSA")):
        reference(f"{name} handshakes per CPU-s", key, "floor-tls", "direct",
                  "a bare gevent + pyOpenSSL server against nginx serving the same")
    x = ratio(results, BY_KEY["mib_per_cpu"], "gatewayd-1w", "nginx-1w")
    row("1 MiB responses: MiB per CPU-s vs nginx (1 worker)", x, x >= 1.0, "≥ 1.0x")
    for cfg in ("gatewayd-1w", "gatewayd-2w"):
        kib = figure(results, BY_KEY["idle_kib"], cfg)
        rows.append(f"| RSS per idle TLS client connection, {cfg} | ≤ 50 KiB | "
                    f"{_fmt(BY_KEY['idle_kib'], kib)}{'' if math.isnan(kib) else ' KiB'} | "
                    f"{'n/a' if math.isnan(kib) else ('**met**' if kib <= 50 else 'missed')} |")
    x = ratio(results, BY_KEY["ka_rps"], "gatewayd-1w", "mitmproxy")
    row("keep-alive req/s vs mitmproxy (reverse mode, 1 core)", x, x >= 10, "≥ 10x")
    return rows


def interleaved_section(results: list[Result]) -> list[str]:
    """Each config's spread over the interleaved rounds, and the per-round ratios."""
    configs = [c for c in COLUMNS if rounds(results, BY_KEY["ka_rps"], c)]
    if not configs:
        return []
    rps, cpu, per_cpu = BY_KEY["ka_rps"], BY_KEY["ka_cpu_us"], BY_KEY["ka_per_cpu"]
    lines = [
        "## Keep-alive, interleaved (the figures the keep-alive targets use)",
        "",
        "Started side by side, each measured in turn, the order rotating every round; "
        "two measurements of one round are seconds apart, so they share the machine's "
        "drift.  Ratios are per round (same round), then the median.",
        "",
        "| config | rounds | req/s (median) | CPU µs / request: median | min | max |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for c in configs:
        us = list(rounds(results, cpu, c).values())
        rate = median(list(rounds(results, rps, c).values()))
        lines.append(f"| {c} | {len(us)} | {_fmt(rps, rate)} | {_fmt(cpu, median(us))} | "
                     f"{_fmt(cpu, min(us))} | {_fmt(cpu, max(us))} |")
    lines += ["", "| ratio (per round) | median | min | max | every round |",
              "|---|---:|---:|---:|---|"]
    for label, metric, a, b in (
            ("gatewayd-1w / nginx-1w, req per CPU-s ↑", per_cpu, "gatewayd-1w", "nginx-1w"),
            ("all-on / nginx-1w, req per CPU-s ↑", per_cpu, "gatewayd-1w-all-on", "nginx-1w"),
            ("all-on / all-off, CPU per request ↓", cpu,
             "gatewayd-1w-all-on", "gatewayd-1w-all-off"),
            ("all-on / gatewayd-1w (the access log alone), CPU per request ↓", cpu,
             "gatewayd-1w-all-on", "gatewayd-1w"),
            ("gatewayd-1w / all-off (the metrics alone), CPU per request ↓", cpu,
             "gatewayd-1w", "gatewayd-1w-all-off"),
            ("floor-1w / nginx-1w, req per CPU-s ↑", per_cpu, "floor-1w", "nginx-1w"),
            ("gatewayd-1w / floor-1w, req per CPU-s ↑", per_cpu, "gatewayd-1w", "floor-1w"),
            ("all-on / floor-1w, req per CPU-s ↑", per_cpu, "gatewayd-1w-all-on",
             "floor-1w")):
        lines += _ratio_line(label, round_ratios(results, metric, a, b))
    return [*lines, "", *_interleaved_handshakes(results)]


def _ratio_line(label: str, xs: list[float]) -> list[str]:
    """A per-round ratio's row: median, min, max and every round (none without rounds)."""
    if not xs:
        return []
    return [f"| {label} | {_r(median(xs))} | {_r(min(xs))} | {_r(max(xs))} | "
            + " ".join(f"{x:.2f}" for x in xs) + " |"]


def _interleaved_handshakes(results: list[Result]) -> list[str]:
    """The same for full handshakes (scenarios hs_full_ec_i, hs_full_rsa_i)."""
    lines: list[str] = []
    for key, name in (("ec", "ECDSA P-256"), ("rsa", "RSA-2048")):
        per_cpu = BY_KEY[f"hs_full_{key}_per_cpu"]
        configs = [c for c in COLUMNS if rounds(results, per_cpu, c)]
        if not configs:
            continue
        lines += [
            f"## Full {name} handshakes, interleaved (the figures the handshake targets use)",
            "",
            "| config | rounds | conn/s (median) | CPU µs / connection: median | min | max |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        cps = BY_KEY[f"hs_full_{key}_cps"]
        for c in configs:
            us = [1e6 / x for x in rounds(results, per_cpu, c).values() if x]
            if not us:  # no connection in any round (every measurement failed)
                continue
            rate = median(list(rounds(results, cps, c).values()))
            lines.append(f"| {c} | {len(us)} | {_fmt(cps, rate)} | {median(us):.1f} | "
                         f"{min(us):.1f} | {max(us):.1f} |")
        lines += ["", "| ratio (per round) | median | min | max | every round |",
                  "|---|---:|---:|---:|---|"]
        for a, b in (("gatewayd-1w", "nginx-1w"), ("floor-tls", "direct"),
                     ("gatewayd-1w", "floor-tls")):
            lines += _ratio_line(f"{a} / {b}, handshakes per CPU-s ↑",
                                 round_ratios(results, per_cpu, a, b))
        lines.append("")
    return lines


def cost_section(results: list[Result]) -> list[str]:
    on, off = "gatewayd-1w-all-on", "gatewayd-1w-all-off"
    rps, cpu = BY_KEY["ka_rps"], BY_KEY["ka_cpu_us"]
    if math.isnan(target_figure(results, rps, on)) or math.isnan(target_figure(results, rps, off)):
        return []
    rps_ratio, how = target_ratio(results, rps, on, off)
    d_rps = 1 - rps_ratio
    d_cpu = target_ratio(results, cpu, on, off)[0] - 1
    lines = [
        "## Cost of metrics and access logging (gatewayd, 1 worker, keep-alive /small)",
        "",
        "| variant | req/s | CPU µs / request |",
        "|---|---:|---:|",
    ]
    for name, cfg in (("everything on: access_log to a file (json), metrics on", on),
                      ("access_log = \"off\", GATEWAYD_METRICS=off", off),
                      ("gatewayd-1w: access_log = \"off\", metrics on",
                       "gatewayd-1w")):
        lines.append(f"| {name} | {_fmt(rps, target_figure(results, rps, cfg))} | "
                     f"{_fmt(cpu, target_figure(results, cpu, cfg))} |")
    lines += [
        "",
        f"Cost of logging + metrics ({how}): **{100 * d_rps:.1f} % fewer "
        f"req/s, {100 * d_cpu:+.1f} % CPU per request** (target ≤ 10 %: "
        f"{'met' if max(d_rps, d_cpu) <= 0.10 else 'missed'}).",
        "",
    ]
    return lines


def markdown(meta: dict[str, Any], results: list[Result]) -> str:
    configs = [c for c in COLUMNS if any(r["config"] == c for r in results)]
    main = [c for c in configs if not c.startswith("gatewayd-1w-all")]
    runs = meta["settings"]["runs"]
    s = meta["settings"]
    lines = [
        "# gatewayd benchmark results",
        "",
        ("QUICK run (1 run, short durations) - not the reference figures. "
         if meta["quick"] else "") +
        f"Measured {meta['when']}, {runs} run(s), median shown; took "
        f"{meta['elapsed_s'] / 60:.1f} min.  Regenerate with `make bench` "
        "(`.venv/bin/python bench/run.py [--quick]`).  How it is measured: bench/README.md.",
        "",
        "## Results (absolute)",
        "",
        "| metric | " + " | ".join(main) + " |",
        "|---|" + "---:|" * len(main),
    ]
    for m in METRICS:
        if not any(values(results, m, c) for c in main):
            continue
        cells = [_fmt(m, figure(results, m, c)) for c in main]
        lines.append(f"| {m.label} {'↑' if m.higher_is_better else '↓'} | "
                     + " | ".join(cells) + " |")
    pairs = [p for p in PAIRS if p[0] in configs and p[1] in configs]
    lines += [
        "",
        "↑ higher is better, ↓ lower is better.  *Proxy CPU* = utime+stime of the proxy's "
        "master and all its children/threads from /proc, before/after the measurement.",
        "",
        "## Ratios gatewayd / nginx and gatewayd / HAProxy (same run, median of runs)",
        "",
        "| metric | " + " | ".join(f"{a} / {b}" for a, b in pairs) + " |",
        "|---|" + "---:|" * len(pairs),
    ]
    for m in METRICS:
        cells = [_r(ratio(results, m, a, b)) for a, b in pairs]
        if all(c == "-" for c in cells):
            continue
        lines.append(f"| {m.label} {'↑' if m.higher_is_better else '↓'} | "
                     + " | ".join(cells) + " |")
    lines += ["", "## Targets", "", "| target | goal | gatewayd | verdict |", "|---|---|---:|---|"]
    lines += _target_rows(results)
    lines += ["", *interleaved_section(results), *cost_section(results)]
    foreign = {c: max((r["foreign_cpu_pct"] for r in results if r["config"] == c),
                      default=0.0) for c in configs}
    tls: dict[str, set[str]] = {}
    for r in results:
        tls.setdefault(str(r["tls"]), set()).add(str(r["config"]))
    lines += [
        "## Conditions",
        "",
        "- Foreign CPU (other programs on the machine during a measurement, % of both "
        "cores), worst per config: "
        + ", ".join(f"{c} {v:.0f} %" for c, v in foreign.items())
        + ".  Each measurement first waits (≤ 5 s, ≤ 60 s in all) for the machine to be "
        "< 10 % busy.",
        "- TLS between the load generators and each server (they offer browsers' TLS 1.3 "
        "suite order, bench/client-openssl.cnf): "
        + "; ".join(f"{suite}: {', '.join(sorted(cs))}" for suite, cs in sorted(tls.items()))
        + ".",
        f"- Durations: keep-alive {s['ka_seconds']} s x {s['ka_connections']} connections "
        f"(after a 1 s warm-up); new connections {s['hs_seconds']} s x {s['hs_clients']} "
        f"parallel `openssl s_time`; 1 MiB {s['mib_seconds']} s x {s['mib_connections']} "
        f"connections; idle {s['idle_connections']:,} connections "
        f"({s['idle_runs']} run — RSS is not a timing).",
        f"- CPU layout (`taskset -c`): load generators on CPU {meta['layout']['load']}, "
        f"backend on CPU {meta['layout']['backend']}; a 1-worker/1-thread proxy (and mitmproxy "
        f"and the `direct` nginx) on CPU {meta['layout']['proxy']['1']}; a 2-worker/2-thread "
        f"proxy on CPUs {meta['layout']['proxy']['2']} — it shares CPU 1 with the load "
        "generator and the backend, so 2-worker absolute rates are a compromise; compare "
        "them by CPU per request.",
        *[f"- Note: {n}" for n in meta["notes"]],
        "",
        "## Machine and versions",
        "",
        *[f"- {k}: {v}" for k, v in meta["versions"].items()],
        "",
        f"Command: `{meta['command']}`",
        "",
    ]
    return "\n".join(lines)
