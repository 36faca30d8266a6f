"""Measure GetMe on every protocol against the bare /bench/raw endpoint of the same server run.

    python loadtests/bench.py [--server uvicorn|pyvoy|both] [--duration 8] [--connections 32] [--json FILE]

For each server the script migrates a fresh SQLite database in a temporary directory, mints a
development token and starts `python -m app serve` on a free loopback port. It checks that every
scenario returns the caller's profile, then drives each scenario for a fixed time with a fixed
number of connections, one request in flight on each:

    raw            GET /bench/raw over HTTP/1.1 (wrk), the baseline
    raw-h2c        GET /bench/raw over h2c (h2load), the baseline on the transport gRPC uses
    connect-json   GetMe, Connect, application/json (wrk)
    connect-proto  GetMe, Connect, application/proto (wrk)
    grpc-web       GetMe, gRPC-Web, application/grpc-web+proto (wrk)
    grpc           GetMe, gRPC over h2c with prior knowledge (h2load)

The raw baseline runs first and again last, so a change in the machine's other load shows as
drift, and --rounds N repeats the whole sequence and reports medians. The script reports
requests/s, p50 and p99 latency, server CPU time per request (utime + stime of the server and its
child processes, from /proc), the peak RSS of the process that runs the application, and each
scenario's requests/s divided by the raw baseline's. Absolute numbers
depend on the machine and on whatever else runs on it; the ratios within one run are the result
to compare.

Any failed response (a status outside 2xx, a gRPC status other than OK, in the load generator's
counts or in the server's access log) fails its scenario, and a failed scenario gives exit
status 1. ERROR lines in the server's log during a run are reported as a warning. With
--check-targets, a missed target gives exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Run as `python loadtests/bench.py`, Python puts loadtests/ on the path, not the repository root.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from app.settings import Settings  # noqa: E402
from loadtests.load_generators import INSTALL_HINTS, LoadResult, run_h2load, run_wrk  # noqa: E402
from loadtests.profiling import finish_py_spy, start_py_spy, summarize_profile  # noqa: E402
from loadtests.scenarios import (  # noqa: E402
    BENCH_EMAIL,
    BENCH_UID,
    BenchmarkError,
    Scenario,
    build_scenarios,
    check_scenario,
)
from loadtests.server_process import (  # noqa: E402
    BenchServer,
    count_logged_calls,
    descendants,
    find_application_process,
    status_kib,
    tree_cpu_seconds,
)

# Minimum requests/s of each scenario divided by the raw endpoint's (HTTP/1.1), one server worker.
TARGET_RATIOS = {"connect-proto": 0.20, "connect-json": 0.15, "grpc-web": 0.15, "grpc": 0.08}
TARGET_PEAK_RSS_MB = 100.0
# Time the server gets to log the calls that the load generator cut off when it stopped.
SETTLE_SECONDS = 0.5


@dataclass
class ScenarioResult:
    """One scenario's measurement on one server; `error` is set when it failed."""

    name: str
    description: str
    tool: str
    requests: int = 0
    seconds: float = 0.0
    requests_per_second: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    server_cpu_us_per_request: float = 0.0
    server_system_cpu_us_per_request: float = 0.0
    client_cpu_us_per_request: float = 0.0
    server_logged_ok: int | None = None
    ratio_to_raw: float | None = None
    ratio_to_raw_h2c: float | None = None
    # ERROR lines in the server's log during the measured run, except up to one cancellation per
    # connection cut off at the deadline. The responses themselves passed every check.
    server_errors: int = 0
    server_error_detail: str = ""
    # Why the measured time is shorter than --duration, when it is (see run_h2load).
    note: str = ""
    # With --rounds above 1, the other fields are medians of these per-round values.
    rounds_requests_per_second: list[float] = field(default_factory=list)
    rounds_ratio_to_raw: list[float | None] = field(default_factory=list)
    error: str | None = None


