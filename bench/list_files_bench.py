#!/usr/bin/env python3
"""Benchmark list_files_server.py against nginx and a naive server.

One command builds the data sets, starts the three servers side by side
on 127.0.0.1 for each of them, measures, and prints a Markdown table:

    python3 bench/list_files_bench.py
    python3 bench/list_files_bench.py --sizes 100,10000 --duration 5

The servers, each listing the same flat directory of N files:

- nginx from Debian, `autoindex on; autoindex_format json;`, with the
  configuration generated from bench/nginx.conf.template;
- bench/naive_list_server.py, a ThreadingHTTPServer that rescans the
  directory on every request;
- the project's list_files_server.py at its defaults, run from a copy
  taken when the run starts (its commit and hash go into the report).

For a data set small enough to come back in one response (up to
--max-entries, the project server's default maximum per response), each
server is checked once (the response must hold every file, uncompressed)
and then loaded with wrk (16 connections, --latency): a warm-up, then
--rounds timed runs interleaved between the servers, the median kept:
requests/s, p50 and p99 latency, peak RSS (VmHWM summed over the
server's process tree). Larger data sets are fetched whole instead:
the project server page after page, following `next`, against the
"floor" (os.scandir, one stat per entry and json.dumps of the same
fields, timed in this process), and nginx and the naive server in one
response each, for reference.

Results go to stdout (Markdown), progress to stderr, and a JSON record
to bench/results/. docs/list_files_bench.md explains the comparison.

Environment variables: none; the project server gets PYTHONUNBUFFERED=1
like the naive one, as the container image sets it.

Exit codes: 0 when every server answered correctly (even if a target is
missed, unless --fail-on-miss), 1 when a server failed to start, gave a
wrong or incomplete answer, a tool is missing, or wrk failed; 2 for bad
usage; 3 when --fail-on-miss is given and a target is missed; 130 on
Ctrl-C or SIGTERM. Every process started here is stopped on exit.

Limitations:
- Client and servers share the same cores: wrk's own CPU use is part of
  every figure, and other load on the machine shows as noise.
- Peak RSS sums VmHWM over processes, so pages shared between nginx's
  master and workers are counted more than once (in nginx's disfavour).
- The data sets are flat directories of empty-ish sparse files; deep
  trees and slow file systems are not measured.
"""

import argparse
import hashlib
import http.client
import json
import logging
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import string
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

import naive_list_server  # noqa: E402

DEFAULT_SIZES = (100, 10_000, 100_000, 1_000_000)
SERVER_NAMES = ("nginx", "naive", "project")
APT_HINT = "apt-get install -y wrk nginx-light"
READY_TIMEOUT = 20.0
REQUEST_TIMEOUT = 900.0
SETTLE_SECONDS = 2.0
MB = 1_000_000

TARGET_IDLE_RSS = 25 * MB
TARGET_PAGED_RSS = 250 * MB
TARGET_PAGED_RATIO = 1.5
TARGET_SMALL_RATIO = 1.0
TARGET_LARGE_RATIO = 10.0

log = logging.getLogger("list_files_bench")


class BenchError(Exception):
    """A failure that makes the run's figures meaningless."""


# ---------------------------------------------------------------- data


def file_name(index):
    return f"file-{index:07d}.dat"


def data_set_path(data_dir, count):
    return data_dir / f"files-{count}"


def ensure_data_set(data_dir, count):
    """Create (or reuse) a flat directory of `count` files.

    Sizes are sparse (ftruncate) and mtimes spread over a year, so that
    no server gets away with one formatted timestamp for all entries.
    A marker beside the directory records that it was completed.
    """
    directory = data_set_path(data_dir, count)
    marker = directory.with_name(directory.name + ".complete")
    if marker.exists() and marker.read_text().strip() == str(count):
        found = len(os.listdir(directory))
        if found == count:
            log.info("reusing %s (%d files)", directory, count)
            return directory
        log.info("%s holds %d entries, not %d", directory, found, count)
        marker.unlink()

    log.info("creating %s (%d files)", directory, count)
    started = time.monotonic()
    directory.mkdir(parents=True, exist_ok=True)
    # nginx's workers run as www-data and must read the data set.
    os.chmod(data_dir, 0o755)  # noqa: S103
    os.chmod(directory, 0o755)  # noqa: S103
    now_ns = time.time_ns()
    year_seconds = 365 * 86400
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
    for index in range(count):
        fd = os.open(directory / file_name(index), flags, 0o644)
        try:
            os.ftruncate(fd, (index * 2654435761) % 1_000_003)
            age_ns = ((index * 7919) % year_seconds) * 1_000_000_000
            os.utime(fd, ns=(now_ns, now_ns - age_ns))
        finally:
            os.close(fd)

    found = len(os.listdir(directory))
    if found != count:
        raise BenchError(
            f"{directory} holds {found} entries, expected {count}; "
            "remove it and run again"
        )
    marker.write_text(f"{count}\n")
    log.info("created in %.1f s", time.monotonic() - started)
    return directory


