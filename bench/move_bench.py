#!/usr/bin/env python3
"""Benchmark move_arquivos.sh against the naive inotifywait loop.

    python3 bench/move_bench.py
    python3 bench/move_bench.py --sizes 1000,10000 --latency-files 50

Both movers run in the same invocation, one after the other, each as a
fresh process on fresh temporary directories:

- project: move_arquivos.sh, executed directly with SRC_DIR/DEST_DIR set
  (stdout, one line per moved file, goes to a log file);
- naive: `inotifywait -m -e create --format '%w%f' "$SRC" | while read f;
  do mv "$f" "$DEST_DIR"/; done`, run with bash.

Latency: files are written one at a time (write, close, wait for it to
arrive, pause). The clock starts when close() is called and stops when an
inotify watch on the destination reports the final name (IN_MOVED_TO or
IN_CREATE), read by a thread of this process; both stamps come from the
same monotonic clock. The naive loop moves on IN_CREATE, i.e. possibly
before close(), so its figures can be negative.

Throughput: a burst of N files is created as fast as this process can;
the time runs from just before the first create to the last arrival of
an expected name. Waiting ends when all N arrived, when nothing arrived
for --stall seconds, or at --deadline. Delivered files are counted from a
listing of the destination and their contents checked, so a lost or
damaged file is reported, never assumed.

With --separate-mounts (root), both directories are bind-mounted onto
themselves first, as ProtectSystem=strict with ReadWritePaths= does for
the installed unit: rename(2) between them then fails with EXDEV, and
both movers copy instead (the naive loop through mv's own fallback).

A Markdown table with ratios to naive goes to stdout, progress to
stderr, and the full results as JSON to bench/results/ (or --output).

Environment variables: none (flags only). TMPDIR chooses where the
temporary directories go unless --tmpdir is given.

Exit codes: 0 the benchmark ran (whether or not targets were met),
1 a mover could not be started or died, 2 bad usage, 130 on Ctrl-C and
143 on SIGTERM (movers stopped and directories removed in both cases).

Limitations:
- One run per size, on a shared, noisy machine: differences under ~20%
  are noise. The file creator competes for the same CPUs as the mover.
- Source and destination are on one file system; without
  --separate-mounts every move is a rename.
- The destination watch can itself overflow; arrival times then come
  from polling the listing (marked "polled" in the JSON).
"""

import argparse
import contextlib
import ctypes
import hashlib
import json
import logging
import os
import platform
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MOVER = REPO_ROOT / "move_arquivos.sh"
RESULTS_DIR = REPO_ROOT / "bench" / "results"

NAIVE_LOOP = (
    "inotifywait -m -e create --format '%w%f' \"$SRC\""
    ' | while read f; do mv "$f" "$DEST_DIR"/; done'
)

IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_Q_OVERFLOW = 0x00004000
IN_ONLYDIR = 0x01000000
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
EVENT_HEADER = struct.Struct("iIII")

MOVERS = ("project", "naive")
log = logging.getLogger("move_bench")