@dataclass
class ServerResult:
    """Every scenario on one server, with memory use and the targets."""

    server: str
    version: str
    app_pid: int
    process_count: int
    scenarios: list[ScenarioResult]
    raw_runs: list[float]
    idle_rss_mb: float
    peak_rss_mb: float
    peak_rss_tree_mb: float
    targets: list[dict]
    log_path: str


# --- Measuring one server ----------------------------------------------------------------------


def prepare_environment(directory: Path, options: argparse.Namespace) -> dict[str, str]:
    """Return the server's environment: the caller's, minus every app setting, plus the benchmark's."""
    env = dict(os.environ)
    for name in Settings.model_fields:
        env.pop(name.upper(), None)
    env.update(
        APP_ENV="development",
        DATABASE_URL=f"sqlite+aiosqlite:///{directory / 'bench.db'}",
        DEV_KEYS_DIR=str(directory / "dev-keys"),
        BENCHMARK_ENDPOINTS="true",
        ENABLED_SERVICES=options.services,
        # Every call comes from one caller; the limit stays on, out of reach, so its cost counts.
        RATE_LIMIT_DEFAULT="1000000000/minute",
        # One JSON access-log line per call, as in production; measure() reads them back.
        LOG_FORMAT="json",
        LOG_LEVEL="INFO",
    )
    return env


