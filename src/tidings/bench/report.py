"""Results of ``tidings bench direct``: merging the load generators', validity, the table."""

from __future__ import annotations

from typing import Any

from tidings.bench.hist import Histogram

VALID_RATE_FRACTION = 0.99
MAX_CLIENT_CPU_PCT = 90.0
COUNTERS = (
    *("sent", "send_failed", "answered", "errored", "acked_in_window", "delivered"),
    *("delivered_in_window", "lost", "unanswered", "unconfirmed", "redelivered"),
    *("dup_stored", "reordered", "foreign", "acks_out"),
)


def _ms(us: float) -> float:
    return round(us / 1000, 3)


def _add(into: dict[str, int], more: dict[str, int]) -> None:
    for k, v in more.items():
        into[k] = into.get(k, 0) + v


def summarise(
    rate: float, duration: float, results: list[dict[str, Any]], server_cpu_s: float | None
) -> dict[str, Any]:
    """One row: the load generators' results merged, with ``valid`` and its ``reasons``."""
    e2e = Histogram()
    ack = Histogram()
    totals: dict[str, int] = {}
    errors: dict[str, int] = {}
    closes: dict[str, int] = {}
    for r in results:
        e2e.merge(Histogram.from_dict(r["e2e"]))
        ack.merge(Histogram.from_dict(r["ack"]))
        for name in COUNTERS:
            totals[name] = totals.get(name, 0) + int(r[name])
        _add(errors, r["errors"])
        _add(closes, r["closes"])
    cpu = [float(r["cpu_pct"]) for r in results]
    per_second = [sum(col) for col in zip(*(r["per_second"] for r in results), strict=True)]
    per_second_max = [
        max(col) for col in zip(*(r["per_second_max_us"] for r in results), strict=True)
    ]
    achieved = totals["delivered_in_window"] / duration
    row: dict[str, Any] = {
        "offered_per_s": rate,
        "msgs_per_s": round(achieved, 1),
        "acked_per_s": round(totals["acked_in_window"] / duration, 1),
        "p50_ms": _ms(e2e.percentile(50)),
        "p90_ms": _ms(e2e.percentile(90)),
        "p99_ms": _ms(e2e.percentile(99)),
        "p999_ms": _ms(e2e.percentile(99.9)),
        "max_ms": _ms(e2e.max),
        "mean_ms": _ms(e2e.mean),
        "ack_p50_ms": _ms(ack.percentile(50)),
        "ack_p99_ms": _ms(ack.percentile(99)),
        "ack_p999_ms": _ms(ack.percentile(99.9)),
        "samples": e2e.count,
        "lost": totals["lost"],
        "duplicated": totals["dup_stored"] + totals["redelivered"],
        "duplicated_stored": totals["dup_stored"],
        "redelivered": totals["redelivered"],
        "reordered": totals["reordered"],
        "server_cpu_s": None if server_cpu_s is None else round(server_cpu_s, 3),
        "server_cpu_pct": None if server_cpu_s is None else round(100 * server_cpu_s / duration, 1),
        "server_cpu_us_per_msg": None
        if server_cpu_s is None or not totals["delivered_in_window"]
        else round(server_cpu_s * 1e6 / totals["delivered_in_window"], 1),
        "client_cpu_pct": max(cpu) if cpu else 0.0,
        "client_cpu_pct_mean": round(sum(cpu) / len(cpu), 1) if cpu else 0.0,
        "client_cpu_pct_per_proc": cpu,
        "max_send_lag_ms": max(float(r["max_send_lag_ms"]) for r in results),
        "timeline": {
            "delivered_per_s": per_second,
            "max_latency_ms": [_ms(v) for v in per_second_max],
        },
        "counts": totals,
        "errors": errors,
        "closes": closes,
        "histograms_us": {"e2e": e2e.to_dict(), "ack": ack.to_dict()},
    }
    reasons = []
    if achieved < VALID_RATE_FRACTION * rate:
        reasons.append(f"achieved {achieved:.0f}/s < 99% of offered {rate:g}/s")
    if row["client_cpu_pct"] > MAX_CLIENT_CPU_PCT:
        reasons.append(f"client CPU {row['client_cpu_pct']}% > {MAX_CLIENT_CPU_PCT:g}%")
    for name in ("lost", "duplicated", "reordered"):
        if row[name]:
            reasons.append(f"{row[name]} {name}")
    if errors:
        reasons.append(f"error answers {errors}")
    if closes:
        reasons.append(f"connections closed {closes}")
    if totals["send_failed"] or totals["unanswered"]:
        reasons.append(f"{totals['send_failed']} failed, {totals['unanswered']} unanswered sends")
    row["valid"] = not reasons
    row["reasons"] = reasons
    return row


COLUMNS = (
    ("offered/s", "offered_per_s", "{:.0f}"),
    ("achieved/s", "msgs_per_s", "{:.0f}"),
    ("p50 ms", "p50_ms", "{:.2f}"),
    ("p99 ms", "p99_ms", "{:.2f}"),
    ("p99.9 ms", "p999_ms", "{:.2f}"),
    ("max ms", "max_ms", "{:.1f}"),
    ("ack p99", "ack_p99_ms", "{:.2f}"),
    ("lost", "lost", "{}"),
    ("dup", "duplicated", "{}"),
    ("reord", "reordered", "{}"),
    ("srv us/msg", "server_cpu_us_per_msg", "{:.1f}"),
    ("srv cpu%", "server_cpu_pct", "{:.0f}"),
    ("loop cpu%", "server_loop_cpu_pct", "{:.0f}"),
    ("sys cpu%", "server_sys_cpu_pct", "{:.0f}"),
    ("cli cpu%", "client_cpu_pct", "{:.0f}"),
    ("other cpu%", "other_cpu_pct", "{:.0f}"),
    ("queue max", "server_pending_writes_max", "{}"),
    ("wal MB", "server_wal_bytes", "{:.0f}"),
)