def wait_until_unchanged(directory):
    """Let a just-written directory age past timestamp granularity.

    A server that caches may (rightly) refuse to trust a listing of a
    directory changed within the last moment; the benchmark measures an
    unchanged directory, so it waits that moment out.
    """
    age = time.time() - os.stat(directory).st_mtime
    if age < SETTLE_SECONDS:
        time.sleep(SETTLE_SECONDS - age)


def expected_names(count):
    return {file_name(index) for index in range(count)}


# ------------------------------------------------------------- processes


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def process_tree(root_pid):
    """Return `root_pid` and all its descendants found in /proc."""
    children = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as stream:
                stat_line = stream.read()
        except OSError:
            continue
        after_name = stat_line.rpartition(b")")[2].split()
        parent = int(after_name[1])
        children.setdefault(parent, []).append(int(entry.name))
    tree, pending = [], [root_pid]
    while pending:
        pid = pending.pop()
        tree.append(pid)
        pending.extend(children.get(pid, []))
    return tree


def status_kib(pid, key):
    try:
        with open(f"/proc/{pid}/status") as stream:
            for line in stream:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_ticks(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as stream:
                fields = stream.read().rpartition(b")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total


@dataclass
class ServerProcess:
    """One server under test, started in its own process group."""

    name: str
    argv: list
    url: str
    port: int
    workdir: Path
    env: dict = field(default_factory=lambda: dict(os.environ))
    process: subprocess.Popen = None
    idle_rss: int = 0

    def start(self):
        out = open(self.workdir / f"{self.name}.out", "wb")  # noqa: SIM115
        err = open(self.workdir / f"{self.name}.err", "wb")  # noqa: SIM115
        with out, err:
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=self.env,
                start_new_session=True,
            )

    def stderr_tail(self, lines=15):
        path = self.workdir / f"{self.name}.err"
        try:
            text = path.read_text(errors="backslashreplace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self):
        """Wait until the port accepts a connection (no request sent)."""
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchError(
                    f"{self.name} exited with {self.process.returncode} "
                    f"before listening:\n{self.stderr_tail()}"
                )
            try:
                with socket.create_connection(
                    ("127.0.0.1", self.port), timeout=1
                ):
                    return
            except OSError:
                time.sleep(0.05)
        raise BenchError(
            f"{self.name} did not listen on port {self.port} within "
            f"{READY_TIMEOUT:.0f} s:\n{self.stderr_tail()}"
        )

    def pids(self):
        return process_tree(self.process.pid)

    def rss(self):
        """Resident memory now, in bytes, summed over the tree."""
        return sum(status_kib(p, "VmRSS") for p in self.pids()) * 1024

    def peak_rss(self):
        """Peak resident memory so far, in bytes, summed over the tree."""
        return sum(status_kib(p, "VmHWM") for p in self.pids()) * 1024

    def wait_idle(self, timeout=180.0):
        """Wait until the tree stops using CPU (requests drained)."""
        deadline = time.monotonic() + timeout
        quiet, last = 0, cpu_ticks(self.pids())
        while time.monotonic() < deadline:
            time.sleep(0.25)
            now = cpu_ticks(self.pids())
            quiet = quiet + 1 if now - last <= 1 else 0
            last = now
            if quiet >= 3:
                return
        log.warning("%s still busy after %.0f s", self.name, timeout)

    def check_alive(self):
        if self.process.poll() is not None:
            raise BenchError(
                f"{self.name} exited with {self.process.returncode}:\n"
                f"{self.stderr_tail()}"
            )

    def stop(self):
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=10)
        except (ProcessLookupError, PermissionError):
            return
        except subprocess.TimeoutExpired:
            log.warning("%s ignored SIGTERM; killing it", self.name)
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


def nginx_server(nginx, directory, workdir):
    if re.search(r'["$;{}\\\s]', str(directory)):
        raise BenchError(f"nginx cannot be given this path: {directory}")
    prefix = workdir / "nginx"
    prefix.mkdir()
    port = free_port()
    template = string.Template((BENCH_DIR / "nginx.conf.template").read_text())
    config = prefix / "nginx.conf"
    config.write_text(
        template.substitute(prefix=prefix, port=port, directory=directory)
    )
    return ServerProcess(
        name="nginx",
        argv=[nginx, "-e", "stderr", "-p", str(prefix), "-c", str(config)],
        url=f"http://127.0.0.1:{port}/files/",
        port=port,
        workdir=workdir,
    )


def python_server(python, name, script, directory, workdir, cpus=None):
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    argv = [python, str(script), "--dir", str(directory)]
    argv += ["--port", str(port), "--host", "127.0.0.1"]
    if cpus:
        # taskset execs the server: same process, every thread pinned
        argv = ["taskset", "--cpu-list", cpus, *argv]
    return ServerProcess(
        name=name,
        argv=argv,
        url=f"http://127.0.0.1:{port}/files",
        port=port,
        workdir=workdir,
        env=env,
    )


# ------------------------------------------------------------------ http


def fetch(url, connection=None):
    """GET `url`; return (status, headers, body, seconds)."""
    parts = urllib.parse.urlsplit(url)
    own = connection is None
    if own:
        connection = http.client.HTTPConnection(
            parts.hostname, parts.port, timeout=REQUEST_TIMEOUT
        )
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    try:
        started = time.perf_counter()
        connection.request("GET", target)
        response = connection.getresponse()
        body = response.read()
        seconds = time.perf_counter() - started
    except (OSError, http.client.HTTPException) as error:
        raise BenchError(f"GET {url} failed: {error}") from error
    finally:
        if own:
            connection.close()
    return response.status, response.headers, body, seconds


def require_plain_ok(server, status, headers, url):
    if status != 200:
        raise BenchError(f"{server.name}: GET {url} gave status {status}")
    encoding = headers.get("Content-Encoding")
    if encoding:
        raise BenchError(
            f"{server.name}: GET {url} came back {encoding}-encoded "
            "although no Accept-Encoding was sent"
        )


def entries_of(server, body):
    """Return the list of entries in a listing body of `server`."""
    document = json.loads(body)
    if server.name == "nginx":
        return document, None
    return document["files"], document


def check_single_response(server, count):
    """Fetch one listing; fail unless it holds all `count` files."""
    status, headers, body, seconds = fetch(server.url)
    require_plain_ok(server, status, headers, server.url)
    try:
        entries, document = entries_of(server, body)
    except (ValueError, KeyError, TypeError) as error:
        raise BenchError(f"{server.name}: not a listing: {error}") from error

    names = [entry.get("name") for entry in entries]
    problems = []
    if len(names) != count:
        problems.append(f"{len(names)} entries instead of {count}")
    elif set(names) != expected_names(count):
        problems.append("the names are not the data set's")
    if document is not None:
        if document.get("count") != count:
            problems.append(f"count is {document.get('count')!r}")
        if document.get("next") is not None:
            problems.append(f"next is {document.get('next')!r}, not null")
    if entries:
        missing = {"name", "type", "size", "mtime"} - set(entries[0])
        if missing:
            problems.append(f"entries lack {sorted(missing)}")
    if problems:
        raise BenchError(
            f"{server.name}: GET {server.url} does not return the whole "
            f"listing in one response: {'; '.join(problems)}"
        )
    log.info(
        "%s: %d entries, %d bytes in %.3f s",
        server.name,
        count,
        len(body),
        seconds,
    )
    return {"bytes": len(body), "seconds": seconds}


# ------------------------------------------------------------------- wrk


WRK_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
BYTE_UNITS = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}
BYTE_UNITS["TB"] = 1024**4