class DestinationWatch:
    """Arrival times of names in one directory, from a reader thread.

    Only the first appearance of a name counts; later events for it
    (a duplicate delivery) are counted in `repeats`.
    """

    def __init__(self, directory):
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        mask = IN_MOVED_TO | IN_CREATE | IN_ONLYDIR
        wd = libc.inotify_add_watch(self.fd, os.fsencode(directory), mask)
        if wd < 0:
            os.close(self.fd)
            raise OSError(ctypes.get_errno(), "inotify_add_watch")
        self.arrivals = {}
        self.repeats = 0
        self.overflowed = False
        self.changed = threading.Condition()
        self.stop_read, self.stop_write = os.pipe()
        self.thread = threading.Thread(target=self.read_events, daemon=True)
        self.thread.start()

    def read_events(self):
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        poller.register(self.stop_read, select.POLLIN)
        while True:
            ready = {fd for fd, _ in poller.poll()}
            if self.stop_read in ready:
                return
            try:
                chunk = os.read(self.fd, 1 << 20)
            except BlockingIOError:
                continue
            now = time.monotonic_ns()
            self.record(chunk, now)

    def record(self, chunk, now):
        offset = 0
        with self.changed:
            while offset < len(chunk):
                _, mask, _, size = EVENT_HEADER.unpack_from(chunk, offset)
                start = offset + EVENT_HEADER.size
                offset = start + size
                if mask & IN_Q_OVERFLOW:
                    self.overflowed = True
                    continue
                name = chunk[start:offset].rstrip(b"\0")
                if name in self.arrivals:
                    self.repeats += 1
                else:
                    self.arrivals[name] = now
            self.changed.notify_all()

    def wait_for(self, name, timeout):
        """Arrival time of `name`, or None when `timeout` passes first."""
        with self.changed:
            self.changed.wait_for(lambda: name in self.arrivals, timeout)
            return self.arrivals.get(name)

    def wait_for_count(self, names, count, timeout):
        """Arrival times of `names`, once `count` of them have arrived.

        A listing can show a file before this thread has read its event;
        this gives the thread up to `timeout` seconds to catch up.
        """

        def arrived():
            return [self.arrivals[n] for n in names if n in self.arrivals]

        with self.changed:
            self.changed.wait_for(
                lambda: self.overflowed or len(arrived()) >= count, timeout
            )
            return arrived()

    def close(self):
        os.write(self.stop_write, b"x")
        self.thread.join()
        for fd in (self.fd, self.stop_read, self.stop_write):
            os.close(fd)


class Mover:
    """One mover process in its own session, with its own directories."""

    def __init__(self, kind, mover_path, workdir):
        self.kind = kind
        self.src = workdir / "src"
        self.dest = workdir / "dest"
        env = dict(os.environ, SRC_DIR=str(self.src), DEST_DIR=str(self.dest))
        if kind == "project":
            argv = [str(mover_path)]
        else:
            argv = ["bash", "-c", NAIVE_LOOP]
            env["SRC"] = str(self.src)
        self.stdout_path = workdir / "stdout.log"
        self.stderr_path = workdir / "stderr.log"
        with (
            self.stdout_path.open("wb") as stdout,
            self.stderr_path.open("wb") as stderr,
        ):
            self.process = subprocess.Popen(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,
            )
        self.watch = DestinationWatch(self.dest)
        self.probes = 0

    def wait_ready(self, deadline=30.0):
        """Drop probe files until one arrives: the watch is in place.

        The naive loop does not see files created before inotifywait has
        set up its watch, so one probe is not enough.
        """
        give_up = time.monotonic() + deadline
        attempt = 0
        while time.monotonic() < give_up:
            self.check_alive()
            name = f"probe-{attempt}"
            (self.src / name).write_bytes(b"probe\n")
            if self.watch.wait_for(name.encode(), 0.5) is not None:
                self.probes = attempt + 1
                return
            attempt += 1
        raise RuntimeError(f"{self.kind} mover moved no probe in {deadline} s")

    def check_alive(self):
        code = self.process.poll()
        if code is not None:
            tail = self.stderr_path.read_bytes()[-2000:]
            raise RuntimeError(
                f"{self.kind} mover exited {code}: "
                f"{tail.decode(errors='backslashreplace')}"
            )

    def moved_log_lines(self, quiet=0.5, deadline=5.0):
        """Lines starting "event=moved", once the log has stopped growing.

        A mover may log a batch after its renames are visible.
        """
        give_up = time.monotonic() + deadline
        count = -1
        while True:
            with self.stdout_path.open("rb") as stream:
                now = sum(
                    1 for line in stream if line.startswith(b"event=moved")
                )
            if now == count or time.monotonic() > give_up:
                return now
            count = now
            time.sleep(quiet)

    def stop(self):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        # Children (inotifywait, the loop's subshell) share the group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.watch.close()