def table_header() -> str:
    return "  ".join(f"{title:>10}" for title, _, _ in COLUMNS) + "  status"


def table_row(row: dict[str, Any]) -> str:
    cells = []
    for _, key, fmt in COLUMNS:
        value = row.get(key)
        if value is not None and key.endswith("_bytes"):
            value = value / 1e6
        cells.append(f"{'-' if value is None else fmt.format(value):>10}")
    status = "ok" if row["valid"] else "INVALID: " + "; ".join(row["reasons"])
    return "  ".join(cells) + "  " + status


P99_BOUND_MS = 20.0  # the sweep's latency bound: the highest rate that keeps p99 under it


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """What a sweep shows: the most it delivered, the highest valid rate, and the
    highest valid rate whose p99 stayed under P99_BOUND_MS."""
    valid = [r for r in runs if r["valid"]]
    best = max(valid, key=lambda r: r["msgs_per_s"], default=None)
    fast = [r for r in valid if r["p99_ms"] is not None and r["p99_ms"] < P99_BOUND_MS]
    bounded = max(fast, key=lambda r: r["offered_per_s"], default=None)
    return {
        "max_valid_offered_per_s": best["offered_per_s"] if best else None,
        "max_valid_msgs_per_s": best["msgs_per_s"] if best else None,
        "max_msgs_per_s": max((r["msgs_per_s"] for r in runs), default=None),
        "p99_bound_ms": P99_BOUND_MS,
        "max_rate_p99_under_bound": bounded["offered_per_s"] if bounded else None,
        "server_cpu_us_per_msg_at_that_rate": bounded["server_cpu_us_per_msg"] if bounded else None,
        "p99_ms_by_rate": {f"{r['offered_per_s']:g}": r["p99_ms"] for r in runs},
        "all_valid": bool(runs) and len(valid) == len(runs),
    }


_COMPARED = (
    ("msgs/s", "msgs_per_s", "{:.0f}"),
    ("p50 ms", "p50_ms", "{:.2f}"),
    ("p99 ms", "p99_ms", "{:.2f}"),
    ("srv us/msg", "server_cpu_us_per_msg", "{:.1f}"),
    ("pg us/msg", "postgres_cpu_us_per_msg", "{:.1f}"),
    ("redis us/msg", "redis_cpu_us_per_msg", "{:.1f}"),
    ("srv cpu%", "server_cpu_pct", "{:.0f}"),
    ("pg cpu%", "postgres_cpu_pct", "{:.0f}"),
    ("redis cpu%", "redis_cpu_pct", "{:.0f}"),
    ("cli cpu%", "client_cpu_pct", "{:.0f}"),
)


def summary_line(label: str, s: dict[str, Any]) -> str:
    most = s.get("max_msgs_per_s")
    bound = s.get("max_rate_p99_under_bound")
    most_text = "-" if most is None else f"{most:,.0f}"
    bound_text = "none" if bound is None else f"{bound:,.0f}/s"
    return (
        f"{label}: most delivered {most_text}/s; highest valid rate "
        f"{s.get('max_valid_offered_per_s') or '-'}/s; highest with p99 < "
        f"{s.get('p99_bound_ms', P99_BOUND_MS):g} ms: {bound_text}"
    )


def compare_setups(setups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per offered rate, each set-up's figures and their ratio to the first set-up's."""
    out = []
    base_runs = {r["offered_per_s"]: r for r in setups[0]["runs"]}
    for setup in setups:
        for run in setup["runs"]:
            base = base_runs.get(run["offered_per_s"])
            item: dict[str, Any] = {
                "setup": setup["label"],
                "workers": setup.get("workers"),
                "valid": run["valid"],
            }
            for _, key, _ in _COMPARED:
                item[key] = run.get(key)
                if base is not None and run.get(key) and base.get(key):
                    item[f"{key}_ratio"] = round(run[key] / base[key], 3)
            item["offered_per_s"] = run["offered_per_s"]
            out.append(item)
    return out


def comparison_table(items: list[dict[str, Any]]) -> str:
    lines = ["set-ups side by side (ratio to the first set-up in brackets):"]
    lines.append(
        f"{'set-up':>10}  {'offered/s':>9}  "
        + "  ".join(f"{title:>16}" for title, _, _ in _COMPARED)
    )
    for item in items:
        cells = []
        for _, key, fmt in _COMPARED:
            value = item.get(key)
            text = "-" if value is None else fmt.format(value)
            ratio = item.get(f"{key}_ratio")
            if ratio is not None and item["setup"] != items[0]["setup"]:
                text += f" ({ratio:.2f}x)"
            cells.append(f"{text:>16}")
        lines.append(f"{item['setup']:>10}  {item['offered_per_s']:>9.0f}  " + "  ".join(cells))
    return "\n".join(lines)
