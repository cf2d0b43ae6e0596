"""``make bench``: Interlude's submit path under load, against a minimal baseline.

One run, on this machine, all on 127.0.0.1:

1. a scratch database, RabbitMQ user and vhost; the three services started as
   production runs them (``INTERLUDE_ENV=production``, ``python -m services.<name>``);
2. therapists and clients enrolled through the HTTP API, device keys published,
   check-ins pre-sealed with the real client crypto;
3. Interlude at saturation (closed loop), then at half that rate (open loop),
   then a ladder of short open-loop steps at 80-110 % of the rate saturation
   sustained until its last alert, up to the first whose p99s miss the
   half-load targets (down to 50 % if 80 % misses; the highest that holds is
   ``sustained_rps``);
   submit-to-alert latency and outbox lag read from the database afterwards;
4. the baseline server (``bench/baseline_server.py``) under the same two loads;
5. ``bench/results/latest.json`` and ``latest.png``; everything made is removed,
   also on Ctrl-C or failure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import secrets
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import psutil
from tqdm import tqdm

from bench import stack
from bench.load import Bodies, PhaseResult, closed_loop, open_loop
from bench.population import make_people, seal_envelopes
from bench.report import chart, phase_summary, wait_alerts, window_metrics
from bench.resources import Scratch, rabbitmqctl
from services.notifier.consumer import HANDLERS

RESULTS = Path(__file__).parent / "results"
TARGETS = {"throughput_ratio": 0.5, "submit_p99_ms": 50.0, "alert_p99_ms": 250.0,
           "rss_mb": 100.0}


def say(message: str) -> None:
    tqdm.write(f"bench: {message}", file=sys.stderr)


class Interrupted(Exception):
    pass


def _on_term(signum: int, _frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)


def phase_bar(name: str, duration: float) -> tuple[tqdm, Any]:
    bar = tqdm(total=round(duration, 1), desc=f"{name:<22}", unit="s", file=sys.stderr,
               bar_format="{desc} {bar} {n:.0f}/{total:.0f} s {postfix}", leave=True)

    def tick(elapsed: float, count: int) -> None:
        bar.n = min(bar.total, round(elapsed, 1))
        bar.set_postfix_str(f"{count} sent, {count / max(elapsed, 0.1):.0f}/s")

    return bar, tick


FOREIGN: dict[str, Any] = {}
CPU_PER_REQUEST: dict[str, Any] = {}
NAMES: dict[int, str] = {}


async def run_phase(kind: str, name: str, base: str, source: Bodies, duration: float,
                    *, foreign: stack.ForeignLoad | None = None, pids: list[int] | None = None,
                    **kwargs: Any) -> PhaseResult:
    bar, tick = phase_bar(name, duration)
    if foreign is not None:
        foreign.start(pids or [])
    handles = {pid: psutil.Process(pid) for pid in pids or []}
    cpu_before = {pid: sum(h.cpu_times()[:2]) for pid, h in handles.items()}
    try:
        if kind == "closed":
            result = await closed_loop(name, base, source, duration=duration, tick=tick,
                                       **kwargs)
        else:
            result = await open_loop(name, base, source, duration=duration, tick=tick, **kwargs)
        bar.n = bar.total
        bar.set_postfix_str(f"{len(result.ok)} ok, {result.throughput:.0f}/s")
    finally:
        bar.close()
    if handles:
        # CPU per accepted request: far steadier than throughput on a shared machine.
        CPU_PER_REQUEST[name] = {
            NAMES.get(pid, str(pid)): round(1000 * (sum(h.cpu_times()[:2]) - cpu_before[pid])
                                            / max(1, len(result.ok)), 2)
            for pid, h in handles.items()}
    if foreign is not None:
        FOREIGN[name] = foreign.stop()
        if FOREIGN[name]["cores"] >= 0.2:  # type: ignore[operator]
            say(f"warning: other processes used {FOREIGN[name]['cores']} cores during"
                f" '{name}': {'; '.join(FOREIGN[name]['top'])}")  # type: ignore[arg-type]
    return result


def seal(pairs: list[Any], per_client: int, workers: int, label: str) -> Bodies:
    bar = tqdm(total=per_client * len(pairs), desc=f"{label:<22}", unit="env", file=sys.stderr,
               leave=True)
    try:
        bodies = seal_envelopes(pairs, per_client, workers, bar.update)
    finally:
        bar.close()
    return Bodies(pairs, bodies)


async def wait_setup_events(dsn: str, timeout: float = 30.0) -> None:
    """Until the set-up's events are published and handled, so they do not mix in."""
    conn = await asyncpg.connect(dsn)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pending = await conn.fetchval(
                "SELECT count(*) FROM messaging.outbox WHERE published_at IS NULL")
            # Only the types the notifier applies leave an inbox row.
            sent = await conn.fetchval("SELECT count(*) FROM messaging.outbox"
                                       " WHERE routing_key = ANY($1::text[])", list(HANDLERS))
            handled = await conn.fetchval("SELECT count(*) FROM notifier.inbox")
            if pending == 0 and handled >= sent:
                return
            await asyncio.sleep(0.2)
        raise RuntimeError("set-up events were not handled in time (see results/logs)")
    finally:
        await conn.close()


