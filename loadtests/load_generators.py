"""Drive a scenario with wrk (HTTP/1.1) or h2load (h2c) and read back what they measured."""

from __future__ import annotations

import re
import resource
import subprocess
from dataclasses import dataclass
from pathlib import Path

from loadtests.scenarios import BenchmarkError, Scenario

INSTALL_HINTS = {
    "wrk": "apt-get install wrk",
    "h2load": "apt-get install nghttp2-client",
}
# wrk counts a request without a response for this long as failed. h2load has no per-request
# timeout: a request that hangs is cut off at the deadline, and the server logs it as canceled.
REQUEST_TIMEOUT_SECONDS = 10


@dataclass
class LoadResult:
    """The client-side figures of one load generator run."""

    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    failures: int
    failure_detail: str
    client_cpu_seconds: float
    # Why `seconds` differs from the requested duration, when it does.
    note: str = ""

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def lua_string(data: bytes) -> str:
    """Quote bytes as a Lua string literal; non-printable bytes become decimal escapes."""
    parts = []
    for byte in data:
        char = chr(byte)
        if char in '"\\' or not 32 <= byte < 127:
            parts.append(f"\\{byte:03d}")
        else:
            parts.append(char)
    return '"' + "".join(parts) + '"'


# wrk runs this in each thread for every response when the scenario is gRPC-Web. A failed gRPC-Web
# call has HTTP status 200 too, so the check reads the gRPC status from a header (trailers-only
# reply) or from the trailer frame at the end of the body.
WRK_GRPC_WEB_CHECK = r"""
function response(status, headers, body)
  local header_status = headers["grpc-status"] or headers["Grpc-Status"]
  local ok = status == 200
  if ok and header_status ~= nil then
    ok = header_status == "0"
  elseif ok then
    ok = string.find(body, "grpc%-status:%s*0\r\n") ~= nil
  end
  if not ok then
    failures = failures + 1
    if failure_detail == "" then
      local printable = (string.gsub(string.sub(body, 1, 200), "[%c\128-\255]", "."))
      failure_detail = "HTTP " .. status .. " grpc-status " .. tostring(header_status) .. " body " .. printable
    end
  end
end
"""

# The summary line that run_wrk parses; latency percentiles are in microseconds.
WRK_SUMMARY = r"""
local threads = {}
function setup(thread)
  table.insert(threads, thread)
end
function done(summary, latency, requests)
  local failures = 0
  local detail = ""
  for _, thread in ipairs(threads) do
    failures = failures + thread:get("failures")
    if detail == "" then detail = thread:get("failure_detail") end
  end
  local errors = summary.errors
  io.write(string.format(
    "BENCH_SUMMARY requests=%d duration_us=%d status_errors=%d connect_errors=%d read_errors=%d write_errors=%d timeouts=%d failures=%d p50_us=%d p99_us=%d\n",
    summary.requests, summary.duration, errors.status, errors.connect, errors.read, errors.write, errors.timeout,
    failures, latency:percentile(50), latency:percentile(99)))
  io.write("BENCH_FAILURE " .. string.gsub(detail, "\n", " ") .. "\n")
end
"""


def write_wrk_script(scenario: Scenario, directory: Path) -> Path:
    """Write the Lua script that makes wrk send the scenario's request and report its summary."""
    lines = [
        f"wrk.method = {lua_string(scenario.method.encode())}",
        f"wrk.body = {lua_string(scenario.body)}",
        *(f"wrk.headers[{lua_string(name.encode())}] = {lua_string(value.encode())}" for name, value in scenario.headers.items()),
        "failures = 0",
        'failure_detail = ""',
    ]
    if scenario.name == "grpc-web":
        lines.append(WRK_GRPC_WEB_CHECK)
    lines.append(WRK_SUMMARY)
    path = directory / f"{scenario.name}.lua"
    path.write_text("\n".join(lines) + "\n")
    return path


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_tool(command: list[str], timeout: float) -> tuple[str, float]:
    """Run a load generator to completion; return its output and the CPU time it used."""
    cpu_before = children_cpu_seconds()
    try:
        completed = subprocess.run(
            command, capture_output=True, encoding="utf-8", errors="replace", timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise BenchmarkError(f"{command[0]} did not finish within {timeout:.0f} s: {' '.join(command)}") from None
    if completed.returncode != 0:
        output = (completed.stderr.strip() or completed.stdout.strip())[-2000:]
        raise BenchmarkError(f"{command[0]} exited with {completed.returncode}: {output}")
    return completed.stdout, children_cpu_seconds() - cpu_before


def run_wrk(scenario: Scenario, base_url: str, connections: int, threads: int, seconds: int, directory: Path) -> LoadResult:
    """Drive an HTTP/1.1 scenario with wrk for `seconds`."""
    script = write_wrk_script(scenario, directory)
    command = [
        "wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", f"{REQUEST_TIMEOUT_SECONDS}s",
        "-s", str(script), base_url + scenario.path,
    ]
    output, client_cpu = run_tool(command, timeout=seconds + 60)

    match = re.search(r"BENCH_SUMMARY (.*)", output)
    if match is None:
        raise BenchmarkError(f"wrk printed no summary line:\n{output}")
    summary = {key: int(value) for key, value in (item.split("=") for item in match.group(1).split())}
    detail_match = re.search(r"BENCH_FAILURE (.*)", output)
    detail = detail_match.group(1).strip() if detail_match else ""

    socket_errors = summary["connect_errors"] + summary["read_errors"] + summary["write_errors"] + summary["timeouts"]
    failures = summary["status_errors"] + summary["failures"] + socket_errors
    if summary["status_errors"] and not detail:
        detail = f"{summary['status_errors']} responses with a status outside 2xx and 3xx"
    if socket_errors:
        detail = (
            f"socket errors: connect {summary['connect_errors']}, read {summary['read_errors']}, "
            f"write {summary['write_errors']}, timeout {summary['timeouts']}; {detail}"
        )
    return LoadResult(
        requests=summary["requests"],
        seconds=summary["duration_us"] / 1e6,
        p50_ms=summary["p50_us"] / 1000,
        p99_ms=summary["p99_us"] / 1000,
        failures=failures,
        failure_detail=detail,
        client_cpu_seconds=client_cpu,
    )


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Return the nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, round(fraction * len(sorted_values)) - 1))
    return sorted_values[index]


