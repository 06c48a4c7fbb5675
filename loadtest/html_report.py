"""A self-contained HTML page for a report: tables and inline SVG charts, no scripts, no CDN."""

from __future__ import annotations

import html
import json
from typing import Any

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf")


def _speed(report: dict[str, Any]) -> str:
    """The machine's speed either side of the run, as the report's heading says it."""
    speed = report["machine"].get("cpu_speed_ms")
    if not speed:
        return ""
    return f" (sum(range(100000)) in {speed['before']} ms before the run, {speed['after']} after)"


def _esc(v: Any) -> str:
    return html.escape(str(v))


def _num(v: float) -> str:
    """Axis label: thousands separated, a few significant digits for small values."""
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def line_chart(
    title: str, xs: list[float], series: dict[str, list[float | None]], unit: str = ""
) -> str:
    """An SVG line chart; ``None`` values break the line."""
    w, h, left, bottom, top, right = 780, 220, 60, 30, 24, 200
    pts = [v for vals in series.values() for v in vals if v is not None]
    if not xs or not pts:
        return f"<h3>{_esc(title)}</h3><p>no data</p>"
    ymax = max(pts) or 1.0
    xmin, xmax = min(xs), max(xs)
    xspan = (xmax - xmin) or 1.0

    def px(x: float) -> float:
        return left + (x - xmin) / xspan * (w - left - right)

    def py(y: float) -> float:
        return top + (1 - y / ymax) * (h - top - bottom)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img">',
        f'<text x="{left}" y="14" font-size="13" font-weight="bold">{_esc(title)}</text>',
    ]
    for i in range(5):
        y = ymax * i / 4
        out.append(
            f'<line x1="{left}" x2="{w - right}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="#ddd"/>'
        )
        out.append(
            f'<text x="{left - 4}" y="{py(y) + 4:.1f}" font-size="10" text-anchor="end">'
            f"{_num(y)}{_esc(unit)}</text>"
        )
    for i in range(6):
        x = xmin + xspan * i / 5
        out.append(
            f'<text x="{px(x):.1f}" y="{h - 10}" font-size="10" '
            f'text-anchor="middle">{x:.3g}s</text>'
        )
    for n, (name, vals) in enumerate(series.items()):
        color = PALETTE[n % len(PALETTE)]
        segs: list[list[str]] = [[]]
        for xv, yv in zip(xs, vals, strict=False):
            if yv is None:
                segs.append([])
            else:
                segs[-1].append(f"{px(xv):.1f},{py(yv):.1f}")
        for seg in segs:
            if len(seg) == 1:
                cx, cy = seg[0].split(",")
                out.append(f'<circle cx="{cx}" cy="{cy}" r="2" fill="{color}"/>')
            elif seg:
                out.append(
                    f'<polyline fill="none" stroke="{color}" stroke-width="1.6" '
                    f'points="{" ".join(seg)}"/>'
                )
        ly = top + 14 * n + 8
        out.append(
            f'<rect x="{w - right + 8}" y="{ly - 8}" width="10" height="10" fill="{color}"/>'
        )
        out.append(f'<text x="{w - right + 22}" y="{ly + 1}" font-size="11">{_esc(name)}</text>')
    out.append("</svg>")
    return "".join(out)


def _table(rows: list[list[Any]], head: list[str]) -> str:
    th = "".join(f"<th>{_esc(c)}</th>" for c in head)
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _scenario_rows(report: dict[str, Any], label: str) -> list[list[Any]]:
    rows = []
    for name, s in report["scenarios"].items():
        h = s["headline"]
        lat = h["steady_latency_ms"]
        rows.append(
            [
                label,
                name,
                s["clients"],
                f"{h['per_s']:,.1f} {h['counter']}/s",
                lat.get("p50", "-"),
                lat.get("p99", "-"),
                lat.get("max", "-"),
                sum(s["errors"].values()),
                "ok" if s["checks"].get("ok") else "FAILED",
            ]
        )
    return rows