def run_cli(arguments: list[str], env: dict[str, str]) -> str:
    """Run `python -m app ...` and return its output."""
    completed = subprocess.run(
        [sys.executable, "-m", "app", *arguments], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    if completed.returncode != 0:
        raise BenchmarkError(f"python -m app {arguments[0]} failed with {completed.returncode}:\n{completed.stderr[-3000:]}")
    return completed.stdout.strip()


@dataclass
class Measurement:
    """The client's and the server's figures from one run of a scenario."""

    load: LoadResult
    server_user_seconds: float
    server_system_seconds: float
    logged_ok: int | None
    server_errors: int
    server_error_detail: str

    def per_request_us(self, seconds: float) -> float:
        return round(seconds / self.load.requests * 1e6, 1)


def measure(
    scenario: Scenario, server: BenchServer, options: argparse.Namespace, seconds: int, directory: Path,
    expected_data_bytes: int,
) -> Measurement:
    """Run one scenario for `seconds` and read the server's CPU time and log for the same time.

    Raises BenchmarkError when the load generator or the server's access log saw a failed response.
    """
    log_start = server.log_size()
    user_before, system_before = tree_cpu_seconds(server.pid)
    if scenario.tool == "wrk":
        load = run_wrk(scenario, server.base_url, options.connections, options.client_threads, seconds, directory)
    else:
        load = run_h2load(
            scenario, server.base_url, options.connections, options.client_threads, seconds, directory, expected_data_bytes
        )
    user_after, system_after = tree_cpu_seconds(server.pid)
    time.sleep(SETTLE_SECONDS)

    if load.failures:
        raise BenchmarkError(f"{load.failures} failed responses during the run: {load.failure_detail}")
    if load.requests == 0:
        raise BenchmarkError(f"no request completed in {seconds} s")

    log = server.read_log(log_start, server.log_size())
    errors = log.errors.copy()
    if log.cancellations > options.connections:
        errors["ERROR lines about cancelled work, more than one per connection cut off at the deadline"] = log.cancellations
    logged_ok = None
    if scenario.is_rpc:
        logged_ok, logged_failures = count_logged_calls(scenario.path, log.calls, options.connections)
        if logged_failures:
            raise BenchmarkError(f"the server logged failed calls: {'; '.join(logged_failures)}")
    return Measurement(
        load=load,
        server_user_seconds=user_after - user_before,
        server_system_seconds=system_after - system_before,
        logged_ok=logged_ok,
        server_errors=sum(errors.values()),
        server_error_detail="; ".join(f"{count} x {message}" for message, count in errors.most_common(3)),
    )


def measure_scenario(
    scenario: Scenario, server: BenchServer, options: argparse.Namespace, directory: Path, checked: dict[str, int]
) -> ScenarioResult:
    """Check the scenario's response unless it is in `checked`, then warm up and measure.

    `checked` maps each checked scenario to the DATA bytes of one good response (0 when unused).
    """
    if scenario.name not in checked:
        checked[scenario.name] = check_scenario(scenario, server.base_url, server.address)
    expected_data_bytes = checked[scenario.name]
    if options.warmup > 0:
        measure(scenario, server, options, options.warmup, directory, expected_data_bytes)
    measured = measure(scenario, server, options, options.duration, directory, expected_data_bytes)
    load = measured.load
    return ScenarioResult(
        name=scenario.name,
        description=scenario.description,
        tool=scenario.tool,
        requests=load.requests,
        seconds=round(load.seconds, 3),
        requests_per_second=round(load.requests_per_second, 1),
        p50_ms=round(load.p50_ms, 3),
        p99_ms=round(load.p99_ms, 3),
        server_cpu_us_per_request=measured.per_request_us(measured.server_user_seconds + measured.server_system_seconds),
        server_system_cpu_us_per_request=measured.per_request_us(measured.server_system_seconds),
        client_cpu_us_per_request=measured.per_request_us(load.client_cpu_seconds),
        server_logged_ok=measured.logged_ok,
        server_errors=measured.server_errors,
        server_error_detail=measured.server_error_detail,
        note=load.note,
    )


def measure_round(
    scenarios: list[Scenario], server: BenchServer, options: argparse.Namespace, directory: Path, checked: dict[str, int]
) -> tuple[list[ScenarioResult], list[float]]:
    """Measure every scenario, then the raw baseline once more; return the results and both raw rates.

    A failed scenario is recorded with its error and the round goes on, unless it is the raw
    baseline, which every ratio needs, or the server has exited.
    """
    results: list[ScenarioResult] = []
    raw_runs: list[float] = []
    raw = next(s for s in scenarios if s.name == "raw")
    for scenario in [*scenarios, raw]:
        is_repeat = scenario.name == "raw" and bool(raw_runs)
        try:
            result = measure_scenario(scenario, server, options, directory, checked)
        except BenchmarkError as error:
            if not server.is_running():
                raise BenchmarkError(f"the server exited during {scenario.name}; its log ends with:\n{server.log_tail()}") from None
            if scenario.name == "raw":
                raise BenchmarkError(f"raw: {error}") from None
            print(f"   {scenario.name:<14} FAILED: {error}", file=sys.stderr)
            results.append(ScenarioResult(scenario.name, scenario.description, scenario.tool, error=str(error)))
            continue

        print(
            f"   {scenario.name:<14} {result.requests_per_second:>9.0f} req/s  p50 {result.p50_ms:.2f} ms  "
            f"p99 {result.p99_ms:.2f} ms  server CPU {result.server_cpu_us_per_request:.0f} us/req "
            f"({result.server_system_cpu_us_per_request:.0f} system)",
            file=sys.stderr,
        )
        if result.server_errors:
            print(f"   {'':<14} the server logged {result.server_errors} ERROR lines: {result.server_error_detail}", file=sys.stderr)
        if result.note:
            print(f"   {'':<14} {result.note}", file=sys.stderr)
        if scenario.name == "raw":
            raw_runs.append(result.requests_per_second)
        if not is_repeat:
            results.append(result)
    add_ratios(results, raw_runs)
    return results, raw_runs


def add_ratios(results: list[ScenarioResult], raw_runs: list[float]) -> None:
    """Divide each scenario's requests/s by the raw baseline's, which is the mean of the round's two raw runs."""
    raw_baseline = statistics.mean(raw_runs)
    raw_h2c = next((r.requests_per_second for r in results if r.name == "raw-h2c" and not r.error), None)
    for result in results:
        if result.error:
            continue
        result.ratio_to_raw = round(result.requests_per_second / raw_baseline, 4)
        if raw_h2c:
            result.ratio_to_raw_h2c = round(result.requests_per_second / raw_h2c, 4)
    raw_row = next(r for r in results if r.name == "raw")
    raw_row.requests_per_second = round(raw_baseline, 1)
    raw_row.ratio_to_raw = 1.0


def measure_rounds(
    scenarios: list[Scenario], server: BenchServer, options: argparse.Namespace, directory: Path
) -> tuple[list[ScenarioResult], list[float]]:
    """Run options.rounds rounds; return each scenario's median over the rounds and every raw rate.

    Each round's ratios use that round's raw baseline, so a change in the machine's load between
    rounds shifts a ratio less than it shifts requests/s. A scenario that failed is not run again.
    """
    rounds: list[list[ScenarioResult]] = []
    raw_runs: list[float] = []
    checked: dict[str, int] = {}
    for number in range(1, options.rounds + 1):
        if options.rounds > 1:
            print(f"   round {number} of {options.rounds}", file=sys.stderr)
        failed = {r.name for results in rounds for r in results if r.error}
        results, round_raw_runs = measure_round([s for s in scenarios if s.name not in failed], server, options, directory, checked)
        rounds.append(results)
        raw_runs.extend(round_raw_runs)
    return [combine_rounds([r for results in rounds for r in results if r.name == s.name]) for s in scenarios], raw_runs


def combine_rounds(results: list[ScenarioResult]) -> ScenarioResult:
    """Return the median of each measured value over the rounds, or the error of a failed round."""
    failed = next((r for r in results if r.error), None)
    if failed is not None:
        return failed
    combined = ScenarioResult(results[0].name, results[0].description, results[0].tool)
    for name in (
        "requests", "seconds", "requests_per_second", "p50_ms", "p99_ms", "server_cpu_us_per_request",
        "server_system_cpu_us_per_request", "client_cpu_us_per_request", "server_logged_ok", "ratio_to_raw",
        "ratio_to_raw_h2c",
    ):
        values = [getattr(r, name) for r in results if getattr(r, name) is not None]
        if values:
            median = statistics.median(values)
            setattr(combined, name, round(median) if name in ("requests", "server_logged_ok") else round(median, 4))
    combined.server_errors = sum(r.server_errors for r in results)
    combined.server_error_detail = next((r.server_error_detail for r in results if r.server_error_detail), "")
    combined.note = next((r.note for r in results if r.note), "")
    combined.rounds_requests_per_second = [r.requests_per_second for r in results]
    combined.rounds_ratio_to_raw = [r.ratio_to_raw for r in results]
    return combined


def server_version(server: str) -> str:
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        return importlib.metadata.version(server)
    return "not installed"


def run_server_benchmark(server_name: str, options: argparse.Namespace) -> ServerResult:
    """Start one server, check and measure every scenario, and stop it."""
    directory = Path(tempfile.mkdtemp(prefix=f"functions-bench-{server_name}-"))
    env = prepare_environment(directory, options)
    print(f"\n== {server_name}: work directory {directory}", file=sys.stderr)

    run_cli(["migrate"], env)
    token = run_cli(["dev-token", "--uid", BENCH_UID, "--email", BENCH_EMAIL, "--lifetime", "3600"], env)
    scenarios = [s for s in build_scenarios(token) if s.name in options.scenarios or s.name == "raw"]

    server = BenchServer(server_name, env, directory / "server.log")
    server.start()
    try:
        app_pid = find_application_process(server.pid)
        idle_rss_mb = status_kib(app_pid, "VmRSS") / 1024
        print(f"   app process {app_pid}, {idle_rss_mb:.1f} MB RSS idle", file=sys.stderr)

        results, raw_runs = measure_rounds(scenarios, server, options, directory)
        if options.profile:
            profile_scenario(next(s for s in scenarios if s.name == options.profile), server, app_pid, options, directory)

        pids = descendants(server.pid)
        peak_rss_mb = status_kib(app_pid, "VmHWM") / 1024
        return ServerResult(
            server=server_name,
            version=server_version(server_name),
            app_pid=app_pid,
            process_count=len(pids),
            scenarios=results,
            raw_runs=raw_runs,
            idle_rss_mb=round(idle_rss_mb, 1),
            peak_rss_mb=round(peak_rss_mb, 1),
            peak_rss_tree_mb=round(sum(status_kib(pid, "VmHWM") for pid in pids) / 1024, 1),
            targets=evaluate_targets(results, peak_rss_mb),
            log_path=str(server.log_path),
        )
    except BenchmarkError as error:
        raise BenchmarkError(f"{error}\nserver log: {server.log_path}") from None
    finally:
        server.stop()


def profile_scenario(scenario: Scenario, server: BenchServer, app_pid: int, options: argparse.Namespace, directory: Path) -> None:
    """Run the scenario once more with py-spy sampling the app process, then print the hottest functions.

    This run is not in the table: py-spy pauses the process for every sample.
    """
    output = options.profile_output or directory / f"{server.server}-{scenario.name}.collapsed"
    print(f"   profiling {scenario.name} for {options.duration:g} s with py-spy into {output}", file=sys.stderr)
    sampler = start_py_spy(app_pid, options.duration, output)
    try:
        # py-spy needs a moment to attach; the load then covers its whole recording.
        time.sleep(1.0)
        measure(scenario, server, options, options.duration, directory, 0)
    finally:
        finish_py_spy(sampler, output, timeout=options.duration + 60)
    print(summarize_profile(output, options.profile_top))


def evaluate_targets(results: list[ScenarioResult], peak_rss_mb: float) -> list[dict]:
    """Compare each ratio and the peak RSS with its target; a margin is positive when the target is met."""
    targets = []
    for result in results:
        target = TARGET_RATIOS.get(result.name)
        if target is None:
            continue
        if result.ratio_to_raw is None:
            targets.append({"name": f"{result.name} req/s / raw", "value": None, "target": f">= {target}", "met": False,
                            "margin": None, "share_of_target": None, "error": result.error})
            continue
        targets.append({
            "name": f"{result.name} req/s / raw",
            "value": result.ratio_to_raw,
            "target": f">= {target}",
            "met": result.ratio_to_raw >= target,
            "margin": round(result.ratio_to_raw - target, 4),
            "share_of_target": round(result.ratio_to_raw / target, 3),
        })
    targets.append({
        "name": "peak RSS MB of the app process",
        "value": round(peak_rss_mb, 1),
        "target": f"<= {TARGET_PEAK_RSS_MB:g}",
        "met": peak_rss_mb <= TARGET_PEAK_RSS_MB,
        "margin": round(TARGET_PEAK_RSS_MB - peak_rss_mb, 1),
        "share_of_target": round(peak_rss_mb / TARGET_PEAK_RSS_MB, 3),
    })
    return targets


# --- Report -------------------------------------------------------------------------------------


def format_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_server_table(result: ServerResult, options: argparse.Namespace) -> str:
    lines = [
        f"\n{result.server} {result.version}: app process {result.app_pid} ({result.process_count} processes in the tree), "
        f"{options.connections} connections, {options.duration:g} s per scenario after {options.warmup:g} s of warm-up, "
        f"{options.rounds} round{'s' if options.rounds > 1 else ''} (medians)",
        f"{'scenario':<14} {'tool':<7} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'server CPU':>11} {'client CPU':>11} "
        f"{'/ raw':>7} {'/ raw-h2c':>9}",
        f"{'':<14} {'':<7} {'':>9} {'':>8} {'':>8} {'us/req':>11} {'us/req':>11}",
    ]
    for row in result.scenarios:
        if row.error:
            lines.append(f"{row.name:<14} {row.tool:<7} FAILED: {row.error.splitlines()[0]}")
            continue
        lines.append(
            f"{row.name:<14} {row.tool:<7} {row.requests_per_second:>9.0f} {row.p50_ms:>8.2f} {row.p99_ms:>8.2f} "
            f"{row.server_cpu_us_per_request:>11.0f} {row.client_cpu_us_per_request:>11.0f} "
            f"{format_ratio(row.ratio_to_raw):>7} {format_ratio(row.ratio_to_raw_h2c):>9}"
        )
    for row in result.scenarios:
        if row.note:
            lines.append(f"NOTE {row.name}: {row.note}")
        if row.server_errors:
            lines.append(
                f"WARNING {row.name}: the server logged {row.server_errors} ERROR lines in {len(row.rounds_requests_per_second)} "
                f"round(s), for example {row.server_error_detail}"
            )
    low, high = min(result.raw_runs), max(result.raw_runs)
    lines.append(
        f"raw ran at {low:.0f} to {high:.0f} req/s over its {len(result.raw_runs)} runs ({high / low - 1:.0%} apart); "
        "each ratio uses the mean of the raw runs before and after it."
    )
    lines.append(
        f"RSS of the app process: {result.idle_rss_mb:.1f} MB idle, {result.peak_rss_mb:.1f} MB peak (VmHWM); "
        f"sum of VmHWM over the {result.process_count} processes: {result.peak_rss_tree_mb:.1f} MB"
    )
    for target in result.targets:
        lines.append(format_target(target))
    return "\n".join(lines)


def format_target(target: dict) -> str:
    if target["value"] is None:
        return f"MISS {target['name']}: the scenario failed (target {target['target']})"
    verdict = "PASS" if target["met"] else "MISS"
    return (
        f"{verdict} {target['name']}: {target['value']} (target {target['target']}, margin {target['margin']:+}, "
        f"{target['share_of_target']:.0%} of target)"
    )


def format_comparison(results: list[ServerResult]) -> str:
    """Return the servers side by side; requests/s are absolute, so other load on the machine shows in them."""
    first, second = results
    lines = [
        f"\n{first.server} and {second.server}, measured one after the other",
        f"{'scenario':<14} {'req/s':>9} {'req/s':>9} {second.server + '/':>8} {'us/req':>9} {'us/req':>9} "
        f"{'/ raw':>7} {'/ raw':>7}",
        f"{'':<14} {first.server:>9} {second.server:>9} {first.server:>8} {first.server:>9} {second.server:>9} "
        f"{first.server:>7} {second.server:>7}",
    ]
    second_rows = {row.name: row for row in second.scenarios}
    for row in first.scenarios:
        other = second_rows.get(row.name)
        if other is None:
            continue
        if row.error or other.error:
            failed = " and ".join(result.server for result, r in ((first, row), (second, other)) if r.error)
            lines.append(f"{row.name:<14} failed on {failed}")
            continue
        lines.append(
            f"{row.name:<14} {row.requests_per_second:>9.0f} {other.requests_per_second:>9.0f} "
            f"{other.requests_per_second / row.requests_per_second:>8.2f} "
            f"{row.server_cpu_us_per_request:>9.0f} {other.server_cpu_us_per_request:>9.0f} "
            f"{format_ratio(row.ratio_to_raw):>7} {format_ratio(other.ratio_to_raw):>7}"
        )
    lines.append(f"{'peak RSS MB':<14} {first.peak_rss_mb:>9.1f} {second.peak_rss_mb:>9.1f}")
    return "\n".join(lines)


def machine_description() -> dict:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average_at_start": Path("/proc/loadavg").read_text().split()[:3],
    }


