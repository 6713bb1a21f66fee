"""Host tests of move_arquivos.sh, its units and its installer.

Each test runs the real script with the real inotifywait in a session of
its own, on private directories, and reads its key=value log. Tests that
mount a tmpfs (a second file system), lower the inotify queue or drop
privileges need root. Waiting is done against a deadline that only turns
a hang into a failure; nothing asserts how fast the mover is.
"""

import contextlib
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
from support import (
    REPO_ROOT,
    assert_promtool_accepts_metrics,
    require,
    require_root,
    unit_exposure,
)

SCRIPT = REPO_ROOT / "move_arquivos.sh"
INSTALLER = REPO_ROOT / "deploy/install-move-arquivo.sh"
UNITS = [
    REPO_ROOT / "move_arquivo.service",
    REPO_ROOT / "move_arquivo@.service",
]
DEADLINE = 60
HIDDEN = ".move_arquivo."


def wait_for(predicate, what, deadline=DEADLINE):
    """Poll `predicate` until true; fail (never pass) at the deadline."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"gave up waiting for {what}")


LOG_FIELD = re.compile(rb'(\w+)=("(?:[^"\\]|\\.)*"|[^ "]+)(?: |$)')
ESCAPE = re.compile(rb'\\(x[0-9A-F]{2}|["\\])')


def unescape(value):
    if not value.startswith(b'"'):
        return value

    def one(match):
        code = match.group(1)
        if code.startswith(b"x"):
            return bytes([int(code[1:], 16)])
        return code

    return ESCAPE.sub(one, value[1:-1])


def parse_line(line):
    """One log line as {key: bytes}; fails if it is not pure key=value."""
    assert line.isascii(), line
    fields = {}
    position = 0
    while position < len(line):
        match = LOG_FIELD.match(line, position)
        assert match, f"not key=value at {position}: {line!r}"
        fields[match.group(1).decode()] = unescape(match.group(2))
        position = match.end()
    return fields


def session_activity(session):
    """{pid: (CPU ticks incl. reaped children, context switches)} of every
    process in a session. A process blocked in read(2) changes neither;
    any wake-up, however short, adds a context switch."""
    activity = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat_text = (entry / "stat").read_text()
            status_text = (entry / "status").read_text()
        except OSError:
            continue
        fields = stat_text.rsplit(")", 1)[1].split()
        if int(fields[3]) != session:
            continue
        switches = sum(
            int(line.split()[1])
            for line in status_text.splitlines()
            if "ctxt_switches:" in line
        )
        ticks = sum(int(f) for f in fields[11:15])
        activity[int(entry.name)] = (ticks, switches)
    return activity


class Mover:
    """One run of move_arquivos.sh in its own session."""

    def __init__(self, workdir, src, dest, env, user=None):
        self.src = Path(src)
        self.dest = Path(dest)
        self.out_path = Path(workdir) / f"out.{time.monotonic_ns()}"
        self.err_path = self.out_path.with_suffix(".err")
        argv = [str(SCRIPT)]
        if user is not None:
            argv = [
                require("setpriv"),
                f"--reuid={user}",
                f"--regid={user}",
                "--clear-groups",
                *argv,
            ]
        environment = {
            "PATH": os.environ["PATH"],
            "SRC_DIR": str(src),
            "DEST_DIR": str(dest),
            "SCAN_SETTLE_SECONDS": "1",
            **env,
        }
        with (
            self.out_path.open("wb") as out,
            self.err_path.open("wb") as err,
        ):
            self.process = subprocess.Popen(
                argv,
                env=environment,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )

    def stdout(self):
        return self.out_path.read_bytes()

    def stderr(self):
        return self.err_path.read_bytes()

    def events(self):
        return [parse_line(line) for line in self.stdout().splitlines()]

    def logged(self, event, count):
        """The lines of one event, once at least `count` were written:
        a file reaches DEST_DIR a moment before its line does."""

        def found():
            return [e for e in self.events() if e["event"] == event]

        wait_for(lambda: len(found()) >= count, f"{count} {event!r} lines")
        return found()

    def wait_started(self):
        wait_for(
            lambda: (
                b"event=started" in self.stdout()
                or self.process.poll() is not None
            ),
            "event=started",
        )
        assert self.process.poll() is None, self.stderr()

    def wait_moved(self, *names):
        for name in names:
            path = self.dest / name
            wait_for(lambda p=path: os.path.lexists(p), f"{path} moved")

    def sentinel(self, label="sentinel"):
        """Create a file and wait for its move: every earlier event has
        been handled once it arrives."""
        name = f"{label}-{time.monotonic_ns()}"
        (self.src / name).write_text("sentinel\n")
        self.wait_moved(name)
        return name

    def signal(self, number):
        os.killpg(self.process.pid, number)

    def stop(self):
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=DEADLINE)

    def wait_exit(self):
        return self.process.wait(timeout=DEADLINE)

    def kill(self):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=DEADLINE)


@pytest.fixture
def movers():
    """Start movers with movers(src, dest, **env); all die at teardown."""
    require("inotifywait")
    started = []
    workdir = Path(os.environ.get("TMPDIR", "/tmp"))

    def start(src, dest, user=None, **env):
        mover = Mover(workdir, src, dest, env, user=user)
        started.append(mover)
        return mover

    yield start
    for mover in started:
        mover.kill()
        mover.out_path.unlink(missing_ok=True)
        mover.err_path.unlink(missing_ok=True)


@pytest.fixture
def dirs(tmp_path):
    src = tmp_path / "origem"
    dest = tmp_path / "destino"
    src.mkdir()
    dest.mkdir()
    return src, dest


@pytest.fixture
def tmpfs_dest(tmp_path):
    """A destination on another file system (a tmpfs mount)."""
    require_root()
    src = tmp_path / "origem"
    dest = tmp_path / "destino"
    src.mkdir()
    dest.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(dest)],
        check=True,
    )
    try:
        yield src, dest
    finally:
        subprocess.run(["umount", "-l", str(dest)], check=True)


def visible(directory):
    """Names in a directory (str or bytes), without the mover's own."""
    prefix = os.fsencode(HIDDEN) if isinstance(directory, bytes) else HIDDEN
    return sorted(
        name for name in os.listdir(directory) if not name.startswith(prefix)
    )