async def quiet(conn: asyncpg.Connection, vhost: str, timeout: float = 30.0) -> None:
    """Until no outbox (of any service) has pending rows and no queue holds messages,
    so that a phase's backlog does not spill into the next one."""
    tables = [f"{r['table_schema']}.{r['table_name']}" for r in await conn.fetch(
        "SELECT table_schema, table_name FROM information_schema.columns"
        " WHERE table_name LIKE '%outbox' AND column_name = 'published_at'")]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pending = 0
        for table in tables:
            pending += await conn.fetchval(
                f"SELECT count(*) FROM {table} WHERE published_at IS NULL")
        listing = await asyncio.to_thread(
            rabbitmqctl, "list_queues", "-p", vhost, "--no-table-headers", "name", "messages")
        rows = [line.split() for line in listing.stdout.splitlines()]
        # Dead-letter queues keep what they hold; they are not a backlog.
        queued = sum(int(r[-1]) for r in rows
                     if len(r) == 2 and r[-1].isdigit() and not r[0].endswith(".dead"))
        if pending == 0 and queued == 0:
            return
        await asyncio.sleep(0.5)
    say("warning: the system was still busy when the next phase started")


async def settle(dsn: str, vhost: str, result: PhaseResult, t_origin: float) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn)
    try:
        start = result.started_wall
        end = start + result.duration + 15  # late answers of the phase are still its own
        await wait_alerts(conn, start, end, timeout=30)
        await quiet(conn, vhost)
        return await window_metrics(conn, start, end, t_origin)
    finally:
        await conn.close()


def git_version() -> str:
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                              text=True, timeout=10, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions: dict[str, str] = {}
    for name, argv in (("postgres", ["psql", "--version"]),
                       ("rabbitmq", ["rabbitmqctl", "-q", "version"])):
        try:
            versions[name] = subprocess.run(argv, capture_output=True, text=True,
                                            timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            versions[name] = "unknown"
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb":
            round(psutil.virtual_memory().total / 2**30, 1),
            "kernel": platform.release(),
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(), **versions}


# The sustained-rate ladder: open-loop steps at these fractions of the saturation
# phase's alerted rate (counted until its last alert: what the whole pipeline did
# flat out). A step holds if its submit p99 and submit-to-alert p99 stay within
# the half-load targets; the ladder stops at the first step that does not. If
# the first step does not hold, it steps down instead, to the first that does.
LADDER_FRACTIONS = (0.8, 0.9, 1.0, 1.1)
LADDER_DOWN = (0.7, 0.6, 0.5)
LADDER_SECONDS = 8.0


def holds(submit_p99_ms: float | None, alert_p99_ms: float | None) -> bool:
    return ((submit_p99_ms or math.inf) < TARGETS["submit_p99_ms"]
            and (alert_p99_ms or math.inf) < TARGETS["alert_p99_ms"])