def render(report: dict[str, Any]) -> str:
    """The whole page."""
    ts = report.get("timeseries", [])
    run_rows = [r for r in ts if r.get("phase") in ("run", "drain")] or ts
    xs = [float(r["t"]) for r in run_rows]
    charts = []
    for name, s in report["scenarios"].items():
        counters = [k for k in (s["headline"]["counter"], "sent", "acked") if k in s["counts"]]
        counters = list(dict.fromkeys(counters))
        series: dict[str, list[float | None]] = {
            c: [float(r["scenarios"].get(name, {}).get("counts", {}).get(c, 0)) for r in run_rows]
            for c in counters
        }
        charts.append(line_chart(f"{name}: throughput per second", xs, series, "/s"))
        lat = s["headline"]["latency"]
        lseries: dict[str, list[float | None]] = {}
        for q in ("p50", "p99", "max"):
            lseries[f"{lat} {q}"] = [
                r["scenarios"].get(name, {}).get("latency_ms", {}).get(lat, {}).get(q)
                for r in run_rows
            ]
        charts.append(line_chart(f"{name}: {lat} latency", xs, lseries, "ms"))
    all_x = [float(r["t"]) for r in ts]
    charts.append(
        line_chart(
            "open connections", all_x, {"connections": [float(r.get("connections", 0)) for r in ts]}
        )
    )
    err_codes = sorted({c for r in ts for c in r.get("errors", {})})
    if err_codes:
        charts.append(
            line_chart(
                "errors per second",
                all_x,
                {c: [float(r.get("errors", {}).get(c, 0)) for r in ts] for c in err_codes},
            )
        )
    if any("server_rss_kb" in r for r in ts):
        charts.append(
            line_chart(
                "server RSS",
                all_x,
                {
                    "RSS MB": [
                        (r["server_rss_kb"] / 1024 if "server_rss_kb" in r else None) for r in ts
                    ]
                },
                "MB",
            )
        )
        charts.append(
            line_chart(
                "CPU (share of one core)",
                all_x,
                {
                    "server": [r.get("server_cpu") for r in ts],
                    "generator (max worker)": [r.get("generator_cpu_max") for r in ts],
                },
            )
        )
    rows = _scenario_rows(report, report["label"])
    for kind, b in report.get("baselines", {}).items():
        rows += _scenario_rows(b, kind)
    ratio_rows = [
        [
            kind,
            name,
            r["throughput_ratio"],
            r["latency_ratio"].get("p50"),
            r["latency_ratio"].get("p99"),
        ]
        for kind, ratios in report.get("ratios", {}).items()
        for name, r in ratios.items()
    ]
    gen = report["generator"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>talkbridge-load report</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:960px}"
        "table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f4f4f4}"
        ".bad{color:#b00;font-weight:bold}pre{background:#f7f7f7;padding:1em;overflow:auto}</style></head><body>",
        f"<h1>talkbridge-load: {_esc(report['label'])} ({_esc(report['started_at'])})</h1>",
        f"<p>target {_esc(report['target']['url'])} over {_esc(report['target']['transport'])}, "
        f"{report['config']['workers']} worker(s), {report['config']['duration_s']} s run, "
        f"{report['machine']['cpus']} CPUs{_speed(report)}. Overall: "
        + ("ok" if report["ok"] else "<span class='bad'>FAILED</span>")
        + "</p>",
        _table(
            rows,
            [
                "server",
                "scenario",
                "clients",
                "rate",
                "p50 ms",
                "p99 ms",
                "max ms",
                "errors",
                "checks",
            ],
        ),
    ]
    if ratio_rows:
        parts.append("<h2>Ratios to baselines (target / baseline)</h2>")
        parts.append(
            _table(ratio_rows, ["baseline", "scenario", "throughput", "p50 latency", "p99 latency"])
        )
    if gen["bottleneck"]:
        parts.append(
            "<p class='bad'>Generator limited: " + _esc("; ".join(gen["reasons"])) + "</p>"
        )
    if gen.get("disturbed"):
        parts.append(
            "<p class='bad'>Machine shared: " + _esc("; ".join(gen["disturbed"])) + "</p>"
        )
    srv = report.get("server")
    if srv:
        parts.append(
            "<h2>Server process</h2>" + _table([[k, v] for k, v in srv.items()], ["", "value"])
        )
    parts.extend(charts)
    if report.get("errors"):
        parts.append(
            "<h2>Errors by code</h2>"
            + _table([[k, v] for k, v in report["errors"].items()], ["code", "count"])
        )
    for name, s in report["scenarios"].items():
        parts.append(f"<h2>{_esc(name)}</h2>")
        parts.append(_table([[k, v] for k, v in s["checks"].items()], ["check", "value"]))
        parts.append(
            _table(
                [
                    [k, *[v.get(q, "-") for q in ("count", "p50", "p90", "p99", "p999", "max")]]
                    for k, v in s["latency_ms"].items()
                ],
                ["latency", "count", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms"],
            )
        )
        parts.append(
            _table(
                [[k, v, s["rates"].get(k, "")] for k, v in s["counts"].items()],
                ["counter", "total", "per s (run)"],
            )
        )
    hot = (report.get("profile") or {}).get("hot")
    if hot:
        parts.append(
            f"<h2>Where the server's CPU went ({hot.get('working_samples', hot['samples'])} "
            f"working samples; waits left out: {hot.get('waiting_share', 0) * 100:.0f}%)</h2>"
        )
        parts.append(
            _table([[h["function"], h["samples"], f"{h['share'] * 100:.1f}%"] for h in hot["self"]],
                   ["function (self time)", "samples", "share"])
        )
        parts.append(
            _table([[h["function"], h["samples"], f"{h['share'] * 100:.1f}%"]
                    for h in hot["inclusive"]],
                   ["function (inclusive)", "samples", "share"])
        )
        parts.append("<p>Flame graph: flame.svg next to this page.</p>")
    if report.get("failures"):
        parts.append("<h2>Failures</h2><pre>" + _esc("\n\n".join(report["failures"])) + "</pre>")
    summary = {k: v for k, v in report.items() if k not in ("timeseries", "baselines")}
    parts.append(
        "<details><summary>report JSON (without time series)</summary><pre>"
        + _esc(json.dumps(summary, indent=1))
        + "</pre></details></body></html>"
    )
    return "".join(parts)