def wrk_seconds(text):
    number, unit = re.fullmatch(r"([\d.]+)([a-z]+)", text).groups()
    return float(number) * WRK_UNITS[unit]


def parse_wrk(output):
    """Pull the figures this benchmark reports out of wrk's text."""
    found = re.search(r"Requests/sec:\s+([\d.]+)", output)
    totals = re.search(
        r"(\d+) requests in ([\d.]+\w+), ([\d.]+)([KMGT]?B) read", output
    )
    if not found or not totals:
        raise BenchError(f"cannot read wrk's output:\n{output}")
    result = {
        "requests_per_second": float(found.group(1)),
        "requests": int(totals.group(1)),
        "bytes_read": float(totals.group(3)) * BYTE_UNITS[totals.group(4)],
    }
    for percent in ("50", "75", "90", "99"):
        match = re.search(rf"^\s+{percent}%\s+([\d.]+\w+)", output, re.M)
        if match:
            result[f"p{percent}_seconds"] = wrk_seconds(match.group(1))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    result["non_2xx"] = int(non_2xx.group(1)) if non_2xx else 0
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), "
        r"timeout (\d+)",
        output,
    )
    result["socket_errors"] = (
        dict(
            zip(
                ("connect", "read", "write", "timeout"),
                map(int, errors.groups()),
                strict=True,
            )
        )
        if errors
        else {}
    )
    return result