async def climb(args: argparse.Namespace, base: str, pairs: list[Any], scratch: Scratch,
                alerted_rps: float, t_origin: float, foreign: Any, pids: list[int],
                ) -> tuple[list[dict[str, Any]], list[tuple[PhaseResult, list[Any]]]]:
    """Run the ladder; each step's summary, and its phase and alert series for the chart."""
    steps: list[dict[str, Any]] = []
    ran: list[tuple[PhaseResult, list[Any]]] = []

    async def step(fraction: float) -> bool:
        rate = max(1.0, alerted_rps * fraction)
        per_client = math.ceil(rate * args.ladder_seconds / len(pairs)) + 2
        bodies = seal(pairs, per_client, args.seal_workers, f"seal (sustain {fraction:.0%})")
        result = await run_phase("open", f"interlude sustain {fraction:.0%}", base, bodies,
                                 args.ladder_seconds, rate=rate, foreign=foreign, pids=pids)
        metrics = await settle(scratch.database_url, scratch.vhost, result, t_origin)
        summary = phase_summary(result)
        held = holds(summary["p99_ms"], metrics["alert_p99_ms"])
        steps.append({"fraction": fraction, "offered_rps": round(rate, 1),
                      "accepted_rps": summary["throughput_rps"],
                      "submit_p99_ms": summary["p99_ms"],
                      "alert_p99_ms": metrics["alert_p99_ms"], "held": held})
        ran.append((result, metrics["_alert_series"]))
        return held

    for fraction in LADDER_FRACTIONS:
        if not await step(fraction):
            break
    if not steps[0]["held"]:
        for fraction in LADDER_DOWN:
            if await step(fraction):
                break
    return steps, ran


def verdicts(results: dict[str, Any]) -> dict[str, Any]:
    rss = results["rss_mb"]
    out = {
        "throughput_ratio": {"target": f">= {TARGETS['throughput_ratio']}",
                             "value": results["throughput_ratio"],
                             "met": results["throughput_ratio"] >= TARGETS["throughput_ratio"]},
        "submit_p99_ms": {"target": f"< {TARGETS['submit_p99_ms']:.0f} at half saturation",
                          "value": results["submit_p99_ms"],
                          "met": (results["submit_p99_ms"] or math.inf)
                          < TARGETS["submit_p99_ms"]},
        "alert_p99_ms": {"target": f"< {TARGETS['alert_p99_ms']:.0f} at half saturation",
                         "value": results["alert_p99_ms"],
                         "met": (results["alert_p99_ms"] or math.inf) < TARGETS["alert_p99_ms"]},
    }
    for name, value in rss.items():
        out[f"rss_mb.{name}"] = {"target": f"< {TARGETS['rss_mb']:.0f}", "value": value,
                                 "met": value < TARGETS["rss_mb"]}
    return out