def percentile(values, fraction):
    """Nearest-rank percentile of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, round(fraction * len(ordered) + 0.5))
    return ordered[min(rank, len(ordered)) - 1]


def write_file(path, content):
    """Create, write and close `path`; return the time close() was called.

    Stamped just before the call, not after it returns: a mover woken by
    the close can then never look faster than it is, whatever the
    scheduler does to this thread between the two.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, content)
    finally:
        closing = time.monotonic_ns()
        os.close(fd)
    return closing


def measure_latency(mover, count, pause, timeout):
    latencies = []
    lost = 0
    for index in range(count):
        name = f"lat-{index:04d}"
        closed = write_file(mover.src / name, name.encode() * 256)
        arrived = mover.watch.wait_for(name.encode(), timeout)
        if arrived is None:
            lost += 1
            mover.check_alive()
        else:
            latencies.append((arrived - closed) / 1e6)
        time.sleep(pause)
    result = {"files": count, "lost": lost}
    if latencies:
        result.update(
            p50_ms=percentile(latencies, 0.50),
            p99_ms=percentile(latencies, 0.99),
            max_ms=max(latencies),
            min_ms=min(latencies),
        )
    return result


def burst_content(index):
    return f"burst file {index}\n".encode()


def count_delivered(dest, names):
    with os.scandir(dest) as entries:
        present = {entry.name.encode() for entry in entries}
    return len(present & names), present


def measure_burst(mover, size, stall, deadline):
    names = [f"f-{i:06d}".encode() for i in range(size)]
    wanted = set(names)
    src = os.fsencode(mover.src)

    started = time.monotonic_ns()
    for index, name in enumerate(names):
        write_file(src + b"/" + name, burst_content(index))
    created = time.monotonic_ns()

    give_up = time.monotonic() + deadline
    polled_at = {}
    last_count = -1
    last_progress = time.monotonic()
    while True:
        delivered, _ = count_delivered(mover.dest, wanted)
        now = time.monotonic()
        if delivered != last_count:
            polled_at[delivered] = time.monotonic_ns()
            last_count, last_progress = delivered, now
        if delivered == size or now - last_progress > stall:
            break
        if now > give_up:
            break
        if mover.process.poll() is not None:
            break
        time.sleep(0.05)

    delivered, present = count_delivered(mover.dest, wanted)
    seen = mover.watch.wait_for_count(names, delivered, timeout=5.0)
    if len(seen) == delivered and seen:
        last, timing = max(seen), "inotify"
    else:
        last, timing = polled_at.get(delivered, time.monotonic_ns()), "polled"

    damaged = sum(
        1
        for index, name in enumerate(names)
        if name in present
        and (mover.dest / os.fsdecode(name)).read_bytes()
        != burst_content(index)
    )
    elapsed = (last - started) / 1e9 if delivered else None
    return {
        "files": size,
        "delivered": delivered,
        "damaged": damaged,
        "left_in_source": sum(
            1 for n in names if os.path.lexists(src + b"/" + n)
        ),
        "create_s": (created - started) / 1e9,
        "elapsed_s": elapsed,
        "files_per_s": delivered / elapsed if elapsed else 0.0,
        "timing": timing,
        "watch_overflowed": mover.watch.overflowed,
        "repeat_events": mover.watch.repeats,
        "mover_alive": mover.process.poll() is None,
    }


@contextlib.contextmanager
def bound_onto_themselves(paths):
    """Bind-mount each path onto itself, as systemd's ReadWritePaths= does.

    A rename between two such mounts fails with EXDEV even on one file
    system, so every move becomes a copy.
    """
    mounted = []
    try:
        for path in paths:
            subprocess.run(["mount", "--bind", path, path], check=True)
            mounted.append(path)
        yield
    finally:
        for path in reversed(mounted):
            subprocess.run(["umount", "--lazy", path], check=False)