def run_wrk(args, url, seconds, latency=True):
    argv = [args.wrk, "-t", str(args.threads), "-c", str(args.connections)]
    argv += ["-d", f"{seconds}s", "--timeout", f"{args.wrk_timeout}s"]
    if latency:
        argv.append("--latency")
    argv.append(url)
    try:
        result = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=seconds + args.wrk_timeout + 60,
            check=False,
        )
    except subprocess.TimeoutExpired as error:
        raise BenchError(f"wrk did not finish: {' '.join(argv)}") from error
    if result.returncode != 0:
        raise BenchError(
            f"wrk exited with {result.returncode}: {result.stderr.strip()}"
        )
    return result.stdout


def run_duration(args, single_seconds):
    """Seconds for a timed run: --duration, or long enough for each
    connection to complete about five responses if one response takes
    a while (`single_seconds`, one request after the warm-up, as if the
    server answered one at a time), capped at --max-duration.  Five, not
    three: a server that slows down under concurrency (the naive one,
    its threads fighting over the GIL) finishes its first round of
    responses later than connections x single_seconds."""
    wanted = 5 * args.connections * single_seconds
    return int(min(max(args.duration, wanted), args.max_duration) + 0.999)


def timed_run(args, server, seconds, check):
    """One wrk run against `server`; fail on anything but full 2xx."""
    log.info("%s: timed run, %d s", server.name, seconds)
    output = run_wrk(args, server.url, seconds)
    server.wait_idle()
    server.check_alive()
    result = parse_wrk(output)
    result["duration"] = seconds
    result["wrk_output"] = output

    if result["non_2xx"]:
        raise BenchError(
            f"{server.name}: {result['non_2xx']} responses were not 2xx "
            f"under load:\n{output}"
        )
    if result["requests"] == 0:
        raise BenchError(
            f"{server.name}: no request completed in {seconds} s "
            f"(raise --max-duration):\n{output}"
        )
    per_request = result["bytes_read"] / result["requests"]
    if per_request < 0.98 * check["bytes"]:
        raise BenchError(
            f"{server.name}: {per_request:.0f} bytes per response under "
            f"load, but the checked listing has {check['bytes']}"
        )
    if any(result["socket_errors"].values()):
        log.warning(
            "%s: socket errors %s", server.name, result["socket_errors"]
        )
    log.info(
        "%s: %.1f requests/s (%d requests), p50 %s, p99 %s",
        server.name,
        result["requests_per_second"],
        result["requests"],
        format_seconds(result.get("p50_seconds")),
        format_seconds(result.get("p99_seconds")),
    )
    return result