# --- Command line -------------------------------------------------------------------------------


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    all_scenarios = [s.name for s in build_scenarios("token")]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", choices=["uvicorn", "pyvoy", "both"], default="both", help="server to measure (default: both)")
    parser.add_argument("--duration", type=int, default=8, help="seconds each scenario is measured (default: 8)")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of unmeasured load before each scenario (default: 2)")
    parser.add_argument(
        "--connections", type=int, default=32, help="concurrent connections, one request in flight on each (default: 32)"
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="times every scenario is measured; the report shows medians (default: 1)"
    )
    parser.add_argument("--client-threads", type=int, default=1, help="threads of wrk and h2load (default: 1)")
    parser.add_argument(
        "--scenarios", default=",".join(all_scenarios),
        help=f"comma-separated scenarios to run; raw always runs (default: {','.join(all_scenarios)})",
    )
    parser.add_argument("--services", default="users", help="ENABLED_SERVICES of the server (default: users, where GetMe is)")
    parser.add_argument("--json", type=Path, help="write the results to this JSON file")
    parser.add_argument("--profile", choices=all_scenarios, help="after measuring, run this scenario again under py-spy")
    parser.add_argument("--profile-output", type=Path, help="collapsed-stack file for --profile (default: in the work directory)")
    parser.add_argument("--profile-top", type=int, default=25, help="functions listed from the profile (default: 25)")
    parser.add_argument("--check-targets", action="store_true", help="exit with status 2 when a target is missed")
    options = parser.parse_args(argv)

    options.scenarios = [name.strip() for name in options.scenarios.split(",") if name.strip()]
    unknown = sorted(set(options.scenarios) - set(all_scenarios))
    if unknown:
        parser.error(f"--scenarios has unknown names {unknown}: known are {all_scenarios}")
    if options.profile and options.profile not in [*options.scenarios, "raw"]:
        parser.error(f"--profile {options.profile} must be one of the scenarios that run: {options.scenarios}")
    if min(options.duration, options.connections, options.client_threads, options.rounds) <= 0:
        parser.error("--duration, --connections, --client-threads and --rounds must be positive")
    if options.warmup < 0:
        parser.error("--warmup must be 0 or more")
    if options.connections < options.client_threads:
        parser.error("--connections must be at least --client-threads: wrk and h2load give every thread a connection")
    return options