async def bench(args: argparse.Namespace, scratch: Scratch, procs: list[stack.Proc],
                out: Path) -> dict[str, Any]:
    t_begin = time.monotonic()
    log_dir = out / "logs"
    ports = {n: stack.free_port() for n in ("gateway", "messaging", "notifier", "baseline")}
    env = {**os.environ,
           "INTERLUDE_ENV": "production",
           "INTERLUDE_DATABASE_URL": scratch.database_url,
           "INTERLUDE_AMQP_URL": scratch.amqp_url,
           "INTERLUDE_INTERNAL_KEY": secrets.token_urlsafe(48),
           "INTERLUDE_HOST": "127.0.0.1",
           "INTERLUDE_GATEWAY_PORT": str(ports["gateway"]),
           "INTERLUDE_MESSAGING_PORT": str(ports["messaging"]),
           "INTERLUDE_NOTIFIER_PORT": str(ports["notifier"]),
           "INTERLUDE_LOG_FORMAT": "json",
           "PYTHONUNBUFFERED": "1"}
    await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "services.cli", "migrate"],
                            env=env, check=True, capture_output=True, timeout=60)
    services = stack.start_services(env, log_dir)
    procs.extend(services.values())
    stack.wait_ready(list(services.values()))
    say("services ready (production mode): " + ", ".join(
        f"{n} pid {p.pid} :{p.port}" for n, p in services.items()))
    base = f"http://127.0.0.1:{ports['gateway']}"

    bar = tqdm(total=args.therapists + args.clients, desc=f"{'enroll (HTTP API)':<22}",
               unit="person", file=sys.stderr)
    try:
        pairs = await make_people(base, scratch.database_url, therapists=args.therapists,
                                  clients=args.clients, concurrency=args.enroll_concurrency,
                                  progress=lambda: bar.update(1))
    finally:
        bar.close()
    await wait_setup_events(scratch.database_url)
    setup_hwm = {n: round(stack.vm_hwm_mb(p.pid), 1) for n, p in services.items()}
    hwm_reset = all(stack.reset_hwm(p.pid) for p in services.values())
    sampler = stack.RssSampler(services)
    sampler.start()
    foreign = stack.ForeignLoad(scratch.database)
    service_pids = [p.pid for p in services.values()]
    NAMES.update({p.pid: n for n, p in services.items()})

    profilers: list[subprocess.Popen[bytes]] = []
    try:
        per_client = math.ceil(args.max_rps * args.warmup / len(pairs))
        warm_bodies = seal(pairs, per_client, args.seal_workers, "seal (warm-up)")
        warm = await run_phase("closed", "interlude warm-up", base, warm_bodies, args.warmup,
                               workers_per_pair=args.workers_per_client)
        # Enough for twice the warm-up's rate: sealing for a rate never reached costs time.
        expected = min(args.max_rps, max(50.0, 2 * warm.throughput))
        per_client = math.ceil(expected * args.seconds / len(pairs))
        saturation_bodies = seal(pairs, per_client, args.seal_workers, "seal (saturation)")
        # The baseline does not check envelopes: it gets the same bodies again.
        replay = saturation_bodies.snapshot()
        if args.profile and args.profile_phase == "saturation":
            profilers = start_profilers(services, args.seconds, out)
        t_origin = time.time()
        saturation = await run_phase("closed", "interlude saturation", base, saturation_bodies,
                                     args.seconds, workers_per_pair=args.workers_per_client,
                                     foreign=foreign, pids=service_pids)
        for profiler in profilers:
            profiler.wait(timeout=args.seconds + 30)
        if saturation.ran_out:
            print(f"bench: warning: the saturation phase used up its sealed check-ins after"
                  f" {saturation.duration:.1f} s; its rate is over that time (raise --max-rps)",
                  file=sys.stderr)
        sat_metrics = await settle(scratch.database_url, scratch.vhost, saturation, t_origin)

        rate = max(1.0, saturation.throughput / 2)
        per_client = math.ceil(rate * args.seconds / len(pairs)) + 2
        fixed_bodies = seal(pairs, per_client, args.seal_workers, "seal (half load)")
        if args.profile and args.profile_phase == "half":
            profilers = start_profilers(services, args.seconds, out)
        fixed = await run_phase("open", "interlude half load", base, fixed_bodies, args.seconds,
                                rate=rate, foreign=foreign, pids=service_pids)
        for profiler in profilers:
            profiler.wait(timeout=args.seconds + 30)
        fixed_metrics = await settle(scratch.database_url, scratch.vhost, fixed, t_origin)
        ladder: list[dict[str, Any]] = []
        ladder_ran: list[tuple[PhaseResult, list[Any]]] = []
        if args.ladder_seconds > 0 and sat_metrics["alerted_throughput_rps"]:
            ladder, ladder_ran = await climb(
                args, base, pairs, scratch, sat_metrics["alerted_throughput_rps"], t_origin,
                foreign, service_pids)
    finally:
        sampler.stop()
        for profiler in profilers:
            if profiler.poll() is None:
                profiler.kill()
    load_hwm = {n: round(stack.vm_hwm_mb(p.pid), 1) for n, p in services.items()}
    problems = stack.stop(list(services.values()))
    for problem in problems:
        say(problem)

    baseline_proc = stack.start_baseline(scratch.database_url, ports["baseline"], log_dir)
    procs.append(baseline_proc)
    stack.wait_ready([baseline_proc])
    NAMES[baseline_proc.pid] = "baseline"
    baseline_base = f"http://127.0.0.1:{ports['baseline']}"
    replay_source = Bodies(pairs, replay, cycle=True)
    await run_phase("closed", "baseline warm-up", baseline_base, replay_source, args.warmup,
                    workers_per_pair=args.workers_per_client, target="baseline")
    b_saturation = await run_phase("closed", "baseline saturation", baseline_base, replay_source,
                                   args.seconds, workers_per_pair=args.workers_per_client,
                                   target="baseline", foreign=foreign,
                                   pids=[baseline_proc.pid])
    b_fixed = await run_phase("open", "baseline half load", baseline_base,
                              Bodies(pairs, replay, cycle=True), args.seconds, rate=rate,
                              target="baseline", foreign=foreign, pids=[baseline_proc.pid])
    stack.stop([baseline_proc])

    phases = [(saturation, 0.0), (fixed, fixed.started_wall - t_origin),
              *[(step, step.started_wall - t_origin) for step, _ in ladder_ran],
              (b_saturation, b_saturation.started_wall - t_origin),
              (b_fixed, b_fixed.started_wall - t_origin)]
    sat_summary, fixed_summary = phase_summary(saturation), phase_summary(fixed)
    sustained = max((step["accepted_rps"] for step in ladder if step["held"]), default=None)
    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": git_version(),
        "machine": machine(),
        "config": {"therapists": args.therapists, "clients": args.clients,
                   "closed_loop_concurrency": len(pairs) * args.workers_per_client,
                   "phase_seconds": args.seconds, "warmup_seconds": args.warmup,
                   "half_load_rps": round(rate, 1), "profiled": args.profile,
                   "envelope_bytes": len(replay[0][0]) if replay and replay[0] else None},
        "throughput_ratio": round(saturation.throughput / b_saturation.throughput, 3)
        if b_saturation.throughput else None,
        "saturation_alerted_rps": sat_metrics["alerted_throughput_rps"],
        "submit_p99_ms": fixed_summary["p99_ms"],
        "submit_p99_saturation_ms": sat_summary["p99_ms"],
        "alert_p50_ms": fixed_metrics["alert_p50_ms"],
        "alert_p99_ms": fixed_metrics["alert_p99_ms"],
        "outbox_lag_p50_ms": fixed_metrics["outbox_lag_p50_ms"],
        "outbox_lag_p99_ms": fixed_metrics["outbox_lag_p99_ms"],
        # The highest ladder step that held (None: no step held, down to 50 %), and it
        # over the baseline's saturation rate.
        "sustained_rps": sustained,
        "sustained_ratio": round(sustained / b_saturation.throughput, 3)
        if sustained is not None and b_saturation.throughput else None,
        "ladder": ladder,
        "rss_mb": load_hwm,
        "rss_setup_mb": setup_hwm,
        "rss_window_reset": hwm_reset,
        "rss_sampled_peak_mb": {n: round(sampler.peak(n), 1) for n in services},
        "cpu_ms_per_request": CPU_PER_REQUEST,
        "other_processes_cores": FOREIGN,
        "interlude": {
            "saturation": {**sat_summary, **{k: v for k, v in sat_metrics.items()
                                             if not k.startswith("_")}},
            "half_load": {**fixed_summary, **{k: v for k, v in fixed_metrics.items()
                                              if not k.startswith("_")}},
        },
        "baseline": {"saturation": phase_summary(b_saturation),
                     "half_load": phase_summary(b_fixed)},
    }
    results["targets"] = verdicts(results)
    results["elapsed_s"] = round(time.monotonic() - t_begin, 1)
    name = "latest"
    out.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - the load has finished
    (out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    alerts = [sat_metrics["_alert_series"], fixed_metrics["_alert_series"],
              *[series for _, series in ladder_ran]]
    chart(out / f"{name}.png", phases, alerts,
          f"Interlude vs baseline, {results['machine']['cores']} cores, "
          f"{results['date']} — throughput ratio {results['throughput_ratio']}")
    return results


def start_profilers(services: dict[str, stack.Proc], seconds: float,
                    folder: Path) -> list[subprocess.Popen[bytes]]:
    folder.mkdir(parents=True, exist_ok=True)
    py_spy = Path(sys.executable).with_name("py-spy")
    running = []
    for name, proc in services.items():
        running.append(subprocess.Popen(
            [str(py_spy), "record", "--pid", str(proc.pid), "--duration", str(int(seconds)),
             "--rate", "100", "--nonblocking", "--format", "raw",
             "--output", str(folder / f"{name}.txt")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return running


def print_summary(results: dict[str, Any], out: Path) -> None:
    i_sat = results["interlude"]["saturation"]
    i_half = results["interlude"]["half_load"]
    b_sat = results["baseline"]["saturation"]
    cpu = results["cpu_ms_per_request"]
    lines = [
        "",
        f"throughput   Interlude {i_sat['throughput_rps']}/s, baseline {b_sat['throughput_rps']}/s"
        f" -> ratio {results['throughput_ratio']}",
        f"saturation   submit p50/p95/p99 {i_sat['p50_ms']}/{i_sat['p95_ms']}/{i_sat['p99_ms']}"
        f" ms (concurrency {i_sat['concurrency']}), alert p99 {i_sat['alert_p99_ms']} ms;"
        f" {i_sat['alerted_throughput_rps']}/s counting until the last alert",
        f"half load    {i_half['offered_rps']}/s offered: submit p50/p95/p99 {i_half['p50_ms']}/"
        f"{i_half['p95_ms']}/{i_half['p99_ms']} ms; alert p50/p99 {i_half['alert_p50_ms']}/"
        f"{i_half['alert_p99_ms']} ms; outbox lag p50/p99 {i_half['outbox_lag_p50_ms']}/"
        f"{i_half['outbox_lag_p99_ms']} ms",
        "peak RSS     " + ", ".join(f"{k} {v} MB" for k, v in results["rss_mb"].items())
        + "  (set-up incl. enrollment: " + ", ".join(
            f"{k} {v}" for k, v in results["rss_setup_mb"].items()) + ")",
        "CPU/request  " + ", ".join(f"{k} {v} ms" for k, v in cpu.get(
            "interlude saturation", {}).items())
        + f"; baseline {cpu.get('baseline saturation', {}).get('baseline')} ms (saturation)",
        "sustained    " + (
            f"{results['sustained_rps']}/s with submit p99 < {TARGETS['submit_p99_ms']:.0f} ms"
            f" and alert p99 < {TARGETS['alert_p99_ms']:.0f} ms"
            f" (ratio {results['sustained_ratio']}); " if results["sustained_rps"] is not None
            else "no ladder step held; " if results["ladder"] else "ladder not run")
        + "; ".join(f"{step['fraction']:.0%} of alerted: {step['accepted_rps']}/s,"
                    f" {step['submit_p99_ms']}/{step['alert_p99_ms']} ms"
                    f" {'held' if step['held'] else 'did not hold'}"
                    for step in results["ladder"]),
        "targets      " + ", ".join(f"{k} {'met' if v['met'] else 'MISSED'}"
                                    for k, v in results["targets"].items()),
        f"wrote {out / 'latest.json'} and latest.png in {results['elapsed_s']} s",
    ]
    print("\n".join(lines))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each timed phase")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--therapists", type=int, default=4)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--workers-per-client", type=int, default=1,
                        help="closed-loop requests in flight per client")
    parser.add_argument("--ladder-seconds", type=float, default=LADDER_SECONDS,
                        help="length of each sustained-rate step (0: no ladder)")
    parser.add_argument("--max-rps", type=float, default=1000.0,
                        help="envelopes are sealed for at most this rate (warm-up: exactly)")
    parser.add_argument("--enroll-concurrency", type=int, default=2)
    parser.add_argument("--seal-workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--profile", action="store_true",
                        help="py-spy the services during one phase; results in "
                        "results/profile/ (latest.json is not overwritten)")
    parser.add_argument("--profile-phase", choices=("saturation", "half"),
                        default="saturation",
                        help="the phase --profile samples (default: saturation)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out / "profile" if args.profile else args.out
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGHUP, _on_term)
    scratch = Scratch()
    procs: list[stack.Proc] = []
    code = 1
    try:
        say(f"scratch database {scratch.database}, RabbitMQ user/vhost {scratch.vhost}")
        scratch.create()
        results = asyncio.run(bench(args, scratch, procs, out))
        print_summary(results, out)
        code = 0
    except (KeyboardInterrupt, Interrupted):
        say("interrupted; cleaning up")
        code = 130
    except Exception as exc:
        say(f"failed: {exc.__class__.__name__}: {exc} (service logs in {out / 'logs'})")
        code = 1
    finally:
        # A second Ctrl-C must not cut the clean-up short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for problem in stack.stop(procs):
            say(problem)
        for problem in scratch.remove():
            say(f"could not remove {problem}")
            code = code or 1
        say("cleaned up: processes stopped, database, vhost and user removed")
    return code


if __name__ == "__main__":
    sys.exit(main())