def load_test(args, servers, count):
    """Check, warm up, then time every server in interleaved rounds.

    Rounds alternate between the servers so that a change in the
    machine's background load hits them alike; each server's figures
    come from its median round by requests/s.
    """
    checks = {s.name: check_single_response(s, count) for s in servers}
    durations = {}
    for server in servers:
        if args.warmup > 0:
            log.info("%s: warm-up, %d s", server.name, args.warmup)
            run_wrk(args, server.url, args.warmup, latency=False)
        server.wait_idle()
        server.check_alive()
        status, headers, _, seconds = fetch(server.url)
        require_plain_ok(server, status, headers, server.url)
        durations[server.name] = run_duration(args, seconds)

    rounds = {s.name: [] for s in servers}
    for number in range(1, args.rounds + 1):
        log.info("round %d of %d, %d files", number, args.rounds, count)
        for server in servers:
            seconds = durations[server.name]
            check = checks[server.name]
            result = timed_run(args, server, seconds, check)
            rounds[server.name].append(result)

    results = {}
    for server in servers:
        runs = sorted(
            rounds[server.name], key=lambda r: r["requests_per_second"]
        )
        result = dict(runs[(len(runs) - 1) // 2])
        result["rounds_requests_per_second"] = [
            r["requests_per_second"] for r in rounds[server.name]
        ]
        result["peak_rss"] = server.peak_rss()
        result["idle_rss"] = server.idle_rss
        result["response_bytes"] = checks[server.name]["bytes"]
        results[server.name] = result
        log.info(
            "%s: median %.1f requests/s, peak RSS %s",
            server.name,
            result["requests_per_second"],
            format_bytes(result["peak_rss"]),
        )
    return results


# ----------------------------------------------------------- whole lists


def next_link(body):
    """Find the top-level `next` member without parsing the whole page.

    An unescaped `"next"` can only be a key, and entries carry no such
    key, so the first one found is the document's.
    """
    at = body.find(b'"next"')
    if at < 0:
        return None
    rest = body[at + len(b'"next"') :].lstrip()
    if not rest.startswith(b":"):
        return None
    value, _ = json.JSONDecoder().raw_decode(rest[1:].lstrip().decode())
    return value


def fetch_all_pages(server):
    """Follow `next` from /files to the end; return (seconds, pages)."""
    parts = urllib.parse.urlsplit(server.url)
    connection = http.client.HTTPConnection(
        parts.hostname, parts.port, timeout=REQUEST_TIMEOUT
    )
    url, pages, total = server.url, [], 0.0
    try:
        while url is not None:
            status, headers, body, seconds = fetch(url, connection)
            require_plain_ok(server, status, headers, url)
            total += seconds
            pages.append(body)
            link = next_link(body)
            url = urllib.parse.urljoin(url, link) if link else None
            if len(pages) > 100_000:
                raise BenchError(f"{server.name}: paging does not end")
    finally:
        connection.close()
    return total, pages


def check_pages(server, pages, count):
    names = []
    for body in pages:
        names.extend(entry["name"] for entry in json.loads(body)["files"])
    if len(names) != count or set(names) != expected_names(count):
        raise BenchError(
            f"{server.name}: {len(pages)} pages held {len(names)} "
            f"entries ({len(set(names))} distinct) instead of the "
            f"{count} files"
        )


def time_floor(directory, repeats):
    """Time os.scandir + lstat + json.dumps in this process."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        naive_list_server.listing_document(directory)
        times.append(time.perf_counter() - started)
    return times


def fetch_whole(server, count, attempt):
    """Fetch every entry from `server` once; return (seconds, pages).

    The first attempt also checks that each file came exactly once.
    """
    if server.name == "project":
        seconds, pages = fetch_all_pages(server)
        if attempt == 0:
            check_pages(server, pages, count)
        log.info("project: %d pages in %.3f s", len(pages), seconds)
        return seconds, len(pages)
    if attempt == 0:
        seconds = check_single_response(server, count)["seconds"]
    else:
        status, headers, _, seconds = fetch(server.url)
        require_plain_ok(server, status, headers, server.url)
    log.info("%s: 1 response in %.3f s", server.name, seconds)
    return seconds, 1


def whole_listing_test(args, servers, count, directory, floor):
    """Fetch every entry once per repeat from each server.

    Each repeat times the floor first and the project server right
    after it, so that the two compared figures see the same background
    load; the project server's first fetch is its uncached one.
    `floor` collects the floor timings.
    """
    order = sorted(servers, key=lambda s: s.name != "project")
    times = {s.name: [] for s in servers}
    pages = {}
    for attempt in range(args.repeats):
        floor += time_floor(directory, 1)
        log.info("floor: %.3f s", floor[-1])
        for server in order:
            seconds, pages[server.name] = fetch_whole(server, count, attempt)
            times[server.name].append(seconds)
            server.wait_idle()
            server.check_alive()

    results = {}
    for server in servers:
        taken = times[server.name]
        results[server.name] = {
            "seconds": taken,
            "first_seconds": taken[0],
            "median_seconds": statistics.median(taken),
            "pages": pages[server.name],
            "ratio_to_floor": taken[0] / min(floor),
            "peak_rss": server.peak_rss(),
            "idle_rss": server.idle_rss,
        }
    return results


# ---------------------------------------------------------------- report


def format_seconds(seconds):
    if seconds is None:
        return "n/a"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 0.001:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} µs"


def format_bytes(count):
    return f"{count / MB:.1f} MB"


def format_ratio(value, reference):
    if not reference or value is None:
        return "n/a"
    return f"{value / reference:.2f}x"


def load_table(results):
    lines = [
        "| files | server | req/s | p50 | p99 | peak RSS | idle RSS "
        "| req/s vs nginx | p50 vs nginx | p99 vs nginx "
        "| peak RSS vs nginx | median run | req/s of each round |",
        "|" + "---|" * 13,
    ]
    for count, by_server in results.items():
        nginx = by_server.get("nginx", {})
        for name, row in by_server.items():
            cells = [
                f"{count:,}",
                name,
                f"{row['requests_per_second']:,.1f}",
                format_seconds(row.get("p50_seconds")),
                format_seconds(row.get("p99_seconds")),
                format_bytes(row["peak_rss"]),
                format_bytes(row["idle_rss"]),
            ]
            cells += [
                format_ratio(row.get(key), nginx.get(key))
                for key in (
                    "requests_per_second",
                    "p50_seconds",
                    "p99_seconds",
                    "peak_rss",
                )
            ]
            run = f"{row['requests']:,} in {row['duration']} s"
            errors = sum(row["socket_errors"].values())
            if errors:
                run += f", {errors} socket errors"
            cells.append(run)
            cells.append(
                ", ".join(
                    f"{value:,.1f}"
                    for value in row["rounds_requests_per_second"]
                )
            )
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def whole_table(results, floors):
    lines = [
        "| files | server | responses | first fetch | median | fastest "
        "| first vs floor | peak RSS | idle RSS |",
        "|" + "---|" * 9,
    ]
    for count, by_server in results.items():
        times = floors[count]
        lines.append(
            f"| {count:,} | floor (in-process) | - "
            f"| {format_seconds(times[0])} "
            f"| {format_seconds(statistics.median(times))} "
            f"| {format_seconds(min(times))} | 1.00x | - | - |"
        )
        for name, row in by_server.items():
            lines.append(
                f"| {count:,} | {name} | {row['pages']} "
                f"| {format_seconds(row['first_seconds'])} "
                f"| {format_seconds(row['median_seconds'])} "
                f"| {format_seconds(min(row['seconds']))} "
                f"| {row['ratio_to_floor']:.2f}x "
                f"| {format_bytes(row['peak_rss'])} "
                f"| {format_bytes(row['idle_rss'])} |"
            )
    return lines


def target(description, measured, met):
    return {"target": description, "measured": measured, "met": met}


def evaluate_targets(load_results, whole_results, idle_rss):
    """Return one {"target", "measured", "met"} dict per target."""
    targets = []
    for count, by_server in load_results.items():
        project, nginx = by_server.get("project"), by_server.get("nginx")
        if not project or not nginx:
            continue
        wanted = TARGET_SMALL_RATIO if count <= 100 else TARGET_LARGE_RATIO
        ratio = project["requests_per_second"] / nginx["requests_per_second"]
        targets.append(
            target(
                f"{count:,} files: req/s >= {wanted:g}x nginx",
                f"{ratio:.2f}x",
                ratio >= wanted,
            )
        )
    for count, by_server in whole_results.items():
        project = by_server.get("project")
        if not project:
            continue
        ratio = project["ratio_to_floor"]
        targets.append(
            target(
                f"{count:,} files: all pages <= "
                f"{TARGET_PAGED_RATIO:g}x floor (first fetch)",
                f"{ratio:.2f}x",
                ratio <= TARGET_PAGED_RATIO,
            )
        )
        targets.append(
            target(
                f"{count:,} files: peak RSS < "
                f"{format_bytes(TARGET_PAGED_RSS)}",
                format_bytes(project["peak_rss"]),
                project["peak_rss"] < TARGET_PAGED_RSS,
            )
        )
    if idle_rss:
        worst = max(idle_rss)
        targets.append(
            target(
                f"idle RSS < {format_bytes(TARGET_IDLE_RSS)}",
                format_bytes(worst),
                worst < TARGET_IDLE_RSS,
            )
        )
    return targets


def print_report(report):
    lines = [
        f"## list_files_server.py benchmark, {report['date']}",
        "",
        describe_server(report["project_server"])
        + (
            f", pinned to CPU {report['settings']['project_cpus']} (taskset)."
            if report["settings"].get("project_cpus")
            else "."
        ),
        "",
        f"{report['machine']['cpus']} CPUs, {report['machine']['kernel']},"
        f" Python {report['machine']['python']}, "
        f"{report['machine']['nginx']}, {report['machine']['wrk']}; "
        f"wrk -t{report['settings']['threads']} "
        f"-c{report['settings']['connections']} --latency, "
        f"{report['settings']['rounds']} interleaved rounds of "
        f"{report['settings']['duration']} s or more (up to "
        f"{report['settings']['max_duration']} s for slow servers) "
        f"after {report['settings']['warmup']} s of warm-up; load "
        f"average {report['load_before']} before, "
        f"{report['load_after']} after.",
        "",
    ]
    if report["load"]:
        lines += ["### One response per request, under wrk", ""]
        lines += [*load_table(report["load"]), ""]
    if report["whole"]:
        lines += ["### Every entry, fetched once per repeat", ""]
        lines += [*whole_table(report["whole"], report["floors"]), ""]
    if report["targets"]:
        lines += ["### Targets", ""]
        lines += ["| target | measured | result |", "|---|---|---|"]
        for row in report["targets"]:
            verdict = "met" if row["met"] else "**MISSED**"
            lines.append(
                f"| {row['target']} | {row['measured']} | {verdict} |"
            )
        lines.append("")
    print("\n".join(lines))


def machine_info(args):
    def first_line(argv):
        try:
            result = subprocess.run(
                argv, capture_output=True, text=True, timeout=10, check=False
            )
        except OSError:
            return "unknown"
        text = (result.stdout + result.stderr).strip().splitlines()
        return text[0] if text else "unknown"

    nginx = first_line([args.nginx, "-v"]).replace("nginx version: ", "")
    wrk = first_line([args.wrk, "-v"]).split(" [")[0]
    return {
        "cpus": os.cpu_count(),
        "kernel": f"Linux {platform.release()}",
        "python": platform.python_version(),
        "nginx": nginx,
        "wrk": wrk,
    }


def load_average():
    with open("/proc/loadavg") as stream:
        return " ".join(stream.read().split()[:3])


# ------------------------------------------------------------------ main


def parse_sizes(text):
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        message = f"not a list of counts: {text}"
        raise argparse.ArgumentTypeError(message) from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"counts must be >= 1: {text}")
    return sizes


def parse_servers(text):
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = set(names) - set(SERVER_NAMES)
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"servers are {', '.join(SERVER_NAMES)}: {text}"
        )
    return names


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=(
            "Benchmark list_files_server.py against nginx autoindex and "
            "a naive ThreadingHTTPServer, in one run."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog=(
            "Exit codes: 0 measured, 1 a server or tool failed or "
            "answered wrongly, 2 usage, 3 a target missed (with "
            "--fail-on-miss), 130 interrupted. "
            "See docs/list_files_bench.md."
        ),
    )
    parser.add_argument(
        "--sizes",
        type=parse_sizes,
        default=",".join(map(str, DEFAULT_SIZES)),
        help="comma-separated file counts of the data sets",
    )
    parser.add_argument(
        "--duration", type=int, default=10, help="seconds of each wrk run"
    )
    parser.add_argument(
        "--max-duration",
        type=int,
        default=120,
        help="longest timed run, for servers that need more than "
        "--duration to answer each connection three times",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="timed runs per server, interleaved; the median is reported",
    )
    parser.add_argument(
        "--warmup", type=int, default=3, help="seconds of wrk warm-up"
    )
    parser.add_argument("--connections", type=int, default=16, help="wrk -c")
    parser.add_argument("--threads", type=int, default=2, help="wrk -t")
    parser.add_argument(
        "--wrk-timeout", type=int, default=60, help="wrk --timeout, s"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="whole fetches (and floor timings) per large data set",
    )
    parser.add_argument(
        "--max-entries",
        type=int,
        default=100_000,
        help="the project server's default maximum entries per response; "
        "larger data sets are fetched whole instead of under wrk",
    )
    parser.add_argument(
        "--servers",
        type=parse_servers,
        default=",".join(SERVER_NAMES),
        help="comma-separated subset of " + ",".join(SERVER_NAMES),
    )
    parser.add_argument(
        "--server",
        type=Path,
        default=REPO_ROOT / "list_files_server.py",
        help="the project server's script",
    )
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="interpreter that runs both Python servers",
    )
    parser.add_argument(
        "--project-cpus",
        metavar="LIST",
        help="run the project server under taskset --cpu-list LIST, "
        "e.g. 1: its threads share one GIL, and on one CPU handing it "
        "over is cheap (default: not pinned, as the other servers)",
    )
    parser.add_argument("--nginx", default="/usr/sbin/nginx", help="nginx")
    parser.add_argument("--wrk", default="/usr/bin/wrk", help="wrk")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=BENCH_DIR / "data",
        help="where the data sets are built and reused",
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=BENCH_DIR / "results",
        help="where the JSON record of the run goes",
    )
    parser.add_argument(
        "--fail-on-miss",
        action="store_true",
        help="exit 3 when a performance target is missed",
    )
    args = parser.parse_args(argv)
    if args.connections < args.threads or args.threads < 1:
        parser.error("--connections must be >= --threads >= 1")
    if min(args.duration, args.repeats, args.rounds) < 1:
        parser.error("--duration, --repeats and --rounds must be >= 1")
    if args.warmup < 0 or args.max_duration < args.duration:
        parser.error("--warmup must be >= 0, --max-duration >= --duration")
    return args


def check_tools(args):
    for tool, path in (("wrk", args.wrk), ("nginx", args.nginx)):
        if tool == "nginx" and "nginx" not in args.servers:
            continue
        if not os.access(path, os.X_OK):
            raise BenchError(f"{tool} not found at {path}; {APT_HINT}")
    if "project" in args.servers and not args.server.is_file():
        raise BenchError(f"project server not found: {args.server}")
    if args.project_cpus and shutil.which("taskset") is None:
        raise BenchError("--project-cpus needs taskset (util-linux)")


def stop_all(running):
    """Stop every server in `running`, emptying it."""
    while running:
        running.pop().stop()


def start_servers(args, directory, workdir, running):
    """Start the selected servers; each joins `running` once spawned."""
    servers = []
    for name in args.servers:
        if name == "nginx":
            server = nginx_server(args.nginx, directory, workdir)
        elif name == "naive":
            script = BENCH_DIR / "naive_list_server.py"
            server = python_server(
                args.python, "naive", script, directory, workdir
            )
        else:
            server = python_server(
                args.python,
                "project",
                args.server,
                directory,
                workdir,
                args.project_cpus,
            )
        server.start()
        servers.append(server)
        running.append(server)
    for server in servers:
        server.wait_ready()
    time.sleep(0.5)
    for server in servers:
        server.check_alive()
        server.idle_rss = server.rss()
        log.info(
            "%s listening on port %d, idle RSS %s",
            server.name,
            server.port,
            format_bytes(server.idle_rss),
        )
    return servers


def snapshot_server(script, run_dir):
    """Copy the project server for this run; describe its version.

    The author may edit the file while a long run goes on; every data
    set runs the copy taken at the start, so one run measures one
    version.
    """
    copy = run_dir / script.name
    shutil.copy2(script, copy)
    content = copy.read_bytes()

    def git(*argv):
        return subprocess.run(
            ["git", "-C", str(script.parent), *argv],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    last = git("log", "-1", "--format=%h %cI", "--", script.name)
    dirty = git("diff", "--quiet", "HEAD", "--", script.name).returncode
    info = {
        "path": str(script),
        "sha256": hashlib.sha256(content).hexdigest(),
        "last_commit": last.stdout.strip() or "not in git",
        "uncommitted_changes": dirty != 0,
    }
    return copy, info


def describe_server(info):
    if info is None:
        return "project server not run"
    text = f"list_files_server.py at {info['last_commit'].split()[0]}"
    if info["uncommitted_changes"]:
        text += " plus uncommitted changes"
    return f"{text} (sha256 {info['sha256'][:12]})"


def benchmark(args, running, run_dir):
    project_info = None
    if "project" in args.servers:
        args.server, project_info = snapshot_server(args.server, run_dir)
        log.info("measuring %s", describe_server(project_info))
    report = {
        "project_server": project_info,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine_info(args),
        "settings": {
            "sizes": args.sizes,
            "duration": args.duration,
            "max_duration": args.max_duration,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "connections": args.connections,
            "threads": args.threads,
            "repeats": args.repeats,
            "max_entries": args.max_entries,
            "servers": args.servers,
            "project_cpus": args.project_cpus,
        },
        "load_before": load_average(),
        "load": {},
        "whole": {},
        "floors": {},
    }
    directories = {n: ensure_data_set(args.data_dir, n) for n in args.sizes}
    idle_rss = []

    for count in args.sizes:
        directory = directories[count]
        wait_until_unchanged(directory)
        floor = report["floors"][count] = []
        if count <= args.max_entries:
            floor += time_floor(directory, 1)
            log.info("floor for %d files: %s", count, format_seconds(floor[0]))

        with tempfile.TemporaryDirectory(prefix="list-bench-") as workdir:
            try:
                servers = start_servers(
                    args, directory, Path(workdir), running
                )
                idle_rss += [
                    s.idle_rss for s in servers if s.name == "project"
                ]
                if count <= args.max_entries:
                    report["load"][count] = load_test(args, servers, count)
                else:
                    report["whole"][count] = whole_listing_test(
                        args, servers, count, directory, floor
                    )
            finally:
                stop_all(running)

    report["load_after"] = load_average()
    report["targets"] = evaluate_targets(
        report["load"], report["whole"], idle_rss
    )
    return report


def save_report(report, results_dir):
    results_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = results_dir / f"list-files-{stamp}.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return path


def raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    signal.signal(signal.SIGTERM, raise_interrupt)
    running = []
    try:
        check_tools(args)
        with tempfile.TemporaryDirectory(prefix="list-bench-") as run_dir:
            report = benchmark(args, running, Path(run_dir))
    except BenchError as error:
        log.error("error: %s", error)
        return 1
    except KeyboardInterrupt:
        log.error("interrupted; stopping the servers")
        return 130
    finally:
        stop_all(running)

    print_report(report)
    path = save_report(report, args.results_dir)
    log.info("results written to %s", path)
    missed = [row for row in report["targets"] if not row["met"]]
    if missed and args.fail_on_miss:
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