def run_h2load(
    scenario: Scenario, base_url: str, connections: int, threads: int, seconds: int, directory: Path,
    expected_data_bytes: int = 0,
) -> LoadResult:
    """Drive an h2c scenario with h2load for `seconds`, one stream in flight per connection.

    h2load counts HTTP statuses but never reads trailers, so a gRPC call that failed with HTTP 200
    looks successful to it. A failed unary call carries no message, so when expected_data_bytes
    (the size of one good response) is given, the DATA bytes received must be the successful
    requests times that size. The server's access log is the second check of the gRPC status.
    """
    request_log = directory / f"{scenario.name}.h2load.log"
    # h2load appends to the log file, and the warm-up run writes the same file.
    request_log.unlink(missing_ok=True)
    command = [
        "h2load", f"-c{connections}", "-m1", f"-t{threads}", "-D", str(seconds),
        f"--log-file={request_log}",
    ]
    for name, value in scenario.headers.items():
        command += ["-H", f"{name}: {value}"]
    if scenario.method == "POST":
        body_file = directory / f"{scenario.name}.body"
        body_file.write_bytes(scenario.body)
        command += ["-d", str(body_file)]
    command.append(base_url + scenario.path)
    output, client_cpu = run_tool(command, timeout=seconds + 60)

    counts = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout", output
    )
    statuses = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", output)
    data = re.search(r"\((\d+)\) data", output)
    finished = re.search(r"finished in ([\d.]+)s", output)
    # Per-client requests/s: min, max, mean, standard deviation. Each client's rate is taken
    # over the time its connection was open.
    client_rates = re.search(r"req/s\s*:\s*([\d.]+)\s+([\d.]+)\s+([\d.]+)", output)
    if not (counts and statuses and data and finished and client_rates):
        raise BenchmarkError(f"h2load output has an unknown format:\n{output}")
    started, succeeded = int(counts.group(2)), int(counts.group(4))
    timeouts = int(counts.group(7))
    non_2xx = int(statuses.group(2)) + int(statuses.group(3)) + int(statuses.group(4))
    data_bytes = int(data.group(1))

    latencies = []
    for line in request_log.read_text().splitlines():
        _start_us, status, latency_us = (int(value) for value in line.split("\t"))
        if 200 <= status < 300:
            latencies.append(latency_us / 1000)
    latencies.sort()

    # h2load does not reconnect when the server closes a connection with GOAWAY, which uvicorn
    # 0.55 (zttp 0.0.35) does after 4096 streams on a connection. A closed connection then sends
    # nothing until the deadline, so the rate is the sum of the clients' rates while connected.
    measured_seconds = float(finished.group(1))
    note = ""
    connected_rate = float(client_rates.group(3)) * connections
    if succeeded and succeeded / measured_seconds < 0.9 * connected_rate:
        measured_seconds = succeeded / connected_rate
        note = (
            f"the server closed connections before the deadline ({succeeded} requests on {connections} connections), "
            f"and h2load does not reconnect: requests/s is the sum of the clients' rates while connected"
        )

    # h2load stops every client at the deadline and counts the requests in flight then as not
    # done or as failed. At most one request per connection can be in flight.
    cut_off = started - succeeded
    failures = non_2xx + timeouts
    details = []
    if non_2xx:
        details.append(f"{non_2xx} responses with a status outside 2xx")
    if timeouts:
        details.append(f"{timeouts} connections timed out")
    if cut_off > connections:
        failures += cut_off - connections
        details.append(f"{started} requests started, {succeeded} succeeded: more than the {connections} cut off at the deadline")
    if expected_data_bytes:
        low, high = succeeded * expected_data_bytes, (succeeded + cut_off) * expected_data_bytes
        if not low <= data_bytes <= high:
            missing = max(0, low - data_bytes) // expected_data_bytes
            failures += max(1, missing)
            details.append(
                f"received {data_bytes} DATA bytes for {succeeded} responses of {expected_data_bytes} bytes: "
                f"about {missing} responses carried no message"
            )
    return LoadResult(
        requests=succeeded,
        seconds=measured_seconds,
        p50_ms=percentile(latencies, 0.50),
        p99_ms=percentile(latencies, 0.99),
        failures=failures,
        failure_detail="; ".join(details),
        client_cpu_seconds=client_cpu,
        note=note,
    )