def write_json(path: Path, machine: dict, options: argparse.Namespace, results: list[ServerResult], failures: dict) -> None:
    document = {
        "machine": machine,
        "options": {
            "duration_seconds": options.duration,
            "warmup_seconds": options.warmup,
            "connections": options.connections,
            "client_threads": options.client_threads,
            "rounds": options.rounds,
            "services": options.services,
        },
        "target_ratios": TARGET_RATIOS,
        "target_peak_rss_mb": TARGET_PEAK_RSS_MB,
        "results": [asdict(result) for result in results],
        "failures": failures,
    }
    path.write_text(json.dumps(document, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    options = parse_arguments(argv)
    missing = [tool for tool in INSTALL_HINTS if shutil.which(tool) is None]
    if missing:
        hints = "; ".join(f"{tool}: {INSTALL_HINTS[tool]}" for tool in missing)
        print(f"missing load generators {missing}: install them with {hints}", file=sys.stderr)
        return 1

    machine = machine_description()
    print(
        f"machine: {machine['nproc']} CPUs, {machine['cpu_model']}, Linux {machine['kernel']}, "
        f"Python {machine['python']}, load average {' '.join(machine['load_average_at_start'])}"
    )

    results: list[ServerResult] = []
    failures: dict[str, str] = {}
    for server_name in ["uvicorn", "pyvoy"] if options.server == "both" else [options.server]:
        try:
            result = run_server_benchmark(server_name, options)
        except BenchmarkError as error:
            failures[server_name] = str(error)
            print(f"\n{server_name} FAILED: {error}", file=sys.stderr)
            continue
        results.append(result)
        print(format_server_table(result, options))

    if len(results) == 2:
        print(format_comparison(results))
    for server_name, error in failures.items():
        print(f"\n{server_name} FAILED: {error.splitlines()[0]}")
    if options.json:
        write_json(options.json, machine, options, results, failures)
        print(f"\nresults written to {options.json}")

    noisy_scenarios = [f"{result.server} {row.name}" for result in results for row in result.scenarios if row.server_errors]
    if noisy_scenarios:
        print(f"\nWARNING the server logged ERROR lines during: {', '.join(noisy_scenarios)}")
    failed_scenarios = [f"{result.server} {row.name}" for result in results for row in result.scenarios if row.error]
    if failures or failed_scenarios:
        if failed_scenarios:
            print(f"\nFAILED scenarios: {', '.join(failed_scenarios)}")
        return 1
    if options.check_targets and any(not target["met"] for result in results for target in result.targets):
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