def run_one(kind, mover_path, scenario, args, base):
    """Run one scenario against a fresh mover; return its results."""
    workdir = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=base))
    dirs = [workdir / "src", workdir / "dest"]
    for path in dirs:
        path.mkdir()
    try:
        with bound_onto_themselves(dirs if args.separate_mounts else []):
            return run_mover(kind, mover_path, scenario, args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_mover(kind, mover_path, scenario, args, workdir):
    mover = Mover(kind, mover_path, workdir)
    try:
        mover.wait_ready()
        if scenario == "latency":
            result = measure_latency(
                mover, args.latency_files, args.pause, args.latency_timeout
            )
        else:
            result = measure_burst(mover, scenario, args.stall, args.deadline)
        result["probes"] = mover.probes
        result["logged_moves"] = mover.moved_log_lines()
        return result
    finally:
        mover.stop()


def environment(mover_path):
    def first_line(argv):
        try:
            done = subprocess.run(
                argv, capture_output=True, text=True, check=False
            )
        except OSError:
            return None
        return (done.stdout or done.stderr).splitlines()[0]

    queued = Path("/proc/sys/fs/inotify/max_queued_events").read_text()
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "max_queued_events": int(queued),
        "bash": first_line(["bash", "--version"]),
        "inotifywait": first_line(["inotifywait", "--help"]),
        "mover": str(mover_path),
        "mover_sha256": hashlib.sha256(mover_path.read_bytes()).hexdigest(),
    }


def ratio(project, naive):
    """project / naive; "n/a" unless both are positive."""
    if not project or not naive or project < 0 or naive < 0:
        return "n/a"
    return f"{project / naive:.2f}x"


def markdown_table(results):
    lat = {k: results[k]["latency"] for k in MOVERS}
    rows = [
        "| measure | project | naive | project / naive |",
        "|---|---:|---:|---:|",
    ]
    for key, label in (("p50_ms", "p50"), ("p99_ms", "p99")):
        values = [lat[k].get(key) for k in MOVERS]
        shown = ["n/a" if v is None else f"{v:.2f}" for v in values]
        rows.append(
            f"| latency {label}, ms ({lat['project']['files']} files) "
            f"| {shown[0]} | {shown[1]} | {ratio(*values)} |"
        )
    for size in results["sizes"]:
        burst = {k: results[k]["bursts"][str(size)] for k in MOVERS}
        got = [f"{burst[k]['delivered']:,} / {size:,}" for k in MOVERS]
        rows.append(f"| burst {size:,}: delivered | {got[0]} | {got[1]} | |")
        times = [
            f"{burst[k]['elapsed_s'] or 0:.1f} ({burst[k]['create_s']:.1f})"
            for k in MOVERS
        ]
        rows.append(
            f"| burst {size:,}: seconds (of which creating) "
            f"| {times[0]} | {times[1]} | |"
        )
        rates = [burst[k]["files_per_s"] for k in MOVERS]
        rows.append(
            f"| burst {size:,}: files/s | {rates[0]:,.0f} | {rates[1]:,.0f} "
            f"| {ratio(*rates)} |"
        )
    return "\n".join(rows)


def target_report(results):
    """One line per target of issue 5: met or missed, with the figures."""
    lines = []
    project, naive = results["project"], results["naive"]
    for size in results["sizes"]:
        burst = project["bursts"][str(size)]
        complete = burst["delivered"] == size and not burst["damaged"]
        lines.append(
            f"- all {size:,} delivered intact: "
            f"{'met' if complete else 'MISSED'} ({burst['delivered']:,}, "
            f"{burst['damaged']} damaged)"
        )
    for size in results["sizes"]:
        mine = project["bursts"][str(size)]["files_per_s"]
        theirs = naive["bursts"][str(size)]["files_per_s"]
        met = theirs and mine >= 3 * theirs
        lines.append(
            f"- throughput >= 3x naive at {size:,}: "
            f"{'met' if met else 'MISSED'} ({ratio(mine, theirs)})"
        )
    mine = project["latency"].get("p99_ms")
    theirs = naive["latency"].get("p99_ms")
    met = mine is not None and theirs is not None and mine <= theirs
    shown = [
        "n/a" if value is None else f"{value:.2f} ms"
        for value in (mine, theirs)
    ]
    lines.append(
        f"- p99 latency no worse than naive: {'met' if met else 'MISSED'} "
        f"({shown[0]} vs {shown[1]})"
    )
    return "\n".join(lines)


