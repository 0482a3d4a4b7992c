"""Turn the suite's runs into the figures table of issue 7, JSON and plots.

Values are medians over repetitions; a ratio is the median of the
per-repetition ratios (securechat / Redis), as the runs of one repetition
are back to back on the same workload. Every target is printed as met / not
met with the numbers it was judged on; a figure that could not be measured
says ``n/a`` and why, never a guess.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

Runs = dict[str, dict[str, list[dict[str, Any]]]]
SYSTEMS = ("securechat", "redis", "naive")
COLORS = {"securechat": "C0", "redis": "C3", "naive": "C2"}


def _med(values: list[Any]) -> float | None:
    vals = [v for v in values if isinstance(v, (int, float))]
    return statistics.median(vals) if vals else None


def value(runs: Runs, key: str, system: str, field: str) -> float | None:
    return _med([r.get(field) for r in runs.get(key, {}).get(system, [])])


def paired_ratio(runs: Runs, key: str, field: str, base: str = "redis") -> float | None:
    sc = runs.get(key, {}).get("securechat", [])
    other = runs.get(key, {}).get(base, [])
    ratios = []
    for a, b in zip(sc, other, strict=False):
        x, y = a.get(field), b.get(field)
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and y:
            ratios.append(x / y)
    return statistics.median(ratios) if ratios else None


def _row(
    label: str,
    unit: str,
    vals: dict[str, float | None],
    ratio: float | None,
    target: str,
    met: bool | None,
    note: str = "",
) -> dict[str, Any]:
    return {
        "figure": label,
        "unit": unit,
        **vals,
        "ratio": ratio,
        "target": target,
        "met": met,
        "note": note,
    }


def _three(runs: Runs, key: str, field: str) -> dict[str, float | None]:
    return {s: value(runs, key, s, field) for s in ("securechat", "redis", "naive")}


def figures(runs: Runs, extra: dict[str, Any]) -> list[dict[str, Any]]:
    """Every row of the table, targets of issue 7 first."""
    rows: list[dict[str, Any]] = []
    direct = (("direct_256", "direct 256 B, N=100"), ("direct_4096", "direct 4 KiB, N=100"))
    for key, label in direct:
        r = paired_ratio(runs, key, "deliveries_per_s")
        rows.append(
            _row(
                f"{label}: deliveries/s",
                "/s",
                _three(runs, key, "deliveries_per_s"),
                r,
                ">= 1.0x Redis",
                None if r is None else r >= 1.0,
            )
        )
    r = paired_ratio(runs, "direct_256", "cpu_us_per_delivery")
    rows.append(
        _row(
            "relay CPU per delivery (direct 256 B)",
            "us",
            _three(runs, "direct_256", "cpu_us_per_delivery"),
            r,
            "<= 1.5x Redis",
            None if r is None else r <= 1.5,
        )
    )
    r = paired_ratio(runs, "group_256", "deliveries_per_s")
    rows.append(
        _row(
            "group fan-out 256 B (10 x 10): deliveries/s",
            "/s",
            _three(runs, "group_256", "deliveries_per_s"),
            r,
            ">= 0.8x Redis",
            None if r is None else r >= 0.8,
        )
    )
    rows += _paced_rows(runs)
    rows += _memory_rows(runs, extra)
    rows += _securechat_rows(runs, extra)
    return rows


def _paced_rows(runs: Runs) -> list[dict[str, Any]]:
    rows = []
    frac = {  # the worst repetition: "100% delivered" must hold in every one
        s: min(
            (
                r["delivered_fraction"]
                for r in runs.get("paced_30000", {}).get(s, [])
                if isinstance(r.get("delivered_fraction"), float)
            ),
            default=None,
        )
        for s in SYSTEMS
    }
    sc_runs = runs.get("paced_30000", {}).get("securechat", [])
    sc_frac = [x.get("delivered_fraction") for x in sc_runs]
    all_delivered = bool(sc_frac) and all(isinstance(f, float) and f >= 1.0 for f in sc_frac)
    frac = {s: None if v is None else 100 * v for s, v in frac.items()}
    rows.append(
        _row(
            "30k/s offered: delivered within the drain (worst rep)",
            "%",
            frac,
            None,
            "100%",
            all_delivered if sc_frac else None,
        )
    )
    p99 = _three(runs, "paced_30000", "p99_ms")
    r = paired_ratio(runs, "paced_30000", "p99_ms")
    met = None
    if p99["securechat"] is not None and p99["redis"] is not None:
        bound = max(2 * p99["redis"], 1.0)
        met = p99["securechat"] <= bound
    rows.append(_row("30k/s offered: p99 latency", "ms", p99, r, "<= max(2x Redis, 1 ms)", met))
    rows.append(
        _row(
            "30k/s offered: p50 latency",
            "ms",
            _three(runs, "paced_30000", "p50_ms"),
            paired_ratio(runs, "paced_30000", "p50_ms"),
            "-",
            None,
        )
    )
    for field, label in (("p50_ms", "p50"), ("p99_ms", "p99")):
        rows.append(
            _row(
                f"2k/s offered: {label} latency",
                "ms",
                _three(runs, "paced_2000", field),
                paired_ratio(runs, "paced_2000", field),
                "-",
                None,
            )
        )
    return rows


def _memory_rows(runs: Runs, extra: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for count in (1000, 5000, 10_000):
        data = extra.get(f"idle_{count}")
        if not data:
            continue
        vals = {s: data.get(s, {}).get("kib_per_connection") for s in SYSTEMS}
        sc, rd = vals["securechat"], vals["redis"]
        ratio = sc / rd if sc is not None and rd else None
        if count == 5000:
            rows.append(
                _row(
                    f"RSS per idle connection at {count}",
                    "KiB",
                    vals,
                    ratio,
                    "<= 8 KiB",
                    None if sc is None else sc <= 8.0,
                )
            )
        else:
            rows.append(_row(f"RSS per idle connection at {count}", "KiB", vals, ratio, "-", None))
        if count == 10_000:
            held: dict[str, float | None] = {
                s: 1.0 if data.get(s, {}).get("held") else 0.0 for s in vals
            }
            rows.append(
                _row(
                    "10,000 connections held (1 = yes)",
                    "",
                    held,
                    None,
                    "held",
                    bool(held["securechat"]),
                )
            )
    peak = _three(runs, "burst_4096", "peak_rss_mib")
    if any(v is not None for v in peak.values()):
        rows.append(
            _row(
                "4 KiB broadcast burst: peak server RSS",
                "MiB",
                peak,
                paired_ratio(runs, "burst_4096", "peak_rss_mib"),
                "< 100 MiB",
                None if peak["securechat"] is None else peak["securechat"] < 100,
            )
        )
        burst = _three(runs, "burst_4096", "delivered_fraction")
        rows.append(
            _row(
                "4 KiB broadcast burst: delivered",
                "%",
                {s: None if v is None else 100 * v for s, v in burst.items()},
                None,
                "-",
                None,
            )
        )
    return rows


def _securechat_rows(runs: Runs, extra: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    none = {"redis": None, "naive": None}
    tput = value(runs, "durable", "securechat", "accept_per_s")
    rows.append(
        _row(
            "durable store, offline recipients: frames/s accepted",
            "/s",
            {"securechat": tput, **none},
            None,
            ">= 20,000",
            None if tput is None else tput >= 20_000,
        )
    )
    p99 = value(runs, "durable_2000", "securechat", "accept_p99_ms")
    rows.append(
        _row(
            "durable store at 2k/s: ack p99",
            "ms",
            {"securechat": p99, **none},
            None,
            "<= 10 ms",
            None if p99 is None else p99 <= 10.0,
        )
    )
    e2e = extra.get("e2e", {})
    box, stream = e2e.get("box_us"), e2e.get("stream_us")
    ratio = stream / box if stream is not None and box else None
    rows.append(
        _row(
            "E2E seal+open 1 KiB (symmetric ratchet step)",
            "us",
            {"securechat": stream, **none},
            ratio,
            f"<= 3x raw box ({box:.1f} us)" if box else "<= 3x raw box",
            None if ratio is None else ratio <= 3.0,
            "ratio vs precomputed nacl Box",
        )
    )
    rec = e2e.get("record_1k_us")
    if rec is not None:
        rows.append(
            _row(
                "E2E seal+open, text padded to a 1 KiB record (the box's size)",
                "us",
                {"securechat": rec, **none},
                rec / box if box else None,
                "-",
                None,
                f"{e2e.get('record_1k_text_bytes')} B of text: same bytes sealed as"
                " the box; 1 KiB of text pads to 2 KiB",
            )
        )
    for sw in e2e.get("state_write", []):
        n = sw["peers"]
        rows.append(
            _row(
                f"client state write per message, {n} busy peer(s)",
                "ms",
                {"securechat": sw["after_us"] / 1000, **none},
                sw["after_us"] / sw["before_us"],
                "-",
                None,
                f"{sw['after_bytes'] / 1024:,.0f} KiB written; whole-state blob before:"
                f" {sw['before_us'] / 1000:,.1f} ms, {sw['before_bytes'] / 1024:,.0f} KiB"
                " (ratio = rows / blob)",
            )
        )
    pp = e2e.get("ping_pong_us")
    rows.append(
        _row(
            "E2E seal+open 1 KiB (with DH ratchet step)",
            "us",
            {"securechat": pp, **none},
            pp / box if pp is not None and box else None,
            "-",
            None,
            "every message answers the previous one",
        )
    )
    hs = extra.get("handshakes", {})
    rate = hs.get("per_s")
    rows.append(
        _row(
            "Noise handshakes completed/s at the relay",
            "/s",
            {"securechat": rate, **none},
            None,
            ">= 5,000",
            None if rate is None else rate >= 5000,
            _handshake_note(hs),
        )
    )
    return rows


def _handshake_note(hs: dict[str, Any]) -> str:
    if not hs:
        return ""
    note = f"relay CPU {hs.get('relay_cpu_us_each') or 0:.0f} us each"
    if hs.get("machine_ceiling_per_s"):
        note += (
            f"; initiators {hs['initiator_cpu_us_each']:.0f} us each; both halves on"
            f" this machine's cores: at most {hs['machine_ceiling_per_s']:,.0f}/s"
        )
    return note


# --- output ------------------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        if 99.0 <= v < 100.0:  # a percentage just short of 100 must not round to 100
            return f"{v:.2f}"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.3g}"
    return str(v)


def _verdict(met: bool | None, target: str) -> str:
    if target == "-":
        return ""
    return "n/a" if met is None else ("met" if met else "NOT MET")


def table(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    head = ["figure", "unit", "securechat", "redis", "naive", "ratio sc/redis", "target", "result"]
    body = [
        [
            r["figure"],
            r["unit"],
            _fmt(r["securechat"]),
            _fmt(r["redis"]),
            _fmt(r["naive"]),
            "-" if r["ratio"] is None else f"{r['ratio']:.2f}x",
            r["target"],
            _verdict(r["met"], r["target"]),
        ]
        for r in rows
    ]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(str(x[i])) for x in [head, *body]) for i in range(len(head))]
    fmt: Callable[[list[str]], str] = lambda row: "  ".join(  # noqa: E731
        str(c).ljust(widths[i]) for i, c in enumerate(row)
    )
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, body)])


def other_cores(runs: Runs) -> float | None:
    """Median CPU (cores) used outside the benchmark during the runs: the machine's noise."""
    return _med([r.get("other_cores") for per in runs.values() for rs in per.values() for r in rs])


