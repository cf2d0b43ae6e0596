"""Numbers from a bench run: percentiles, the database-side latencies, the chart."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import asyncpg

from bench.load import PhaseResult


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


def phase_summary(result: PhaseResult) -> dict[str, Any]:
    latencies = [s.latency for s in result.ok]
    errors: dict[str, int] = defaultdict(int)
    for sample in result.samples:
        if sample.status not in (200, 201):
            errors[str(sample.status)] += 1
    return {
        "target": result.target,
        "duration_s": round(result.duration, 2),
        "requests": len(result.samples),
        "ok": len(latencies),
        "errors": dict(errors),
        "throughput_rps": round(result.throughput, 1),
        "offered_rps": None if result.offered_rps is None else round(result.offered_rps, 1),
        "concurrency": result.concurrency,
        "skipped_in_flight_cap": result.skipped,
        "ran_out_of_envelopes": result.ran_out,
        "p50_ms": _ms(percentile(latencies, 50)),
        "p95_ms": _ms(percentile(latencies, 95)),
        "p99_ms": _ms(percentile(latencies, 99)),
        "max_ms": _ms(max(latencies, default=None)),
    }


# When the notifier stored the alert: its inbox row is written by the same
# transaction as the notification (received_at = that transaction's now()).
# notifications.created_at is the *event's* time (it orders the feed), so it
# cannot show delivery delay.
ALERT_SQL = """
SELECT extract(epoch FROM m.created_at) AS at,
       extract(epoch FROM i.received_at - m.created_at) AS alert_s,
       extract(epoch FROM n.created_at - m.created_at) AS event_time_s
FROM messaging.messages m
JOIN notifier.notifications n ON n.message_id = m.id AND n.kind = 'checkin.received'
JOIN notifier.inbox i ON i.event_id = n.event_id
WHERE m.created_at >= to_timestamp($1) AND m.created_at < to_timestamp($2)
"""
MESSAGES_SQL = """
SELECT count(*) FROM messaging.messages
WHERE created_at >= to_timestamp($1) AND created_at < to_timestamp($2)
"""
OUTBOX_SQL = """
SELECT extract(epoch FROM published_at - created_at) FROM messaging.outbox
WHERE created_at >= to_timestamp($1) AND created_at < to_timestamp($2)
  AND published_at IS NOT NULL
"""


async def wait_alerts(conn: asyncpg.Connection, start: float, end: float,
                      timeout: float) -> tuple[int, int]:
    """Wait until every check-in of the window has its alert; (messages, alerts)."""
    import asyncio
    import time

    deadline = time.monotonic() + timeout
    while True:
        messages = await conn.fetchval(MESSAGES_SQL, start, end)
        alerts = await conn.fetchval(f"SELECT count(*) FROM ({ALERT_SQL}) a", start, end)
        if alerts >= messages or time.monotonic() > deadline:
            return int(messages), int(alerts)
        await asyncio.sleep(0.25)


async def window_metrics(conn: asyncpg.Connection, start: float, end: float,
                         t_origin: float) -> dict[str, Any]:
    rows = await conn.fetch(ALERT_SQL, start, end)
    alert = [float(r["alert_s"]) for r in rows]
    lag = [float(v) for (v,) in await conn.fetch(OUTBOX_SQL, start, end)]
    messages = await conn.fetchval(MESSAGES_SQL, start, end)
    return {
        "messages": int(messages),
        "alerts": len(alert),
        "alert_p50_ms": _ms(percentile(alert, 50)),
        "alert_p99_ms": _ms(percentile(alert, 99)),
        "alert_max_ms": _ms(max(alert, default=None)),
        # Check-ins per second *with their alert stored*: from the window's first
        # check-in to its last alert, so the relay's and the notifier's catch-up
        # after a closed-loop phase counts as the work it is.
        "alerted_throughput_rps": _alerted_rate(rows),
        "alert_event_time_p99_ms": _ms(percentile(
            [float(r["event_time_s"]) for r in rows], 99)),
        "outbox_lag_p50_ms": _ms(percentile(lag, 50)),
        "outbox_lag_p99_ms": _ms(percentile(lag, 99)),
        "outbox_lag_max_ms": _ms(max(lag, default=None)),
        "_alert_series": [(float(r["at"]) - t_origin, float(r["alert_s"])) for r in rows],
    }


def _alerted_rate(rows: list[Any]) -> float | None:
    if len(rows) < 2:
        return None
    first = min(float(r["at"]) for r in rows)
    last = max(float(r["at"]) + float(r["alert_s"]) for r in rows)
    return round(len(rows) / (last - first), 1) if last > first else None


def _buckets(points: list[tuple[float, float]], width: float = 1.0
             ) -> tuple[list[float], list[float], list[float], list[int]]:
    grouped: dict[int, list[float]] = defaultdict(list)
    for at, value in points:
        grouped[int(at // width)].append(value)
    keys = sorted(grouped)
    xs = [(k + 0.5) * width for k in keys]
    p50 = [percentile(grouped[k], 50) or 0.0 for k in keys]
    p99 = [percentile(grouped[k], 99) or 0.0 for k in keys]
    counts = [len(grouped[k]) for k in keys]
    return xs, p50, p99, counts


def chart(path: Path, phases: list[tuple[PhaseResult, float]],
          alerts: list[list[tuple[float, float]]], title: str) -> None:
    """Latency over time, throughput and submit-to-alert latency, phases shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (lat_ax, rps_ax, alert_ax) = plt.subplots(3, 1, figsize=(11, 8.5), sharex=True)
    colours = {"interlude": "tab:blue", "baseline": "tab:orange"}
    labelled: set[str] = set()
    for result, offset in phases:
        points = [(offset + s.at, s.latency * 1000) for s in result.ok]
        xs, p50, p99, counts = _buckets(points)
        colour = colours[result.target]
        first = result.target not in labelled
        labelled.add(result.target)
        lat_ax.plot(xs, p50, color=colour, lw=1.2, label=f"{result.target} p50" if first else None)
        lat_ax.plot(xs, p99, color=colour, lw=1.2, ls="--",
                    label=f"{result.target} p99" if first else None)
        rps_ax.plot(xs, counts, color=colour, lw=1.4, label=result.target if first else None)
        for ax in (lat_ax, rps_ax, alert_ax):
            ax.axvspan(offset, offset + result.duration, color=colour, alpha=0.06)
        # A short phase (a ladder step) gets a short label, so labels do not overlap.
        label = result.name if result.duration >= 10 else result.name.split(" ", 1)[-1]
        rps_ax.text(offset + 0.3, 0.98, label, transform=rps_ax.get_xaxis_transform(),
                    va="top", fontsize=8 if result.duration >= 10 else 7)
    for n, series in enumerate(a for a in alerts if a):  # one line per phase, no bridges
        xs, p50, p99, _ = _buckets([(at, v * 1000) for at, v in series])
        alert_ax.plot(xs, p50, color="tab:green", lw=1.2, label="p50" if n == 0 else None)
        alert_ax.plot(xs, p99, color="tab:green", lw=1.2, ls="--",
                      label="p99" if n == 0 else None)
    lat_ax.set_yscale("log")
    lat_ax.set_ylabel("submit latency (ms)")
    rps_ax.set_ylabel("accepted / s")
    alert_ax.set_yscale("log")
    alert_ax.set_ylabel("submit→alert (ms)")
    alert_ax.set_xlabel("seconds since the first timed phase (per 1 s bucket, by send time)")
    for ax in (lat_ax, rps_ax, alert_ax):
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