def positive_sizes(text):
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        message = f"not a list of numbers: {text}"
        raise argparse.ArgumentTypeError(message) from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError("sizes must be positive")
    return sizes


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Latency and throughput of move_arquivos.sh, side by "
        "side with the naive inotifywait loop."
    )
    parser.add_argument(
        "--mover",
        type=Path,
        default=DEFAULT_MOVER,
        help="the project's mover script (default: %(default)s)",
    )
    parser.add_argument(
        "--sizes",
        type=positive_sizes,
        default=[1000, 10000, 50000],
        help="burst sizes, comma-separated (default: 1000,10000,50000)",
    )
    parser.add_argument(
        "--latency-files",
        type=int,
        default=200,
        help="files written one at a time for latency (default: 200)",
    )
    parser.add_argument(
        "--pause",
        type=float,
        default=0.02,
        help="seconds between latency files (default: 0.02)",
    )
    parser.add_argument(
        "--latency-timeout",
        type=float,
        default=10.0,
        help="seconds to wait for one latency file (default: 10)",
    )
    parser.add_argument(
        "--stall",
        type=float,
        default=15.0,
        help="stop waiting for a burst after this many seconds without "
        "a new arrival (default: 15)",
    )
    parser.add_argument(
        "--deadline",
        type=float,
        default=600.0,
        help="stop waiting for a burst after this many seconds in all "
        "(default: 600)",
    )
    parser.add_argument(
        "--separate-mounts",
        action="store_true",
        help="bind-mount source and destination onto themselves, as the "
        "unit's ReadWritePaths= does: moves become copies (needs root)",
    )
    parser.add_argument(
        "--tmpdir",
        type=Path,
        default=None,
        help="where the temporary directories go (default: $TMPDIR)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="JSON results file (default: bench/results/move_bench-"
        "<UTC time>.json)",
    )
    args = parser.parse_args(argv)
    if args.latency_files < 1:
        parser.error("--latency-files must be at least 1")
    if not os.access(args.mover, os.X_OK):
        parser.error(f"--mover {args.mover} is not an executable file")
    if args.separate_mounts and os.geteuid() != 0:
        parser.error("--separate-mounts needs root (mount --bind)")
    if shutil.which("inotifywait") is None:
        parser.error(
            "inotifywait is not installed (apt-get install inotify-tools)"
        )
    return args


def terminate(signum, frame):
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="move_bench: %(message)s", stream=sys.stderr
    )
    signal.signal(signal.SIGTERM, terminate)

    results = {
        "environment": environment(args.mover),
        "sizes": args.sizes,
        "separate_mounts": args.separate_mounts,
    }
    scenarios = ["latency", *args.sizes]
    base = tempfile.mkdtemp(prefix="move_bench-", dir=args.tmpdir)
    try:
        for kind in MOVERS:
            results[kind] = {"bursts": {}}
        for scenario in scenarios:
            for kind in MOVERS:
                log.info("%s: %s", kind, scenario)
                outcome = run_one(kind, args.mover, scenario, args, base)
                log.info("%s: %s: %s", kind, scenario, outcome)
                if scenario == "latency":
                    results[kind]["latency"] = outcome
                else:
                    results[kind]["bursts"][str(scenario)] = outcome
    except RuntimeError as error:
        log.error("%s", error)
        return 1
    except KeyboardInterrupt:
        log.error("interrupted; movers stopped, directories removed")
        return 130
    finally:
        shutil.rmtree(base, ignore_errors=True)

    output = args.output
    if output is None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        output = RESULTS_DIR / f"move_bench-{stamp}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")

    print(markdown_table(results))
    print()
    print(target_report(results))
    log.info("results written to %s", output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