def write_json(result: dict[str, Any], directory: Path, stamp: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=1, sort_keys=True, default=str)
    (directory / f"{stamp}.json").write_text(text)
    latest = directory / "latest.json"
    latest.write_text(text)
    return latest


def sweep_points(runs: Runs) -> dict[str, list[tuple[float, dict[str, float | None]]]]:
    """Per system: (offered frames/s, medians of the paced run at that load), sorted."""
    out: dict[str, list[tuple[float, dict[str, float | None]]]] = {}
    for key in runs:
        if not key.startswith("paced_"):
            continue
        rate = float(key.split("_")[1])
        for system in runs[key]:
            fields = ("deliveries_per_s", "p50_ms", "p99_ms", "delivered_fraction", "offered_per_s")
            out.setdefault(system, []).append(
                (rate, {f: value(runs, key, system, f) for f in fields})
            )
    for pts in out.values():
        pts.sort(key=lambda p: p[0])
    return out


def plot(runs: Runs, directory: Path) -> list[Path]:
    """Throughput and latency against offered load, one line per system (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    directory.mkdir(parents=True, exist_ok=True)
    pts = sweep_points(runs)
    styles = {"securechat": "o-", "redis": "s--", "naive": "^:"}
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for system, series in pts.items():
        xs = [p[0] for p in series]
        ys = [p[1]["deliveries_per_s"] or 0 for p in series]
        ax.plot(xs, ys, styles.get(system, "o-"), color=COLORS.get(system), label=system)
    top = max([p[0] for s in pts.values() for p in s], default=1)
    ax.plot([0, top], [0, top], color="grey", lw=0.8, label="offered")
    ax.set_xlabel("offered load (frames/s, 256 B, 100 pairs)")
    ax.set_ylabel("delivered (frames/s, measured window)")
    ax.set_title("Throughput against offered load")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths.append(directory / "throughput.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for system, series in pts.items():
        xs = [p[0] for p in series]
        for field, alpha in (("p99_ms", 1.0), ("p50_ms", 0.5)):
            lat = [p[1][field] for p in series]
            good = [(x, y) for x, y in zip(xs, lat, strict=True) if y]
            if good:
                ax.plot(
                    *zip(*good, strict=True),
                    styles.get(system, "o-"),
                    alpha=alpha,
                    color=COLORS.get(system),
                    label=f"{system} {field[:3]}",
                )
    ax.set_yscale("log")
    ax.set_xlabel("offered load (frames/s, 256 B, 100 pairs)")
    ax.set_ylabel("latency (ms, log scale)")
    ax.set_title("Latency against offered load (p50 faint, p99 solid)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(directory / "latency.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    paths.append(_bars(plt, runs, directory / "unpaced.png"))
    return paths


def _bars(plt: Any, runs: Runs, path: Path) -> Path:
    """Unpaced deliveries/s per workload and system (linear: bar heights must not mislead)."""
    keys = [
        ("direct_256", "direct 256 B"),
        ("direct_4096", "direct 4 KiB"),
        ("group_256", "fan-out 256 B"),
    ]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    width = 0.27
    for i, system in enumerate(SYSTEMS):
        ys = [value(runs, key, system, "deliveries_per_s") or 0 for key, _ in keys]
        xs = [j + (i - 1) * width for j in range(len(keys))]
        bars = ax.bar(xs, ys, width, label=system, color=COLORS[system])
        ax.bar_label(bars, labels=[f"{y / 1000:.0f}k" for y in ys], fontsize=7)
    ax.set_xticks(range(len(keys)), [label for _, label in keys])
    ax.set_ylabel("deliveries/s (median)")
    ax.set_title("Unpaced throughput, 100 pairs / 10 groups of 10")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