def hidden_entries(*directories):
    """What the mover's hidden directories still hold."""
    found = []
    for directory in directories:
        for name in os.listdir(directory):
            if name.startswith(HIDDEN):
                found += os.listdir(Path(directory) / name)
    return found


def wait_hidden_empty(*directories):
    wait_for(lambda: hidden_entries(*directories) == [], "no copy in flight")


# --- command line and start-up errors -------------------------------


def test_help_prints_the_header_with_every_setting():
    result = subprocess.run(
        [str(SCRIPT), "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0
    assert result.stderr == ""
    assert result.stdout.startswith(
        "Summary: move every finished file from a watched directory"
    )
    for word in (
        "Usage: move_arquivos.sh [--help]",
        "SRC_DIR",
        "DEST_DIR",
        "IGNORE_GLOB",
        "SCAN_SETTLE_SECONDS",
        "METRICS_TEXTFILE_DIR",
        "METRICS_INTERVAL_SECONDS",
        "MOVER_NAME",
        "/etc/move_arquivo/move_arquivo.env",
        "/etc/move_arquivo/NAME.env",
        "renamer=python3",
        "Exit codes:",
    ):
        assert word in result.stdout


def test_unknown_argument_is_a_usage_error():
    result = subprocess.run(
        [str(SCRIPT), "--bogus"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        "move_arquivos.sh: unknown argument (try --help)\n"
    )


def run_with(env):
    return subprocess.run(
        [str(SCRIPT)],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )


def test_missing_directories_at_start_are_a_clear_error(tmp_path):
    require("inotifywait")
    missing = tmp_path / "missing"
    result = run_with({"SRC_DIR": str(missing), "DEST_DIR": str(tmp_path)})
    assert result.returncode == 3
    assert result.stdout == ""
    assert result.stderr == (
        f'event=fatal reason=config msg="SRC_DIR {missing} does not exist"\n'
    )

    result = run_with({"SRC_DIR": str(tmp_path), "DEST_DIR": str(missing)})
    assert result.returncode == 3
    assert result.stderr == (
        f'event=fatal reason=config msg="DEST_DIR {missing} does not exist"\n'
    )


def test_unusable_configuration_is_refused(tmp_path):
    require("inotifywait")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    src = tmp_path / "src"
    src.mkdir()
    cases = [
        (
            {"SRC_DIR": str(a_file), "DEST_DIR": str(tmp_path)},
            f'msg="SRC_DIR {a_file} is not a directory"',
        ),
        (
            {"SRC_DIR": str(src), "DEST_DIR": f"{src}/."},
            'msg="SRC_DIR and DEST_DIR are the same directory"',
        ),
        (
            {
                "SRC_DIR": str(src),
                "DEST_DIR": str(tmp_path),
                "METRICS_INTERVAL_SECONDS": "0",
            },
            'msg="METRICS_INTERVAL_SECONDS must be at least 1"',
        ),
        (
            {
                "SRC_DIR": str(src),
                "DEST_DIR": str(tmp_path),
                "METRICS_TEXTFILE_DIR": str(tmp_path / "none"),
            },
            f'msg="METRICS_TEXTFILE_DIR {tmp_path / "none"} does not exist"',
        ),
        (
            {
                "SRC_DIR": str(src),
                "DEST_DIR": str(tmp_path),
                "SCAN_SETTLE_SECONDS": "soon",
            },
            'msg="SCAN_SETTLE_SECONDS must be a whole number"',
        ),
    ]
    for env, message in cases:
        result = run_with(env)
        assert result.returncode == 3, env
        assert result.stderr == f"event=fatal reason=config {message}\n"


# --- what gets moved, and when ----------------------------------------


def test_files_present_at_start_are_moved(dirs, movers):
    src, dest = dirs
    for number in range(3):
        (src / f"old-{number}.txt").write_text(f"old {number}\n")
    mover = movers(src, dest, SCAN_SETTLE_SECONDS="0")
    mover.wait_started()
    mover.wait_moved("old-0.txt", "old-1.txt", "old-2.txt")
    for number in range(3):
        assert (dest / f"old-{number}.txt").read_text() == f"old {number}\n"
    moved = {e["src"] for e in mover.logged(b"moved", 3)}
    assert moved == {bytes(src / f"old-{n}.txt") for n in range(3)}
    assert visible(src) == []


def test_directories_given_by_symlink_or_relative_path_work(
    tmp_path, movers, monkeypatch
):
    real = tmp_path / "real-origem"
    real.mkdir()
    (tmp_path / "-destino").mkdir()
    (real / "old.txt").write_text("old")
    (tmp_path / "link").symlink_to(real)
    monkeypatch.chdir(tmp_path)
    mover = movers("link", "-destino", SCAN_SETTLE_SECONDS="0")
    mover.wait_started()
    (real / "new.txt").write_text("new")
    mover.wait_moved("old.txt", "new.txt")
    assert visible(real) == []
    moved = mover.logged(b"moved", 2)
    assert sorted(e["dest"] for e in moved) == [
        b"./-destino/new.txt",
        b"./-destino/old.txt",
    ]


def test_nothing_created_during_start_up_is_missed(dirs, movers):
    src, dest = dirs
    stop = threading.Event()
    created = []

    def keep_creating():
        number = 0
        while not stop.is_set() or number < 50:
            name = f"f{number:05d}"
            (src / name).write_text(name)
            created.append(name)
            number += 1
            if stop.is_set():
                continue
            time.sleep(0.001)

    writer = threading.Thread(target=keep_creating)
    writer.start()
    try:
        wait_for(lambda: len(created) > 20, "files before start")
        mover = movers(src, dest)
        mover.wait_started()
    finally:
        stop.set()
        writer.join()
    wait_for(lambda: len(os.listdir(dest)) == len(created), "every file")
    assert sorted(os.listdir(dest)) == sorted(created)
    for name in created:
        assert (dest / name).read_text() == name


def test_a_file_moves_only_after_its_writer_closes_it(dirs, movers):
    src, dest = dirs
    mover = movers(src, dest)
    mover.wait_started()
    with (src / "upload.bin").open("wb") as upload:
        upload.write(b"a" * 100_000)
        upload.flush()
        mover.sentinel()
        assert not (dest / "upload.bin").exists()
        assert (src / "upload.bin").stat().st_size == 100_000
        upload.write(b"b" * 100_000)
    mover.wait_moved("upload.bin")
    assert (
        dest / "upload.bin"
    ).read_bytes() == b"a" * 100_000 + b"b" * 100_000


def test_a_file_renamed_into_the_source_is_moved(dirs, movers, tmp_path):
    src, dest = dirs
    mover = movers(src, dest)
    mover.wait_started()
    outside = tmp_path / "outside.txt"
    outside.write_text("renamed in\n")
    outside.rename(src / "renamed.txt")
    mover.wait_moved("renamed.txt")
    assert (dest / "renamed.txt").read_text() == "renamed in\n"


def test_temporary_names_wait_until_renamed_to_a_final_name(dirs, movers):
    src, dest = dirs
    mover = movers(src, dest)
    mover.wait_started()
    temporary = [
        ".report.pdf.Ab3dE9",
        "video.mp4.part",
        "video.mp4.PART",
        "notes.tmp",
        "notes.txt~",
        ".notes.txt.swp",
        "setup.exe.crdownload",
        "photo.jpg.download",
        "archive.zip.partial",
        "notes.temp",
        "notes.swx",
        ".notes.txt.swo",
        ".notes.txt.swn",
        "notes.txt.kate-swp",
        "#notes.txt#",
        ".#notes.txt",
        ".~lock.report.odt#",
        "~$report.docx",
        "setup.exe.opdownload",
        "upload.bin.filepart",
        "movie.mkv.!ut",
        "movie.mkv.!qB",
        ".goutputstream-XYZ123",
    ]
    # Look-alikes of the patterns above that are finished files.
    final = ["movie.swf", "notes.swo", "report.pdf.part.txt", "lock#"]
    for name in temporary + final:
        (src / name).write_text(name)
    mover.wait_moved(*final)
    mover.sentinel()
    assert visible(src) == sorted(temporary)
    assert not set(temporary) & set(os.listdir(dest))

    (src / "video.mp4.part").rename(src / "video.mp4")
    (src / ".report.pdf.Ab3dE9").rename(src / "report.pdf")
    mover.wait_moved("video.mp4", "report.pdf")
    assert (dest / "video.mp4").read_text() == "video.mp4.part"
    assert (dest / "report.pdf").read_text() == ".report.pdf.Ab3dE9"


def test_the_ignore_pattern_is_configurable(dirs, movers):
    src, dest = dirs
    mover = movers(src, dest, IGNORE_GLOB="@(*.wip|draft-*)")
    mover.wait_started()
    for name in ("notes.WIP", "draft-1.txt", "video.part"):
        (src / name).write_text(name)
    mover.wait_moved("video.part")
    mover.sentinel()
    assert visible(src) == ["draft-1.txt", "notes.WIP"]


def test_an_empty_ignore_pattern_ignores_nothing(dirs, movers):
    src, dest = dirs
    mover = movers(src, dest, IGNORE_GLOB="")
    mover.wait_started()
    for name in ("video.part", "notes.tmp", ".x.Ab3dE9"):
        (src / name).write_text(name)
    mover.wait_moved("video.part", "notes.tmp", ".x.Ab3dE9")
    assert visible(src) == []


def test_an_existing_name_is_never_overwritten(dirs, movers):
    src, dest = dirs
    long_name = "x" * 255
    for name in ("report.pdf", "report.1.pdf", "README", long_name):
        (dest / name).write_text(f"original {name}")
    mover = movers(src, dest)
    mover.wait_started()
    for name in ("report.pdf", "README", long_name):
        (src / name).write_text(f"new {name}")
    mover.wait_moved("report.2.pdf", "README.1", "x" * 253 + ".1")
    for name in ("report.pdf", "report.1.pdf", "README", long_name):
        assert (dest / name).read_text() == f"original {name}"
    assert (dest / "report.2.pdf").read_text() == "new report.pdf"
    assert (dest / "README.1").read_text() == "new README"
    assert (dest / ("x" * 253 + ".1")).read_text() == f"new {long_name}"

    renamed = mover.logged(b"renamed", 3)
    assert {(e["src"], e["dest"], e["reason"]) for e in renamed} == {
        (bytes(src / "report.pdf"), bytes(dest / "report.2.pdf"), b"exists"),
        (bytes(src / "README"), bytes(dest / "README.1"), b"exists"),
        (
            bytes(src / long_name),
            bytes(dest / ("x" * 253 + ".1")),
            b"exists",
        ),
    }


HOSTILE_NAMES = [
    b"with space",
    b"new\nline",
    b"back\\slash",
    b"-leading-dash",
    b"--help",
    b"glob*?[ab]{c,d}",
    b"*",
    b"@",
    b"non-utf8-\xff\xfe\x80",
    "cora\u00e7\u00e3o.txt".encode(),
    b"tab\tbell\x07del\x7f",
    b"quote\"apos'",
    b"key=value event=moved",
    b"forged\nevent=moved src=passwd dest=x",
    b"$(touch pwned)`id`",
    b"y" * 255,
]


@pytest.mark.parametrize("layout", ["one-fs", "two-fs"])
def test_any_file_name_is_moved_and_logged_safely(layout, request, movers):
    fixture = "dirs" if layout == "one-fs" else "tmpfs_dest"
    src, dest = request.getfixturevalue(fixture)
    mover = movers(src, dest)
    mover.wait_started()
    src_b, dest_b = bytes(src), bytes(dest)
    for number, name in enumerate(HOSTILE_NAMES):
        with open(os.path.join(src_b, name), "wb") as stream:
            stream.write(b"%d\n" % number)
    for name in HOSTILE_NAMES:
        path = os.path.join(dest_b, name)
        wait_for(lambda p=path: os.path.exists(p), repr(name))
    for number, name in enumerate(HOSTILE_NAMES):
        with open(os.path.join(dest_b, name), "rb") as stream:
            assert stream.read() == b"%d\n" % number
    assert visible(src_b) == []
    wait_hidden_empty(src, dest)
    assert not os.path.exists("pwned")

    events = mover.logged(b"moved", len(HOSTILE_NAMES))
    moved = [(e["src"], e["dest"]) for e in events]
    assert sorted(moved) == sorted(
        (os.path.join(src_b, n), os.path.join(dest_b, n))
        for n in HOSTILE_NAMES
    )
    assert len(mover.stdout().splitlines()) == 1 + len(HOSTILE_NAMES)


def test_special_files_never_block_and_are_logged_once(dirs, movers):
    require_root()
    src, dest = dirs
    os.mkfifo(src / "early-fifo")
    # Too fresh for the start-up scan: a second scan follows.
    (src / "fresh.txt").write_text("fresh")
    mover = movers(src, dest, SCAN_SETTLE_SECONDS="3")
    mover.wait_started()
    os.mkfifo(src / "fifo")
    os.mknod(src / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(str(src / "sock"))
        (src / "after.txt").write_text("after")
        mover.wait_moved("after.txt", "fresh.txt")
        mover.sentinel()
    finally:
        server.close()
    assert visible(src) == ["early-fifo", "fifo", "null", "sock"]

    skipped = [(e["src"], e["reason"]) for e in mover.logged(b"skipped", 4)]
    assert sorted(skipped) == sorted(
        [
            (bytes(src / "early-fifo"), b"fifo"),
            (bytes(src / "fifo"), b"fifo"),
            (bytes(src / "null"), b"device"),
            (bytes(src / "sock"), b"socket"),
        ]
    )


def test_a_symlink_is_moved_as_a_link_never_followed(dirs, movers, tmp_path):
    src, dest = dirs
    target = tmp_path / "target.txt"
    target.write_text("target stays")
    (src / "dangling").symlink_to("/nonexistent/target")
    mover = movers(src, dest, SCAN_SETTLE_SECONDS="0")
    mover.wait_started()
    (src / "link").symlink_to(target)
    mover.wait_moved("link", "dangling")
    assert os.readlink(dest / "link") == str(target)
    assert os.readlink(dest / "dangling") == "/nonexistent/target"
    assert target.read_text() == "target stays"
    assert visible(src) == []


def test_subdirectories_stay_in_place_and_are_logged_once(dirs, movers):
    src, dest = dirs
    (src / "early").mkdir()
    (src / "early" / "inside.txt").write_text("inside")
    # Too fresh for the start-up scan: a second scan follows.
    (src / "fresh.txt").write_text("fresh")
    mover = movers(src, dest, SCAN_SETTLE_SECONDS="3")
    mover.wait_started()
    (src / "late").mkdir()
    mover.wait_moved("fresh.txt")
    mover.sentinel()
    assert visible(src) == ["early", "late"]
    assert (src / "early" / "inside.txt").read_text() == "inside"
    skipped = [(e["src"], e["reason"]) for e in mover.logged(b"skipped", 2)]
    assert sorted(skipped) == [
        (bytes(src / "early"), b"directory"),
        (bytes(src / "late"), b"directory"),
    ]


# --- renames on one file system ----------------------------------------


def session_commands(session):
    """{pid: argv as bytes} of every process in a session."""
    return {
        pid: Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        for pid in session_activity(session)
        if Path(f"/proc/{pid}/cmdline").exists()
    }


def rename_helpers(session):
    """PIDs of the mover's resident rename helper (python3 -I -S -c)."""
    return sorted(
        pid
        for pid, argv in session_commands(session).items()
        if os.path.basename(argv[0]).startswith(b"python3")
        and argv[1:4] == [b"-I", b"-S", b"-c"]
    )


@pytest.fixture
def traced_path(tmp_path):
    """(PATH, log): PATH runs every mv through a wrapper that appends a
    line to the log, then execs the real mv."""
    tools = tmp_path / "bin"
    tools.mkdir()
    log = tmp_path / "mv.log"
    log.touch()
    wrapper = tools / "mv"
    wrapper.write_text(
        f'#!/bin/sh\necho mv >>"{log}"\nexec {shutil.which("mv")} "$@"\n'
    )
    wrapper.chmod(0o755)
    return f"{tools}:{os.environ['PATH']}", log


def break_python3(path):
    """Put a python3 that fails at once, as one without ctypes does, first
    on PATH: the mover must rename with mv."""
    fake = Path(path.split(":", 1)[0]) / "python3"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)


@pytest.fixture
def without_rename_helper(traced_path):
    """(PATH, mv log) with a broken python3 (see break_python3)."""
    break_python3(traced_path[0])
    return traced_path


def test_lone_files_are_renamed_by_the_helper_without_mv(
    dirs, movers, traced_path
):
    src, dest = dirs
    path, mv_log = traced_path
    (dest / "taken.txt").write_text("taken")
    mover = movers(src, dest, PATH=path)
    mover.wait_started()
    (started,) = mover.logged(b"started", 1)
    assert (started["mode"], started["renamer"]) == (b"rename", b"python3")
    helpers = rename_helpers(mover.process.pid)
    assert len(helpers) == 1

    for number in range(5):
        (src / f"one-{number}.txt").write_text(f"one {number}")
        mover.wait_moved(f"one-{number}.txt")
    moved = mover.logged(b"moved", 5)
    assert [e["dest"] for e in moved] == [
        bytes(dest / f"one-{n}.txt") for n in range(5)
    ]
    assert mv_log.read_text() == ""

    # A taken name is the slow path's: it numbers the file with mv.
    (src / "taken.txt").write_text("new")
    mover.wait_moved("taken.1.txt")
    (renamed,) = mover.logged(b"renamed", 1)
    assert renamed["dest"] == bytes(dest / "taken.1.txt")
    assert (dest / "taken.txt").read_text() == "taken"
    assert (dest / "taken.1.txt").read_text() == "new"
    assert rename_helpers(mover.process.pid) == helpers
    assert mover.stop() == 0
    assert mover.stderr() == b""


def test_without_a_working_python3_files_are_renamed_by_mv(
    dirs, movers, without_rename_helper
):
    src, dest = dirs
    path, mv_log = without_rename_helper
    (dest / "taken.txt").write_text("taken")
    mover = movers(src, dest, PATH=path)
    mover.wait_started()
    (started,) = mover.logged(b"started", 1)
    assert (started["mode"], started["renamer"]) == (b"rename", b"mv")
    assert rename_helpers(mover.process.pid) == []

    (src / "alone.txt").write_text("alone")
    (src / "taken.txt").write_text("new")
    mover.wait_moved("alone.txt", "taken.1.txt")
    assert (dest / "alone.txt").read_text() == "alone"
    assert (dest / "taken.1.txt").read_text() == "new"
    assert mv_log.read_text() != ""
    assert mover.stop() == 0
    assert mover.stderr() == b""


def test_a_rename_helper_that_dies_is_replaced_by_mv(
    dirs, movers, traced_path
):
    src, dest = dirs
    path, mv_log = traced_path
    mover = movers(src, dest, PATH=path)
    mover.wait_started()
    (helper,) = rename_helpers(mover.process.pid)
    os.kill(helper, signal.SIGKILL)
    wait_for(lambda: rename_helpers(mover.process.pid) == [], "helper gone")

    for name in ("after-1.txt", "after-2.txt"):
        (src / name).write_text(name)
        mover.wait_moved(name)
        assert (dest / name).read_text() == name
    assert mv_log.read_text() != ""
    assert len(mover.logged(b"moved", 2)) == 2
    errors = [parse_line(line) for line in mover.stderr().splitlines()]
    assert errors == [
        {
            "event": b"error",
            "op": b"rename_helper",
            "msg": b"the rename helper quit; using mv",
        }
    ]


def test_a_killed_mover_leaves_no_rename_helper_behind(dirs, movers):
    src, dest = dirs
    mover = movers(src, dest)
    mover.wait_started()
    session = mover.process.pid
    (helper,) = rename_helpers(session)
    os.kill(mover.process.pid, signal.SIGKILL)
    mover.wait_exit()
    # The helper reads end-of-file once the shell's end of its pipe is
    # closed, and exits.
    wait_for(lambda: not Path(f"/proc/{helper}").exists(), "helper exit")


@pytest.mark.parametrize("renamer", ["python3", "mv"])
def test_a_name_written_again_right_after_its_move_is_a_new_file(
    dirs, movers, renamer, traced_path
):
    """A writer that creates a file again the moment the mover renamed
    the first one away races the mover's check of that rename: the new
    file must wait for its own close, and each file gets one line."""
    src, dest = dirs
    path = traced_path[0]
    if renamer == "mv":
        break_python3(path)
    mover = movers(src, dest, PATH=path)
    mover.wait_started()
    (started,) = mover.logged(b"started", 1)
    assert started["renamer"] == renamer.encode()

    rounds = 20
    for number in range(rounds):
        name = f"again-{number:02d}.txt"
        (src / name).write_text(f"first {number}")
        # Spin, not poll: the new file must follow the rename at once.
        end = time.monotonic() + DEADLINE
        while os.path.lexists(src / name):
            assert time.monotonic() < end, f"gave up waiting for {name}"
        with (src / name).open("w") as second:
            second.write(f"second {number}")
            second.flush()
            mover.sentinel(f"while-open-{number:02d}")
            assert not (dest / f"again-{number:02d}.1.txt").exists()
        mover.wait_moved(f"again-{number:02d}.1.txt")
        assert (dest / name).read_text() == f"first {number}"
        assert (dest / f"again-{number:02d}.1.txt").read_text() == (
            f"second {number}"
        )

    delivered = sorted(os.listdir(dest))
    assert len(delivered) == 3 * rounds
    lines = [e for e in mover.events() if e["event"] in {b"moved", b"renamed"}]
    logged = sorted(os.path.basename(e["dest"]).decode() for e in lines)
    assert logged == delivered


# --- failures the mover survives or reports ----------------------------


QUEUE_SYSCTL = Path("/proc/sys/fs/inotify/max_queued_events")


def test_a_queue_overflow_is_logged_and_rescanned(dirs, movers):
    require_root()
    src, dest = dirs
    original = QUEUE_SYSCTL.read_text()
    try:
        # Other programs on this host use inotify too: the small queue
        # applies to instances created in this short window only.
        QUEUE_SYSCTL.write_text("16\n")
        mover = movers(src, dest)
        mover.wait_started()
    finally:
        QUEUE_SYSCTL.write_text(original)
    assert QUEUE_SYSCTL.read_text() == original

    mover.signal(signal.SIGSTOP)
    try:
        names = [f"burst-{n:03d}" for n in range(200)]
        for name in names:
            (src / name).write_text(name)
    finally:
        mover.signal(signal.SIGCONT)
    mover.wait_moved(*names)
    assert sorted(os.listdir(dest)) == names
    assert len(mover.logged(b"moved", len(names))) == len(names)
    assert b"event=overflow action=rescan" in mover.stdout().splitlines()


@pytest.mark.parametrize("layout", ["one-fs", "two-fs"])
def test_kill_9_during_a_burst_loses_and_duplicates_nothing(
    layout, request, movers
):
    fixture = "dirs" if layout == "one-fs" else "tmpfs_dest"
    src, dest = request.getfixturevalue(fixture)

    def content(number):
        return (b"%06d|" % number) * (1 + number % 7 * 1000)

    def create(numbers):
        for number in numbers:
            (src / f"f{number:05d}").write_bytes(content(number))

    first = movers(src, dest)
    first.wait_started()
    writer = threading.Thread(target=create, args=(range(1500),))
    writer.start()
    try:
        wait_for(lambda: len(os.listdir(dest)) > 300, "a burst in flight")
        first.kill()
    finally:
        writer.join()
    create(range(1500, 1800))

    second = movers(src, dest)
    second.wait_started()
    expected = [f"f{n:05d}" for n in range(1800)]
    wait_for(lambda: visible(dest) == expected, "every file, once")
    wait_for(lambda: visible(src) == [], "an empty source")
    for number, name in enumerate(expected):
        assert (dest / name).read_bytes() == content(number), name
    wait_hidden_empty(src, dest)


@pytest.mark.parametrize("layout", ["one-fs", "two-fs"])
def test_a_restart_finishes_what_a_killed_copy_left(layout, request, movers):
    fixture = "dirs" if layout == "one-fs" else "tmpfs_dest"
    src, dest = request.getfixturevalue(fixture)
    info = src.stat()
    hidden = f"{HIDDEN}{info.st_dev}-{info.st_ino}"
    claimed, staged = src / hidden, dest / hidden
    claimed.mkdir()
    staged.mkdir()
    # Killed after the link into place: only the clean-up is missing.
    (claimed / "placed").write_text("placed")
    (dest / "placed").write_text("placed")
    os.link(dest / "placed", staged / "placed")
    # Killed while copying, and before copying.
    (claimed / "half").write_text("half, complete")
    (staged / "half").write_text("half, c")
    (claimed / "claimed").write_text("claimed")

    mover = movers(src, dest)
    mover.wait_started()
    mover.wait_moved("half", "claimed")
    wait_hidden_empty(src, dest)
    assert visible(dest) == ["claimed", "half", "placed"]
    assert (dest / "placed").read_text() == "placed"
    assert (dest / "half").read_text() == "half, complete"
    assert (dest / "claimed").read_text() == "claimed"
    recovered = mover.logged(b"recovered", 1)
    assert [(e["src"], e["dest"]) for e in recovered] == [
        (bytes(src / "placed"), bytes(dest / "placed"))
    ]
    moved = mover.logged(b"moved", 2)
    assert sorted((e["src"], e["dest"]) for e in moved) == [
        (bytes(src / name), bytes(dest / name)) for name in ("claimed", "half")
    ]


def test_a_copy_across_file_systems_keeps_owner_mode_and_times(
    tmpfs_dest, movers
):
    src, dest = tmpfs_dest
    mover = movers(src, dest)
    mover.wait_started()
    staging = src / "staging.tmp"
    staging.write_text("owned")
    os.chown(staging, 1234, 5678)
    staging.chmod(0o640)
    os.utime(staging, (1_000_000_000, 1_000_000_000))
    staging.rename(src / "owned.txt")
    mover.wait_moved("owned.txt")
    info = (dest / "owned.txt").stat()
    assert (info.st_uid, info.st_gid) == (1234, 5678)
    assert stat.S_IMODE(info.st_mode) == 0o640
    assert info.st_mtime == 1_000_000_000
    assert (dest / "owned.txt").read_text() == "owned"


def test_a_file_that_cannot_be_copied_stays_and_is_logged(tmp_path, movers):
    require_root()
    src, dest = tmp_path / "origem", tmp_path / "destino"
    src.mkdir()
    dest.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(dest)],
        check=True,
    )
    try:
        mover = movers(src, dest)
        mover.wait_started()
        (src / "too-big.bin").write_bytes(b"z" * (2 * 1024 * 1024))
        wait_errors(mover, 1)
        (src / "small.txt").write_text("small")
        mover.wait_moved("small.txt")
        mover.sentinel()
        # Put back once, not retried in a loop: one attempt, one line.
        errors = wait_errors(mover, 1)
        assert len(errors) == 1
        assert (src / "too-big.bin").read_bytes() == b"z" * (2 * 1024 * 1024)
        assert not (dest / "too-big.bin").exists()
        wait_hidden_empty(src, dest)
        assert errors[0]["op"] == b"copy"
        assert errors[0]["src"] == bytes(src / "too-big.bin")
        assert b"No space left on device" in errors[0]["msg"]
        assert mover.process.poll() is None
    finally:
        subprocess.run(["umount", "-l", str(dest)], check=True)


def wait_errors(mover, count):
    """The first `count` event=error lines of stderr, once written."""

    def found():
        return [
            parse_line(line)
            for line in mover.stderr().splitlines()
            if line.startswith(b"event=error ")
        ]

    wait_for(lambda: len(found()) >= count, f"{count} error lines")
    return found()


def test_no_partial_file_under_its_final_name_across_file_systems(
    tmpfs_dest, movers
):
    src, dest = tmpfs_dest
    size = 48 * 1024 * 1024
    mover = movers(src, dest)
    mover.wait_started()
    seen_sizes = []

    def watch_destination():
        """Every size a visible name shows, until the whole file does."""
        end = time.monotonic() + DEADLINE
        while time.monotonic() < end and size not in seen_sizes:
            for name in visible(dest):
                with contextlib.suppress(FileNotFoundError):
                    seen_sizes.append(os.lstat(dest / name).st_size)

    watcher = threading.Thread(target=watch_destination)
    watcher.start()
    try:
        with (src / "big.bin").open("wb") as stream:
            for _ in range(size // (1024 * 1024)):
                stream.write(os.urandom(1024 * 1024))
    finally:
        watcher.join()
    assert set(seen_sizes) == {size}
    assert (dest / "big.bin").stat().st_size == size
    assert visible(src) == []
    wait_hidden_empty(src, dest)


SOURCE_GONE = (
    b"event=fatal reason=source_gone "
    b'msg="SRC_DIR %s is gone (deleted, moved away or unmounted)"\n'
)


def test_source_directory_deleted_exits_1(dirs, movers):
    src, dest = dirs
    mover = movers(src, dest)
    mover.wait_started()
    shutil.rmtree(src)
    assert mover.wait_exit() == 1
    assert mover.stderr() == SOURCE_GONE % bytes(src)


def test_source_directory_moved_away_exits_1(dirs, movers, tmp_path):
    src, dest = dirs
    mover = movers(src, dest)
    mover.wait_started()
    src.rename(tmp_path / "elsewhere")
    assert mover.wait_exit() == 1
    assert mover.stderr() == SOURCE_GONE % bytes(src)


@pytest.fixture
def nobody_dirs():
    """Directories owned by nobody (65534), below a path it may enter."""
    require_root()
    base = Path(tempfile.mkdtemp(prefix="move-arquivo-"))
    base.chmod(0o755)
    src, dest = base / "origem", base / "destino"
    for directory in (src, dest):
        directory.mkdir()
        os.chown(directory, NOBODY, NOBODY)
    yield src, dest
    shutil.rmtree(base)


NOBODY = 65534


def test_unreadable_source_directory_exits_1(nobody_dirs, movers):
    src, dest = nobody_dirs
    mover = movers(src, dest, user=NOBODY)
    mover.wait_started()
    mover.sentinel()
    src.chmod(0)
    assert mover.wait_exit() == 1
    assert mover.stderr() == (
        b"event=fatal reason=directory_unusable "
        b'msg="SRC_DIR %s is not readable and writable by this process"\n'
        % bytes(src)
    )


def test_destination_deleted_exits_1(dirs, movers):
    src, dest = dirs
    mover = movers(src, dest)
    mover.wait_started()
    shutil.rmtree(dest)
    (src / "orphan.txt").write_text("stays")
    assert mover.wait_exit() == 1
    assert mover.stderr() == (
        b"event=fatal reason=directory_unusable "
        b'msg="DEST_DIR %s does not exist"\n' % bytes(dest)
    )
    assert (src / "orphan.txt").read_text() == "stays"


def test_sigterm_stops_cleanly_with_status_0(dirs, movers):
    src, dest = dirs
    mover = movers(src, dest)
    mover.wait_started()
    session = mover.process.pid
    assert len(session_activity(session)) >= 2  # bash and inotifywait
    assert mover.stop() == 0
    assert mover.stdout().splitlines()[-1] == b"event=stopped signal=TERM"
    assert mover.stderr() == b""
    wait_for(lambda: session_activity(session) == {}, "no process left")


def test_idle_mover_uses_no_cpu(dirs, movers, tmp_path):
    src, dest = dirs
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    mover = movers(
        src,
        dest,
        METRICS_TEXTFILE_DIR=str(metrics),
        METRICS_INTERVAL_SECONDS="1",
    )
    mover.wait_started()
    mover.sentinel()
    prom = metrics / "move_arquivo.prom"
    wait_for(
        lambda: (
            prom.exists()
            and 'moved_files_total{mover="default"} 1\n' in prom.read_text()
        ),
        "metrics after the move",
    )
    session = mover.process.pid

    def settled():
        """Blocked in a read(2) on the event pipe, without a timeout
        (that would be a poll), and nothing else changing."""
        wchan = Path(f"/proc/{session}/wchan").read_text()
        first = session_activity(session)
        time.sleep(0.5)
        return "pipe_read" in wchan and session_activity(session) == first

    # The last metrics write may still be finishing (reaping its mv).
    wait_for(settled, "the mover to settle")
    before = session_activity(session)
    time.sleep(3)  # the idle interval under observation
    after = session_activity(session)
    assert len(before) >= 3  # bash, inotifywait, the stderr relay
    assert after == before


# --- metrics -----------------------------------------------------------


def metric_values(text):
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            values[series] = float(value)
    return values


def test_metrics_textfile_counts_moves_and_is_replaced_atomically(
    dirs, movers, tmp_path
):
    src, dest = dirs
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    (dest / "taken.txt").write_text("taken")
    mover = movers(
        src,
        dest,
        METRICS_TEXTFILE_DIR=str(metrics),
        METRICS_INTERVAL_SECONDS="3600",
        MOVER_NAME="alpha",
    )
    mover.wait_started()
    prom = metrics / "move_arquivo_alpha.prom"
    wait_for(prom.exists, "the first metrics file")
    first_inode = prom.stat().st_ino

    for name in ("a.txt", "b.txt", "taken.txt"):
        (src / name).write_text(name)
    (src / "waiting.part").write_text("part")
    mover.wait_moved("a.txt", "b.txt", "taken.1.txt")
    mover.sentinel()
    # One write per interval: the burst did not replace the file.
    assert prom.stat().st_ino == first_inode

    assert mover.stop() == 0
    assert os.listdir(metrics) == ["move_arquivo_alpha.prom"]
    values = metric_values(prom.read_text())
    label = '{mover="alpha"}'
    assert values[f"move_arquivo_moved_files_total{label}"] == 4
    assert values[f"move_arquivo_renamed_files_total{label}"] == 1
    assert values[f"move_arquivo_errors_total{label}"] == 0
    assert values[f"move_arquivo_overflows_total{label}"] == 0
    assert values[f"move_arquivo_waiting_files{label}"] == 1
    assert values[f"move_arquivo_last_move_timestamp_seconds{label}"] > 0

    assert_promtool_accepts_metrics(prom.read_text())


# --- units and installer -----------------------------------------------


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_unit_exposure_is_at_most_2(unit):
    assert unit_exposure(unit) <= 2.0


def unit_settings(path):
    settings = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def test_units_keep_the_installation_contract():
    plain = unit_settings(UNITS[0])
    template = unit_settings(UNITS[1])
    for settings in (plain, template):
        assert settings["ExecStart"] == ["/usr/local/bin/move_arquivos.sh"]
        assert settings["Restart"] == ["on-failure"]
        assert settings["After"] == ["local-fs.target"]
        assert settings["WantedBy"] == ["multi-user.target"]
        assert settings["ProtectSystem"] == ["strict"]
        assert "Documentation" in settings
        assert settings["OnFailure"] == ["notify-failure@%n.service"]
        assert settings["RestartSec"] == ["5s"]
        assert settings["StartLimitBurst"] == ["10"]
        assert settings["StartLimitIntervalSec"] == ["5min"]
        assert settings["ReadOnlyPaths"] == ["-/dev/shm /run /tmp /var/tmp"]
    assert plain["EnvironmentFile"] == ["-/etc/move_arquivo/move_arquivo.env"]
    assert plain["ReadWritePaths"] == ["-/opt/dir_origem -/opt/dir_destino"]
    assert template["EnvironmentFile"] == ["-/etc/move_arquivo/%i.env"]
    assert template["ReadWritePaths"] == ["-/opt/move_arquivo/%i"]


def tree(root):
    """Every path below root with its mode and content or link target."""
    entries = {}
    for path in sorted(Path(root).rglob("*")):
        info = path.lstat()
        if path.is_symlink():
            body = os.readlink(path)
        elif path.is_file():
            body = path.read_bytes()
        else:
            body = None
        entries[str(path.relative_to(root))] = (info.st_mode, body)
    return entries


def run_installer(*args):
    return subprocess.run(
        [str(INSTALLER), *args],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )


def test_installer_does_the_manual_steps_and_is_idempotent(tmp_path):
    require("systemctl")
    root = tmp_path / "root"
    result = run_installer("--root", str(root))
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        f"installed move_arquivo.service below {root} (enabled, not started)\n"
    )
    script = root / "usr/local/bin/move_arquivos.sh"
    assert script.read_bytes() == SCRIPT.read_bytes()
    assert stat.S_IMODE(script.stat().st_mode) == 0o755
    for unit in UNITS:
        installed = root / "etc/systemd/system" / unit.name
        assert installed.read_bytes() == unit.read_bytes()
        assert stat.S_IMODE(installed.stat().st_mode) == 0o644
    assert (root / "opt/dir_origem").is_dir()
    assert (root / "opt/dir_destino").is_dir()
    wants = root / "etc/systemd/system/multi-user.target.wants"
    assert os.readlink(wants / "move_arquivo.service") == (
        "/etc/systemd/system/move_arquivo.service"
    )

    before = tree(root)
    again = run_installer("--root", str(root))
    assert again.returncode == 0, again.stderr
    assert tree(root) == before


def test_installer_sets_up_a_template_instance(tmp_path):
    require("systemctl")
    root = tmp_path / "root"
    result = run_installer(
        "--root", str(root), "--instance", "fotos",
        "--src", "/srv/in", "--dest", "/srv/out",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (root / "etc/move_arquivo/fotos.env").read_text() == (
        "# Written by install-move-arquivo.sh; "
        "see move_arquivo.env.example.\n"
        "SRC_DIR=/srv/in\nDEST_DIR=/srv/out\n"
    )
    drop_in = "etc/systemd/system/move_arquivo@fotos.service.d"
    assert (root / drop_in / "directories.conf").read_text() == (
        "# Written by install-move-arquivo.sh: the directories of\n"
        "# /etc/move_arquivo/fotos.env.\n"
        "[Service]\nReadWritePaths=/srv/in /srv/out\n"
    )
    assert (root / "srv/in").is_dir()
    assert (root / "srv/out").is_dir()
    wants = root / "etc/systemd/system/multi-user.target.wants"
    assert os.readlink(wants / "move_arquivo@fotos.service") == (
        "/etc/systemd/system/move_arquivo@.service"
    )


def test_installer_rejects_bad_arguments(tmp_path):
    result = run_installer("--root", str(tmp_path), "--src", "relative")
    assert result.returncode == 2
    assert result.stderr == (
        "install-move-arquivo: --src must be an absolute path without "
        "spaces, quotes, \\ or % (try --help)\n"
    )
    result = run_installer("--instance", "a/b")
    assert result.returncode == 2
    assert "--instance may hold only letters" in result.stderr
    assert os.listdir(tmp_path) == []

    help_text = run_installer("--help")
    assert help_text.returncode == 0
    assert "Usage: install-move-arquivo.sh [--root DIR]" in help_text.stdout
