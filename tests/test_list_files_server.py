"""Tests for list_files_server.py against a real server process.

Every test starts the real entry point as a subprocess on 127.0.0.1
port 0, talks HTTP to it over a real socket and stops it with SIGTERM.
Every response a test receives is checked against the server's own
OpenAPI document when the test ends.
"""

import base64
import contextlib
import datetime
import gzip
import http.client
import importlib.util
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import jsonschema
import pytest
from openapi_schema_validator import OAS31Validator
from support import (
    ON_CI,
    REPO_ROOT,
    assert_promtool_accepts_metrics,
    require,
    require_root,
)

SERVER = REPO_ROOT / "list_files_server.py"
README = REPO_ROOT / "README.md"
LISTENING = re.compile(r"listening on (\S+) port (\d+)")
NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")


class ServerProcess:
    """The server as a child process, with its output collected.

    `address=False` leaves out --host and --port; `run_as` is a command
    prefix such as NOBODY, and `command` the interpreter and script.
    """

    def __init__(
        self,
        directory,
        *args,
        env=None,
        address=True,
        run_as=(),
        command=(sys.executable, str(SERVER)),
    ):
        environment = {"PATH": os.environ["PATH"], "PYTHONUNBUFFERED": "1"}
        environment.update(env or {})
        argv = [*run_as, *command]
        if directory is not None:
            argv += ["--dir", str(directory)]
        if address:
            argv += ["--host", "127.0.0.1", "--port", "0"]
        argv += args
        self.process = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=environment,
            text=True,
            errors="replace",
        )
        self.stdout_lines = []
        self.stderr_lines = []
        self.responses = []
        self.spec = None
        self.host = self.port = None
        self.ready = threading.Event()
        self.readers = [
            threading.Thread(
                target=self.collect,
                args=(self.process.stdout, self.stdout_lines),
                daemon=True,
            ),
            threading.Thread(
                target=self.collect,
                args=(self.process.stderr, self.stderr_lines),
                daemon=True,
            ),
        ]
        for reader in self.readers:
            reader.start()
        if not self.ready.wait(10):
            self.kill()
            raise AssertionError("no listening line:\n" + self.stderr())

    def collect(self, stream, lines):
        for line in stream:
            lines.append(line)
            match = LISTENING.search(line)
            if match and self.port is None:
                self.host = match.group(1)
                self.port = int(match.group(2))
                self.ready.set()
        self.ready.set()

    def stderr(self):
        return "".join(self.stderr_lines)

    def access_log(self):
        return [json.loads(line) for line in self.stdout_lines]

    def connect(self, timeout=10):
        return http.client.HTTPConnection(
            self.host, self.port, timeout=timeout
        )

    def request(self, path, method="GET", headers=None):
        connection = self.connect()
        try:
            return self.exchange(connection, path, method, headers)
        finally:
            connection.close()

    def exchange(self, connection, path, method="GET", headers=None):
        """One request on an open connection: (status, headers, body)."""
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        body = response.read()
        response_headers = dict(response.getheaders())
        self.record(method, path, response.status, response_headers, body)
        return response.status, response_headers, body

    def record(self, method, path, status, headers, body):
        """Keep a response for validate_responses()."""
        self.responses.append((method, path, status, headers, body))

    def load_spec(self):
        if self.spec is None and self.process.poll() is None:
            connection = self.connect()
            connection.request("GET", "/openapi.json")
            response = connection.getresponse()
            assert response.status == 200
            self.spec = json.loads(response.read())
            connection.close()

    def validate_responses(self):
        """Check every recorded response against the served OpenAPI."""
        self.load_spec()
        for response in self.responses:
            check_against_spec(self.spec, *response)

    def get_json(self, path, status=200, headers=None):
        code, response_headers, body = self.request(path, headers=headers)
        assert code == status, body
        assert response_headers["Content-Type"] == "application/json"
        return json.loads(body)

    def stop(self, signum=signal.SIGTERM, timeout=10):
        self.load_spec()
        self.process.send_signal(signum)
        code = self.process.wait(timeout)
        for reader in self.readers:
            reader.join(5)
        return code

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def files(tmp_path):
    root = tmp_path / "files"
    root.mkdir()
    (root / "b.txt").write_bytes(b"hello")
    (root / "a.txt").write_bytes(b"")
    (root / "sub").mkdir()
    (root / "sub" / "inner.txt").write_bytes(b"12345678")
    return root


@pytest.fixture(scope="module")
def many_files(tmp_path_factory):
    """10,050 empty files; tests must not change this directory."""
    root = tmp_path_factory.mktemp("many")
    make_files(root, 10_050)
    return root


@pytest.fixture
def start_server():
    started = []

    def start(directory, *args, **options):
        server = ServerProcess(directory, *args, **options)
        started.append(server)
        return server

    yield start
    try:
        for server in started:
            server.validate_responses()
    finally:
        for server in started:
            server.kill()


@pytest.fixture
def server(start_server, files):
    return start_server(files)


def raw_exchange(server, data, timeout=10):
    """Send raw bytes, return everything received until EOF."""
    address = (server.host, server.port)
    with socket.create_connection(address, timeout) as s:
        s.sendall(data)
        reply = read_until_closed(s)
    words = data.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
    method, path = [*words, "-", "-"][:2]
    server.record(method, path, *parse_reply(reply))
    return reply


def read_until_closed(sock):
    """Everything the peer sends until it closes (or resets)."""
    chunks = []
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def parse_reply(reply):
    """(status, headers, body) of one HTTP response in raw bytes."""
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


# What a request gets that the document has no operation for: the
# answers to a head too broken or too big to be routed, plus 404 for a
# path it does not describe or 405 for a method it does not.
UNROUTED = {
    "400": "BadRequest",
    "408": "RequestTimeout",
    "414": "URITooLong",
    "431": "HeaderFieldsTooLarge",
    "503": "TooManyConnections",
}


def declared_responses(spec, method, path):
    """The responses the document allows for this request."""
    path = path.partition("?")[0]
    if path in ("/files", "/files/"):
        template = "/files"
    elif path.startswith("/files/"):
        template = "/files/{path}"
    else:
        template = path
    operations = spec["paths"].get(template)
    if operations is not None and method.lower() in operations:
        return operations[method.lower()]["responses"]
    if operations is None:
        extra = {"404": "NotFound"}
    else:
        extra = {"405": "MethodNotAllowed"}
    return {
        status: {"$ref": f"#/components/responses/{name}"}
        for status, name in {**UNROUTED, **extra}.items()
    }


def resolve(spec, node):
    """Follow a local $ref ("#/components/...") to what it names."""
    while "$ref" in node:
        target = spec
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def check_against_spec(spec, method, path, status, headers, body):
    """Validate one response against the OpenAPI document.

    The status must be declared for the operation (there is no
    default), every required header must be sent, every declared
    header that is sent must match its schema, and the body must match
    the schema of its media type.
    """
    responses = declared_responses(spec, method, path)
    assert str(status) in responses, (
        f"{method} {path}: status {status} is not declared"
    )
    response = resolve(spec, responses[str(status)])
    sent = {name.lower(): value for name, value in headers.items()}
    for name, header in response.get("headers", {}).items():
        value = sent.get(name.lower())
        if value is None:
            assert not header.get("required"), (
                f"{method} {path}: {status} without the header {name}"
            )
            continue
        OAS31Validator(header["schema"]).validate(value)
    if status == 304 or method == "HEAD":
        assert body == b""
        return
    media_type = sent["content-type"].split(";")[0]
    content = response.get("content", {})
    assert media_type in content, (
        f"{method} {path}: {status} as {media_type} is not declared"
    )
    schema = content[media_type]["schema"]
    if sent.get("content-encoding") == "gzip":
        body = gzip.decompress(body)
    if media_type == "application/json":
        instance = json.loads(body)
    else:
        instance = body.decode("utf-8")
    OAS31Validator(
        {**schema, "components": spec["components"]},
        format_checker=OAS31Validator.FORMAT_CHECKER,
    ).validate(instance)


def names(document):
    return [entry["name"] for entry in document["files"]]


def test_listing_has_every_entry_with_metadata_in_name_order(server, files):
    document = server.get_json("/files")
    assert document["directory"] == "/"
    assert document["count"] == 3
    assert document["next"] is None
    assert names(document) == ["a.txt", "b.txt", "sub"]
    by_name = {entry["name"]: entry for entry in document["files"]}
    assert by_name["b.txt"]["type"] == "file"
    assert by_name["b.txt"]["size"] == 5
    assert by_name["sub"]["type"] == "dir"
    mtime = os.stat(files / "b.txt").st_mtime_ns
    expected = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(mtime // 10**9))
    assert by_name["b.txt"]["mtime"] == (
        f"{expected}.{mtime % 10**9 // 1000:06d}Z"
    )


def test_subdirectory_listing(server):
    document = server.get_json("/files/sub")
    assert document["directory"] == "/sub"
    assert names(document) == ["inner.txt"]
    assert document["files"][0]["size"] == 8


def test_health_and_readiness(server):
    assert server.get_json("/healthz") == {"status": "ok"}
    assert server.get_json("/readyz") == {"status": "ready"}


def test_missing_directory_is_not_ready_but_serves(start_server, tmp_path):
    server = start_server(tmp_path / "absent")
    assert server.get_json("/readyz", status=503) == {
        "status": "not ready",
        "reason": "the directory does not exist",
    }
    assert server.get_json("/files", status=503) == {
        "error": {"status": 503, "message": "the directory is not available"}
    }
    assert server.get_json("/healthz") == {"status": "ok"}
    (tmp_path / "absent").mkdir()
    assert server.get_json("/readyz") == {"status": "ready"}


@pytest.mark.parametrize(
    "path",
    [
        "/files/..",
        "/files/../etc",
        "/files/%2e%2e",
        "/files/%2E%2E/%2e%2e/etc",
        "/files//etc",
        "/files/sub/../..",
        "/files/..%2fetc",
        "/files/%2fetc",
        "/files/sub%5c..%5c..",
        "/files/sub\\..",
        "/files/%00",
        "/files/sub/%00/x",
        "/files/.",
        "/files/nonexistent",
        "/files/a.txt",
    ],
)
def test_traversal_attempts_get_404(server, path):
    assert server.get_json(path, status=404) == {
        "error": {"status": 404, "message": "not found"}
    }


def test_unknown_path_is_404_and_other_methods_405(server):
    assert server.get_json("/nope", status=404)["error"]["status"] == 404
    for path in ("/files", "/files/sub", "/healthz", "/openapi.json"):
        for method in ("POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE"):
            status, headers, body = server.request(path, method=method)
            assert status == 405, (method, path)
            assert headers["Allow"] == "GET, HEAD"
            assert json.loads(body) == {
                "error": {"status": 405, "message": "method not allowed"}
            }


def test_sigterm_when_idle_exits_0(server):
    server.get_json("/healthz")
    assert server.stop(signal.SIGTERM) == 0
    assert "stopped" in server.stderr()


def test_sigint_exits_0_with_an_idle_keepalive_connection(server):
    connection = server.connect()
    _, _, body = server.exchange(connection, "/healthz")
    assert body == b'{"status":"ok"}\n'
    assert server.stop(signal.SIGINT) == 0
    connection.close()


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (
            ["--port", "x"],
            {},
            "PORT must be a number from 0 to 65535, got 'x'",
        ),
        (
            [],
            {"PORT": "70000"},
            "PORT must be a number from 0 to 65535, got '70000'",
        ),
        (
            ["--max-entries", "0"],
            {},
            "MAX_ENTRIES must be a number from 1 to 10000000, got '0'",
        ),
        (
            [],
            {"LOG_LEVEL": "loud"},
            "LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got 'LOUD'",
        ),
        (["--bogus"], {}, "unrecognized arguments: --bogus"),
    ],
)
def test_bad_configuration_exits_2_with_one_line(args, env, message, tmp_path):
    result = subprocess.run(
        [sys.executable, str(SERVER), "--dir", str(tmp_path), *args],
        capture_output=True,
        text=True,
        env={"PATH": os.environ["PATH"], **env},
        timeout=20,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr == f"list_files_server.py: error: {message}\n"
    assert result.stdout == ""


def free_ports(count):
    """Distinct TCP ports free on 127.0.0.1 just now."""
    with contextlib.ExitStack() as stack:
        probes = [stack.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]


def refuses(host, port):
    try:
        socket.create_connection((host, port), 5).close()
    except ConnectionRefusedError:
        return True
    return False


def one_file_directory(parent, name):
    directory = parent / name
    directory.mkdir()
    (directory / f"{name}.txt").touch()
    return directory


def test_port_dir_and_host_come_from_the_environment(start_server, tmp_path):
    directory = one_file_directory(tmp_path, "from-env")
    (port,) = free_ports(1)
    server = start_server(
        None,
        address=False,
        env={
            "FILE_DIRECTORY": str(directory),
            "HOST": "127.0.0.2",
            "PORT": str(port),
        },
    )
    assert (server.host, server.port) == ("127.0.0.2", port)
    assert names(server.get_json("/files")) == ["from-env.txt"]
    assert refuses("127.0.0.1", port)


def test_flags_override_port_dir_and_host_from_the_environment(
    start_server, tmp_path
):
    env_directory = one_file_directory(tmp_path, "from-env")
    flag_directory = one_file_directory(tmp_path, "from-flag")
    env_port, flag_port = free_ports(2)
    server = start_server(
        flag_directory,
        "--host",
        "127.0.0.3",
        "--port",
        str(flag_port),
        address=False,
        env={
            "FILE_DIRECTORY": str(env_directory),
            "HOST": "127.0.0.2",
            "PORT": str(env_port),
        },
    )
    assert (server.host, server.port) == ("127.0.0.3", flag_port)
    assert names(server.get_json("/files")) == ["from-flag.txt"]
    assert refuses("127.0.0.2", flag_port)
    assert refuses("127.0.0.2", env_port)


def test_access_log_off_leaves_stdout_empty(start_server, files):
    server = start_server(files, env={"ACCESS_LOG": "off"})
    assert server.get_json("/healthz") == {"status": "ok"}
    assert server.stop() == 0
    assert server.stdout_lines == []


def test_log_level_warning_hides_info_lines(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [
            sys.executable,
            str(SERVER),
            "--dir",
            str(tmp_path / "absent"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={"PATH": os.environ["PATH"], "LOG_LEVEL": "WARNING"},
    )
    try:

        def accepts():
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", port), 1),
            ):
                return True
            return False

        assert wait_until(accepts)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0
    assert stdout == ""
    assert stderr.endswith("WARNING not ready: the directory does not exist\n")
    assert stderr.count("\n") == 1


def test_access_log_is_one_json_line_per_request(server):
    before = datetime.datetime.now(datetime.UTC)
    reply = raw_exchange(
        server,
        b"GET /files/sub?x=\x1b[31m HTTP/1.1\r\nHost: t\r\n"
        b"Connection: close\r\n\r\n",
    )
    after = datetime.datetime.now(datetime.UTC)
    assert reply.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    server.stop()
    entries = server.access_log()
    assert [e["path"] for e in entries] == [
        "/files/sub?x=\x1b[31m",
        "/openapi.json",
    ]
    entry = entries[0]
    assert entry["method"] == "GET"
    assert entry["path"] == "/files/sub?x=\x1b[31m"
    assert entry["status"] == 400
    assert entry["client"] == "127.0.0.1"
    assert isinstance(entry["bytes"], int) and entry["bytes"] > 0
    assert isinstance(entry["duration"], float)
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", entry["time"]
    )
    logged = datetime.datetime.fromisoformat(entry["time"])
    assert logged.utcoffset() == datetime.timedelta(0)
    # stamped while the request was answered; a second of slack covers
    # the rounding to microseconds and any adjustment of the clock
    second = datetime.timedelta(seconds=1)
    assert before - second < logged < after + second
    assert "\x1b" not in server.stdout_lines[0]
    assert "\\u001b" in server.stdout_lines[0]


def test_access_log_lines_are_written_while_the_server_runs(server):
    """Lines are batched by a writer thread, not held until exit."""
    for number in range(3):
        server.get_json(f"/files?limit={number + 1}")
        assert wait_until(lambda n=number: len(server.stdout_lines) > n)
    assert server.process.poll() is None
    paths = [entry["path"] for entry in server.access_log()]
    assert paths == [f"/files?limit={n + 1}" for n in range(3)]


def test_access_log_lines_stay_whole_under_concurrent_long_requests(server):
    """Lines longer than PIPE_BUF could interleave in a pipe: the server
    shortens them, and every line written concurrently stays whole."""
    long_target = "/files/" + "\u00e9" * 3000  # 6 bytes each once escaped
    long_request = (
        f"GET {long_target} HTTP/1.1\r\nHost: t\r\n"
        "Connection: close\r\n\r\n".encode("latin-1")
    )
    short_request = (
        b"GET /files HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    rounds = 40
    errors = []

    def client(request):
        try:
            for _ in range(rounds):
                raw_exchange(server, request)
        except Exception as error:  # reported below
            errors.append(error)

    threads = [
        threading.Thread(target=client, args=(request,))
        for request in (long_request, long_request, short_request)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    server.stop()
    entries = server.access_log()  # fails on any line that is not JSON
    assert entries.pop()["path"] == "/openapi.json"  # from server.stop()
    longs = [e for e in entries if e["path"] != "/files"]
    shorts = [e for e in entries if e["path"] == "/files"]
    assert len(longs) == 2 * rounds and len(shorts) == rounds
    for entry in longs:
        assert entry["truncated"] is True
        assert entry["method"] == "GET"
        assert entry["status"] == 404
        assert 100 < len(entry["path"]) < len(long_target)
        assert long_target.startswith(entry["path"])
    assert all("truncated" not in entry for entry in shorts)
    assert all(len(line.encode()) <= 4096 for line in server.stdout_lines)


def test_connection_gauges_count_idle_keep_alive_connections(server):
    idle = [server.connect() for _ in range(3)]
    try:
        for connection in idle:
            assert server.exchange(connection, "/healthz")[0] == 200
        status, _, body = server.request("/metrics")
        assert status == 200
        text = body.decode()
        assert metric_value(text, "list_files_http_connections_open") == 4
        assert metric_value(text, "list_files_http_requests_in_flight") == 1
    finally:
        for connection in idle:
            connection.close()


# ------------------------------------------------------------ helpers 2


def make_files(directory, count, name_length=0):
    for number in range(count):
        name = f"f{number:06d}".ljust(name_length, "x")
        os.close(os.open(directory / name, os.O_CREAT | os.O_WRONLY, 0o644))


def collect_pages(server, path, headers=None):
    """Follow `next` from path; return the documents of every page."""
    documents = []
    while path is not None:
        documents.append(server.get_json(path, headers=headers))
        path = documents[-1]["next"]
    return documents


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def metric_value(text, name):
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in metrics")


# ----------------------------------------------------------- listings


def test_paging_over_10000_entries_loses_and_repeats_nothing(
    start_server, many_files
):
    server = start_server(many_files, "--max-entries", "1000")
    pages = collect_pages(server, "/files")
    assert len(pages) == 11
    assert [p["count"] for p in pages] == [1000] * 10 + [50]
    assert {p["total"] for p in pages} == {10_050}
    listed = [name for page in pages for name in names(page)]
    assert listed == sorted(os.listdir(many_files))
    assert pages[-1]["next"] is None
    descending = collect_pages(server, "/files?order=desc&limit=999")
    listed = [name for page in descending for name in names(page)]
    assert listed == sorted(os.listdir(many_files), reverse=True)


def test_paging_stays_exact_while_the_directory_changes(
    start_server, tmp_path
):
    make_files(tmp_path, 1_500)
    server = start_server(tmp_path)
    path = "/files?limit=97&sort=size&order=desc"
    seen = []
    extra = 0
    while path is not None:
        document = server.get_json(path)
        seen += names(document)
        path = document["next"]
        (tmp_path / f"zz-new-{extra}").touch()
        os.unlink(tmp_path / f"f{extra * 7:06d}")
        extra += 1
    assert len(seen) == len(set(seen))
    steady = {f"f{n:06d}" for n in range(1_500)}
    steady -= {f"f{n * 7:06d}" for n in range(extra)}
    assert steady <= set(seen)


def test_without_limit_a_large_directory_is_paged_not_truncated(
    start_server, tmp_path
):
    make_files(tmp_path, 25)
    server = start_server(tmp_path, "--max-entries", "10")
    first = server.get_json("/files")
    assert first["count"] == 10
    assert first["total"] == 25
    assert first["next"].startswith("/files?cursor=")
    _, headers, _ = server.request("/files")
    assert headers["Link"] == f'<{first["next"]}>; rel="next"'
    assert len(collect_pages(server, "/files")) == 3


def test_sort_order_type_pattern_and_hidden_filters(start_server, tmp_path):
    for name, size in (("big.log", 300), ("mid.txt", 200), ("small.txt", 1)):
        (tmp_path / name).write_bytes(b"x" * size)
        os.utime(tmp_path / name, ns=(size * 10**9, size * 10**9))
    (tmp_path / ".hidden.txt").write_bytes(b"xx")
    os.utime(tmp_path / ".hidden.txt", ns=(2 * 10**9, 2 * 10**9))
    (tmp_path / "adir").mkdir()
    os.utime(tmp_path / "adir", ns=(250 * 10**9, 250 * 10**9))
    server = start_server(tmp_path)
    get = server.get_json
    assert names(get("/files?sort=size&type=file")) == [
        "small.txt",
        ".hidden.txt",
        "mid.txt",
        "big.log",
    ]
    assert names(get("/files?sort=mtime&order=desc")) == [
        "big.log",
        "adir",
        "mid.txt",
        ".hidden.txt",
        "small.txt",
    ]
    assert names(get("/files?order=desc&hidden=false")) == [
        "small.txt",
        "mid.txt",
        "big.log",
        "adir",
    ]
    assert names(get("/files?pattern=*.txt")) == [
        ".hidden.txt",
        "mid.txt",
        "small.txt",
    ]
    assert names(get("/files?type=dir,symlink")) == ["adir"]
    assert get("/files?pattern=%5Bbm%5D*&hidden=0")["total"] == 2


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("limit=0", "limit must be an integer from 1 to 100000"),
        ("limit=100001", "limit must be an integer from 1 to 100000"),
        ("limit=ten", "limit must be an integer from 1 to 100000"),
        ("sort=owner", "sort must be name, mtime or size"),
        ("order=up", "order must be asc or desc"),
        (
            "type=file,pipe",
            "type must be a comma-separated list of file, dir, symlink, other",
        ),
        ("hidden=maybe", "hidden must be true or false"),
        ("format=xml", "format must be json or text"),
        ("pattern=", "pattern must be 1 to 255 characters"),
        ("colour=red", "unknown query parameter 'colour'"),
        ("sort=name&sort=size", "query parameter 'sort' is repeated"),
        ("cursor=%%%", "cursor is not valid"),
        ("cursor=WzEsMiwzXQ", "cursor is not valid"),
        ("cursor=WzEsIDIsIDMsICJhIl0", "cursor belongs to a different query"),
    ],
)
def test_bad_query_values_get_400_with_the_reason(server, query, message):
    assert server.get_json(f"/files?{query}", status=400) == {
        "error": {"status": 400, "message": message}
    }


def test_a_cursor_only_works_for_the_query_it_came_from(
    start_server, tmp_path
):
    make_files(tmp_path, 5)
    server = start_server(tmp_path)
    cursor = server.get_json("/files?limit=2")["next"].split("cursor=")[1]
    cursor = cursor.split("&")[0]
    assert server.get_json(
        f"/files?cursor={cursor}&sort=size", status=400
    ) == {
        "error": {
            "status": 400,
            "message": "cursor belongs to a different query",
        }
    }
    assert names(server.get_json(f"/files?cursor={cursor}&limit=2")) == [
        "f000002",
        "f000003",
    ]


INVALID_CURSOR = {"error": {"status": 400, "message": "cursor is not valid"}}


def urlsafe_b64(raw):
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def first_cursor(server, query):
    """The cursor of the first page of `query` (limit=1), decoded."""
    document = server.get_json(f"/files?limit=1&{query}")
    text = re.search(r"cursor=([^&]+)", document["next"]).group(1)
    return json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))


def test_a_forged_cursor_of_the_wrong_shape_is_400_never_500(server):
    """Forged with the right fingerprint, so that only the shape of the
    value can reject it: types that do not compare with the listing's
    sort keys used to get as far as the search, and a 500."""
    for sort in ("name", "mtime", "size"):
        version, fingerprint, position, *key = first_cursor(
            server, f"sort={sort}"
        )
        assert (version, position) == (1, 1)
        # the key of the other kind of sort: (size, name) or (name,)
        other_key = [5, "a.txt"] if sort == "name" else ["a.txt"]
        forged = [
            [1, fingerprint, 0, *other_key],
            [1, fingerprint, 0, 5],
            [1, fingerprint, 0, "x", 5],
            [1, fingerprint, 0, "x", "a.txt"],
            [1, fingerprint, 0, 5, 5, "a.txt"],
            [1, fingerprint, 0, True, "a.txt"],
            [1, fingerprint, 0, 0.5, "a.txt"],
            [1, fingerprint, 0, [0], "a.txt"],
            [1, fingerprint, 0, ["a.txt"]],
            [1, fingerprint, 0, None],
            [1, fingerprint, 0, {"name": "a.txt"}],
            [True, fingerprint, 0, *key],
            [1.0, fingerprint, 0, *key],
            [1, fingerprint, True, *key],
            [1, fingerprint, -1, *key],
            [1, fingerprint, 0.0, *key],
            [1, fingerprint, [0], *key],
            [1, str(fingerprint), 0, *key],
            [[1], fingerprint, 0, *key],
            [1, fingerprint, 0],
            [],
            {"version": 1, "fingerprint": fingerprint},
            "a.txt",
            7,
            None,
        ]
        for value in forged:
            cursor = urlsafe_b64(json.dumps(value).encode())
            path = f"/files?limit=1&sort={sort}&cursor={cursor}"
            document = server.get_json(path, status=400)
            assert document == INVALID_CURSOR, (sort, value)
        # the same fingerprint with the right shape is taken
        cursor = urlsafe_b64(json.dumps([1, fingerprint, 0, *key]).encode())
        document = server.get_json(
            f"/files?limit=1&sort={sort}&cursor={cursor}"
        )
        assert document["count"] == 1


def test_a_deeply_nested_or_over_long_cursor_is_400_never_500(server):
    _, fingerprint, _, name = first_cursor(server, "sort=name")
    for cursor in (
        urlsafe_b64(b"[" * 3000),  # deeper than json.loads can recurse
        urlsafe_b64(b"[" * 1000 + b"1" + b"]" * 1000),
        # a well-formed cursor, but longer than any the server makes
        urlsafe_b64(json.dumps([1, fingerprint, 0, name * 700]).encode()),
        "A" * 4097,
    ):
        document = server.get_json(f"/files?cursor={cursor}", status=400)
        assert document == INVALID_CURSOR, cursor[:40]
    # too long for a request line: refused before the query is read
    cursor = urlsafe_b64(b"[" * 100_000).encode()
    reply = raw_exchange(
        server, b"GET /files?cursor=" + cursor + b" HTTP/1.1\r\n\r\n"
    )
    assert reply.startswith(b"HTTP/1.1 414 ")


def test_the_longest_cursor_the_server_makes_is_accepted(
    start_server, tmp_path
):
    """255 bytes that are not UTF-8 escape to the longest JSON name."""
    for byte in (b"\xfe", b"\xff"):
        name = os.path.join(os.fsencode(tmp_path), byte * 255)
        os.close(os.open(name, os.O_CREAT))
    server = start_server(tmp_path)
    first = server.get_json("/files?limit=1&sort=mtime&order=desc")
    cursor = re.search(r"cursor=([^&]+)", first["next"]).group(1)
    assert 2000 < len(cursor) < 4096
    second = server.get_json(first["next"])
    assert second["count"] == 1
    assert {first["files"][0]["name_b64"], second["files"][0]["name_b64"]} == {
        base64.b64encode(byte * 255).decode() for byte in (b"\xfe", b"\xff")
    }


def test_odd_names_are_listed_losslessly(start_server, tmp_path):
    odd = [
        b"with space",
        b"new\nline",
        b"tab\tand\\backslash",
        b"caf\xc3\xa9",
        b"bad\xffutf8\xfe",
        b"\x1b[31mred",
        b"L" * 255,
    ]
    for raw in odd:
        os.close(os.open(os.path.join(os.fsencode(tmp_path), raw), os.O_CREAT))
    server = start_server(tmp_path)
    _, _, body = server.request("/files")
    body.decode("utf-8")  # the JSON stays valid UTF-8
    document = json.loads(body)
    entries = document["files"]
    recovered = [
        base64.b64decode(e["name_b64"])
        if "name_b64" in e
        else e["name"].encode()
        for e in entries
    ]
    assert sorted(recovered) == sorted(odd)
    by_raw = dict(zip(recovered, entries, strict=True))
    assert by_raw[b"bad\xffutf8\xfe"]["name"] == "bad\ufffdutf8\ufffd"
    assert by_raw[b"caf\xc3\xa9"] == {
        **by_raw[b"caf\xc3\xa9"],
        "name": "café",
    }
    assert "name_b64" not in by_raw[b"caf\xc3\xa9"]
    _, headers, text = server.request(
        "/files", headers={"Accept": "text/plain"}
    )
    assert headers["Content-Type"] == "text/plain; charset=utf-8"
    lines = text.decode("utf-8").split("\n")
    assert lines[-1] == ""
    assert sorted(lines[:-1]) == sorted(
        [
            "with space",
            "new\\nline",
            "tab\\tand\\\\backslash",
            "café",
            "bad\\xffutf8\\xfe",
            "\\x1b[31mred",
            "L" * 255,
        ]
    )


def test_fifo_socket_and_broken_symlink_entries_never_block(
    start_server, tmp_path
):
    os.mkfifo(tmp_path / "fifo")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "sock"))
    (tmp_path / "broken").symlink_to(tmp_path / "missing")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    try:
        server = start_server(tmp_path)
        by_name = {e["name"]: e for e in server.get_json("/files")["files"]}
        assert by_name["fifo"]["type"] == "other"
        assert by_name["sock"]["type"] == "other"
        assert by_name["broken"]["type"] == "symlink"
        assert by_name["broken"]["size"] == len(str(tmp_path / "missing"))
        assert by_name["loop"]["type"] == "symlink"
        for path in ("/files/fifo", "/files/sock", "/files/broken"):
            assert server.get_json(path, status=404)["error"]["status"] == 404
    finally:
        listener.close()


def test_symlinks_out_of_and_inside_the_root_are_404(start_server, tmp_path):
    root = tmp_path / "root"
    (root / "real").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "SECRET").touch()
    (root / "out").symlink_to(tmp_path / "outside")
    (root / "up").symlink_to("..")
    (root / "in").symlink_to("real")
    (root / "real" / "deeper").symlink_to("/")
    server = start_server(root)
    for path in (
        "/files/out",
        "/files/up",
        "/files/in",
        "/files/real/deeper",
        "/files/up/outside",
        "/files/real/deeper/etc",
    ):
        assert server.get_json(path, status=404) == {
            "error": {"status": 404, "message": "not found"}
        }
    listing = server.get_json("/files")
    assert {e["name"]: e["type"] for e in listing["files"]} == {
        "in": "symlink",
        "out": "symlink",
        "real": "dir",
        "up": "symlink",
    }


def test_a_subdirectory_swapped_for_a_symlink_never_escapes(
    start_server, tmp_path
):
    root = tmp_path / "root"
    (root / "swap").mkdir(parents=True)
    (root / "swap" / "inside").touch()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "SECRET").touch()
    server = start_server(root)
    stop = threading.Event()

    def swapper():
        held, link = root / "held", root / "link"
        link.symlink_to(tmp_path / "outside")
        while not stop.is_set():
            os.rename(root / "swap", held)
            os.rename(link, root / "swap")
            os.rename(root / "swap", link)
            os.rename(held, root / "swap")

    thread = threading.Thread(target=swapper)
    thread.start()
    statuses = set()
    try:
        for _ in range(300):
            status, _, body = server.request("/files/swap")
            statuses.add(status)
            assert b"SECRET" not in body
    finally:
        stop.set()
        thread.join()
    assert statuses <= {200, 404}


def test_a_change_right_after_a_listing_shows_in_the_next(
    start_server, tmp_path
):
    server = start_server(tmp_path)
    connection = server.connect()
    seen = []

    def listing():
        return names(json.loads(server.exchange(connection, "/files")[2]))

    for number in range(40):
        seen.append(listing())
        (tmp_path / f"n{number:03d}").touch()
        assert f"n{number:03d}" in listing()
        os.rename(tmp_path / f"n{number:03d}", tmp_path / f"r{number:03d}")
        after = listing()
        assert f"r{number:03d}" in after
        assert f"n{number:03d}" not in after
        os.unlink(tmp_path / f"r{number:03d}")
        assert listing() == []
    connection.close()


@pytest.fixture
def coarse_directory(tmp_path):
    """A directory whose timestamps have whole seconds: the root of an
    ext2 file system with 128-byte inodes, loop-mounted.

    Here ext4 and tmpfs keep nanoseconds and the kernel gives every
    change a new ctime, so only such a file system lets a change leave
    the directory's stat exactly as it was.
    """
    require_root()
    image = tmp_path / "coarse.img"
    with open(image, "wb") as stream:
        stream.truncate(8 << 20)
    subprocess.run(
        [require("mkfs.ext2"), "-q", "-F", "-I", "128", str(image)],
        capture_output=True,
        check=True,
    )
    mountpoint = tmp_path / "coarse"
    mountpoint.mkdir()
    mounted = subprocess.run(
        [require("mount"), "-o", "loop", str(image), str(mountpoint)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        message = f"cannot loop-mount ext2: {mounted.stderr.strip()}"
        if ON_CI:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


@pytest.mark.root
def test_a_change_that_leaves_the_directory_stat_unchanged_still_shows(
    coarse_directory, start_server
):
    """The "racy" guard: a scan that started within the directory's
    timestamp granularity of its mtime is not trusted for later
    requests, because a change right after it may not show in the
    directory's stat at all."""
    root = coarse_directory
    # what the server compares to decide a scan is still valid
    directory_identity = load_server_module().directory_identity
    server = start_server(root)
    unchanged = 0
    for attempt in range(10):
        # start just after a second begins: the steps below then share
        # the directory's one-second timestamps
        time.sleep(1.05 - time.time() % 1)
        (root / f"seen{attempt}").touch()
        before = os.stat(root)
        assert f"seen{attempt}" in names(server.get_json("/files"))
        (root / f"new{attempt}").touch()
        os.utime(root, ns=(before.st_atime_ns, before.st_mtime_ns))
        if directory_identity(os.stat(root)) == directory_identity(before):
            unchanged += 1
        assert f"new{attempt}" in names(server.get_json("/files"))
        if unchanged == 2:
            break
    assert unchanged, "every change moved the directory's stat"


def test_size_and_mtime_are_re_read_after_twice_the_stat_ttl(
    start_server, tmp_path
):
    target = tmp_path / "growing"
    target.write_bytes(b"1")
    server = start_server(tmp_path, "--stat-ttl", "0.2")
    assert server.get_json("/files")["files"][0]["size"] == 1
    target.write_bytes(b"12345")
    os.utime(target, ns=(10**18, 10**18))
    time.sleep(1)  # more than twice the TTL: the next answer is fresh
    entry = server.get_json("/files")["files"][0]
    assert (entry["size"], entry["mtime"]) == (
        5,
        "2001-09-09T01:46:40.000000Z",
    )


def test_size_and_mtime_within_the_stat_ttl_come_from_the_cache(
    start_server, tmp_path
):
    target = tmp_path / "growing"
    target.write_bytes(b"1")
    # an old directory mtime: the scan is not "racy" and is reused
    os.utime(tmp_path, ns=(10**18, 10**18))
    server = start_server(tmp_path, "--stat-ttl", "600")
    assert server.get_json("/files")["files"][0]["size"] == 1
    target.write_bytes(b"12345")
    assert server.get_json("/files")["files"][0]["size"] == 1
    (tmp_path / "new").touch()
    files = server.get_json("/files")["files"]
    assert [(e["name"], e["size"]) for e in files] == [
        ("growing", 5),
        ("new", 0),
    ]


def process_ids(pid):
    """The real, effective, saved and fs uids and gids of a process."""
    with open(f"/proc/{pid}/status") as status:
        lines = dict(line.split(":", 1) for line in status)
    return lines["Uid"].split(), lines["Gid"].split()


@pytest.mark.root
def test_permission_errors_as_an_unprivileged_user(start_server):
    """As uid 65534 (root would bypass every permission): a subdirectory
    it cannot open is 403, entries it cannot stat are listed with null
    size and mtime, and a root it cannot open is 503."""
    require_root()
    require("setpriv")
    with tempfile.TemporaryDirectory(prefix="list-files-") as base:
        Path(base).chmod(0o755)
        root = Path(base) / "files"
        (root / "locked").mkdir(parents=True)
        (root / "blind").mkdir()
        for name in ("x", "y"):
            (root / "blind" / name).write_bytes(b"data")
        (root / "locked").chmod(0)
        (root / "blind").chmod(0o444)  # names readable, entries not
        # The checkout and the test's interpreter may sit below a
        # directory uid 65534 cannot enter (/root): a copy of the script
        # and the system's python3 (the server needs no package).
        script = Path(base) / SERVER.name
        shutil.copyfile(SERVER, script)
        python = shutil.which("python3", path="/usr/bin:/bin")
        server = start_server(
            root, run_as=NOBODY, command=(python or sys.executable, script)
        )
        assert process_ids(server.process.pid) == (["65534"] * 4,) * 2

        assert names(server.get_json("/files")) == ["blind", "locked"]
        assert server.get_json("/files/locked", status=403) == {
            "error": {
                "status": 403,
                "message": "the directory is not readable",
            }
        }
        for query in ("", "?sort=size", "?sort=mtime&order=desc"):
            document = server.get_json("/files/blind" + query)
            assert sorted(document["files"], key=lambda e: e["name"]) == [
                {"name": name, "type": "other", "size": None, "mtime": None}
                for name in ("x", "y")
            ]
        assert server.get_json("/readyz") == {"status": "ready"}

        root.chmod(0)
        for path in ("/files", "/files/blind"):
            assert server.get_json(path, status=503) == {
                "error": {
                    "status": 503,
                    "message": "the directory is not available",
                }
            }
        assert server.get_json("/readyz", status=503) == {
            "status": "not ready",
            "reason": "the directory is not readable",
        }
        root.chmod(0o755)
        assert server.get_json("/readyz") == {"status": "ready"}
        assert server.stop() == 0


# -------------------------------------------------------- HTTP features


def test_etag_304_and_gzip(start_server, tmp_path):
    make_files(tmp_path, 200)
    server = start_server(tmp_path)
    status, headers, body = server.request("/files")
    etag = headers["ETag"]
    assert headers["Cache-Control"] == "no-cache"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Server"] == "list-files"
    assert headers["Vary"] == "Accept, Accept-Encoding"
    status, headers, empty = server.request(
        "/files", headers={"If-None-Match": etag}
    )
    assert (status, empty, headers["ETag"]) == (304, b"", etag)
    status, headers, packed = server.request(
        "/files", headers={"Accept-Encoding": "gzip"}
    )
    assert status == 200
    assert headers["Content-Encoding"] == "gzip"
    assert headers["ETag"] == etag[:-1] + '-gzip"'
    assert gzip.decompress(packed) == body
    assert int(headers["Content-Length"]) == len(packed) < len(body)
    status, _, _ = server.request(
        "/files",
        headers={"If-None-Match": headers["ETag"], "Accept-Encoding": "gzip"},
    )
    assert status == 304
    (tmp_path / "new").touch()
    status, headers, _ = server.request(
        "/files", headers={"If-None-Match": etag}
    )
    assert status == 200
    assert headers["ETag"] != etag
    _, headers, _ = server.request(
        "/healthz", headers={"Accept-Encoding": "gzip"}
    )
    assert "Content-Encoding" not in headers
    assert headers["Cache-Control"] == "no-store"


def test_head_sends_the_headers_of_get_without_a_body(server):
    _, get_headers, body = server.request("/files")
    status, head_headers, empty = server.request("/files", method="HEAD")
    assert (status, empty) == (200, b"")
    assert head_headers["Content-Length"] == str(len(body))
    assert head_headers["ETag"] == get_headers["ETag"]


def test_text_format_by_accept_or_query(server):
    for headers, path in (
        ({"Accept": "text/plain"}, "/files"),
        ({}, "/files?format=text"),
        ({"Accept": "application/json;q=0.5, text/plain"}, "/files"),
    ):
        status, response_headers, body = server.request(path, headers=headers)
        assert status == 200
        assert response_headers["Content-Type"] == "text/plain; charset=utf-8"
        assert body == b"a.txt\nb.txt\nsub\n"
    _, response_headers, _ = server.request(
        "/files", headers={"Accept": "text/plain;q=0.1, */*"}
    )
    assert response_headers["Content-Type"] == "application/json"


def test_keep_alive_serves_many_requests_on_one_connection(server):
    connection = server.connect()
    for _ in range(5):
        status, headers, body = server.exchange(connection, "/files")
        assert status == 200
        assert len(body) == int(headers["Content-Length"])
    connection.close()


def test_oversized_request_line_is_414_and_headers_431(server):
    reply = raw_exchange(
        server, b"GET /files?" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n"
    )
    assert reply.startswith(b"HTTP/1.1 414 ")
    assert b"Connection: close\r\n" in reply
    assert reply.endswith(
        b'{"error":{"status":414,"message":"request line too long"}}\n'
    )
    headers = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 100) for i in range(200))
    reply = raw_exchange(
        server, b"GET /files HTTP/1.1\r\n" + headers + b"\r\n"
    )
    assert reply.startswith(b"HTTP/1.1 431 Request Header Fields Too Large")
    assert reply.endswith(
        b'{"error":{"status":431,"message":"request header fields too large"}}'
        b"\n"
    )


def test_100_header_fields_are_served_and_101_get_431(server):
    for count, distinct, status in (
        (100, True, 200),
        (100, False, 200),
        (101, True, 431),
        (101, False, 431),
    ):
        fields = [b"Host: t", b"Connection: close"]
        for number in range(count - len(fields)):
            name = b"X-F%d" % number if distinct else b"X-Same"
            fields.append(name + b": v")
        request = b"GET /files HTTP/1.1\r\n" + b"\r\n".join(fields)
        reply = raw_exchange(server, request + b"\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 %d " % status), (count, distinct)
        if status == 431:
            assert reply.endswith(
                b'{"error":{"status":431,"message":"too many header fields"}}'
                b"\n"
            )


def test_malformed_requests_get_400(server):
    for request in (
        b"GARBAGE\r\n\r\n",
        b"GET /files HTTP/9.9\r\n\r\n",
        b"GET http://example.com/files HTTP/1.1\r\n\r\n",
        b"GET /files HTTP/1.1\r\nno colon here\r\n\r\n",
    ):
        reply = raw_exchange(server, request)
        assert reply.startswith(b"HTTP/1.1 400 Bad Request\r\n"), request


def test_a_head_ends_at_its_first_empty_line_whatever_the_line_ends(server):
    """A CRLF line then a bare LF is the empty line that ends a head: the
    request after it is a request of its own, not more header fields."""
    address = (server.host, server.port)
    with socket.create_connection(address, 10) as s:
        s.sendall(
            b"GET /healthz HTTP/1.1\r\nHost: a\r\n\n"
            b"GET /readyz HTTP/1.1\nHost: a\nConnection: close\n\r\n"
        )
        reply = read_until_closed(s)
    statuses = re.findall(rb"^HTTP/1.1 (\d+) ", reply, re.MULTILINE)
    assert statuses == [b"200", b"200"], reply
    assert b'"status":"ok"' in reply.replace(b" ", b"")
    assert b'"status":"ready"' in reply.replace(b" ", b"")


# ---------------------------------------------------------- resilience


def test_a_slow_client_is_cut_off_and_does_not_pin_the_server(
    start_server, files
):
    server = start_server(files, "--timeout", "1")
    slow = socket.create_connection((server.host, server.port))
    slow.sendall(b"GET /files HTT")
    idle = socket.create_connection((server.host, server.port))
    assert server.get_json("/healthz") == {"status": "ok"}
    slow.settimeout(10)
    reply = read_until_closed(slow)
    assert reply.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    server.record("GET", "/files", *parse_reply(reply))
    idle.settimeout(10)
    assert idle.recv(4096) == b""
    slow.close()
    idle.close()


def test_a_trickling_client_is_cut_off_by_the_request_deadline(
    start_server, files
):
    """A byte every 50 ms never lets the 1 s idle timeout expire; the
    deadline for the whole head, 1 s from its first byte, does, long
    before the 10 s this head would take to arrive."""
    timeout = 1.0
    server = start_server(files, "--timeout", str(timeout))
    head = (
        b"GET /files HTTP/1.1\r\nHost: t\r\nX-Padding: "
        + b"p" * 170
        + b"\r\n\r\n"
    )
    assert len(head) * 0.05 >= 10 * timeout
    with socket.create_connection((server.host, server.port), 10) as sock:
        started = time.monotonic()
        sock.sendall(head[:1])
        sent = 1
        while sent < len(head):
            answered, _, _ = select.select([sock], [], [], 0.05)
            if answered:
                break
            sock.sendall(head[sent : sent + 1])
            sent += 1
        elapsed = time.monotonic() - started
        reply = read_until_closed(sock)
    assert sent < len(head), "the whole head arrived: no deadline"
    # kernel timeouts count whole clock ticks: one may end a tick early
    assert elapsed > timeout - 0.05
    assert reply.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert b"Connection: close\r\n" in reply
    server.record("GET", "/files", *parse_reply(reply))


def test_connections_over_the_cap_get_503_and_are_counted(start_server, files):
    server = start_server(files, "--max-connections", "2")
    address = (server.host, server.port)
    held = [socket.create_connection(address) for _ in "ab"]
    for sock in held:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        sock.settimeout(10)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200 OK\r\n")
    status, headers, body = server.request("/files")
    assert status == 503
    assert headers["Retry-After"] == "1"
    assert headers["Connection"] == "close"
    assert json.loads(body) == {
        "error": {
            "status": 503,
            "message": "too many connections, retry later",
        }
    }
    for sock in held:
        sock.close()
    assert wait_until(lambda: server.request("/healthz")[0] == 200)
    _, _, metrics = server.request("/metrics")
    assert (
        metric_value(
            metrics.decode(), "list_files_http_connections_refused_total"
        )
        >= 1
    )
    assert "connection refused" in server.stderr()


def pipeline_listings(server, count):
    """A connection with `count` pipelined GET /files and a small
    receive buffer, so the server blocks sending the answers."""
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect((server.host, server.port))
    client.sendall(b"GET /files HTTP/1.1\r\nHost: t\r\n\r\n" * count)
    return client


def in_flight(server):
    _, _, text = server.request("/metrics")
    return metric_value(text.decode(), "list_files_http_requests_in_flight")


def blocked_sending(server, polls=3):
    """True once answers stop completing while one is in flight."""
    seen = set()
    for _ in range(polls):
        _, _, text = server.request("/metrics")
        text = text.decode()
        if metric_value(text, "list_files_http_requests_in_flight") < 2:
            return False
        done = re.search(
            r'route="/files",method="GET",status="200"} (\d+)', text
        )
        seen.add(done and done.group(1))
        time.sleep(0.2)
    return len(seen) == 1 and None not in seen


def read_responses(server, client):
    """Parse complete responses to GET /files until EOF; record them."""
    client.settimeout(60)
    data = b""
    while chunk := client.recv(1 << 20):
        data += chunk
    client.close()
    responses = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
        assert len(rest) >= length, "a response was cut short"
        responses.append((head, rest[:length]))
        data = rest[length:]
        reply = head + b"\r\n\r\n" + responses[-1][1]
        server.record("GET", "/files", *parse_reply(reply))
    return responses


def test_sigterm_finishes_the_in_flight_response_then_closes(
    start_server, many_files
):
    server = start_server(many_files)
    client = pipeline_listings(server, 30)
    assert wait_until(lambda: in_flight(server) >= 2)
    server.load_spec()
    server.process.send_signal(signal.SIGTERM)
    responses = read_responses(server, client)
    assert 1 <= len(responses) < 30
    for head, body in responses:
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert json.loads(body)["count"] == 10_050
    assert server.process.wait(10) == 0


def test_shutdown_gives_up_on_a_stuck_client_after_the_grace(
    start_server, many_files
):
    server = start_server(many_files, "--shutdown-grace", "0.5")
    stuck = pipeline_listings(server, 30)
    assert wait_until(lambda: blocked_sending(server))
    assert server.stop(signal.SIGTERM) == 0
    assert "stopped with 1 requests unfinished" in server.stderr()
    stuck.close()


def test_bind_failure_exits_1(start_server, files):
    server = start_server(files)
    result = subprocess.run(
        [
            sys.executable,
            str(SERVER),
            "--dir",
            str(files),
            "--host",
            "127.0.0.1",
            "--port",
            str(server.port),
        ],
        capture_output=True,
        text=True,
        env={"PATH": os.environ["PATH"]},
        timeout=20,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.endswith(
        f"ERROR cannot listen on 127.0.0.1 port {server.port}: "
        "Address already in use\n"
    )


# ----------------------------------------------------- metrics, openapi


def test_metrics_pass_promtool_and_carry_the_monitoring_signals(server):
    server.request("/files")
    server.request("/files/nope")

    def scrape():
        scrape.response = server.request("/metrics")
        return b'status="404"} 1\n' in scrape.response[2]

    # a request is counted once its answer is sent: wait for the last
    assert wait_until(scrape)
    status, headers, body = scrape.response
    assert status == 200
    assert (
        headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    )
    text = body.decode()
    assert_promtool_accepts_metrics(text)
    for needle in (
        'list_files_http_requests_total{route="/files",method="GET",'
        'status="200"} 1',
        'list_files_http_requests_total{route="/files/{path}",method="GET",'
        'status="404"} 1',
        'list_files_http_request_duration_seconds_bucket{route="/files",'
        'le="+Inf"} 1',
        "list_files_http_connections_refused_total 0",
        "list_files_scan_duration_seconds_count 1",
        "list_files_last_listing_entries 3",
        "list_files_build_info{version=",
    ):
        assert needle in text
    assert metric_value(text, "list_files_http_requests_in_flight") >= 1
    assert metric_value(text, "list_files_page_entries_max") == 100_000
    assert metric_value(text, "list_files_http_connections_max") == 64
    for name in (
        "process_start_time_seconds",
        "process_open_fds",
        "process_threads",
        "process_resident_memory_bytes",
    ):
        assert metric_value(text, name) > 0
    started = metric_value(text, "process_start_time_seconds")
    assert abs(started - time.time()) < 600


def test_metrics_carry_the_configured_entry_and_connection_limits(
    start_server, files
):
    server = start_server(
        files, "--max-entries", "5000", "--max-connections", "3"
    )
    status, _, body = server.request("/metrics")
    assert status == 200
    text = body.decode()
    for name, help_text, value in (
        (
            "list_files_page_entries_max",
            "Configured maximum of entries per response.",
            5000.0,
        ),
        (
            "list_files_http_connections_max",
            "Configured maximum of open connections.",
            3.0,
        ),
    ):
        assert f"# HELP {name} {help_text}\n# TYPE {name} gauge\n" in text
        assert metric_value(text, name) == value


def test_openapi_document_is_valid_openapi_3_1(server):
    spec = server.get_json("/openapi.json")
    assert spec["openapi"] == "3.1.0"
    assert set(spec["paths"]) == {
        "/files",
        "/files/{path}",
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
    }
    for schema in spec["components"]["schemas"].values():
        OAS31Validator.check_schema(schema)
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            if method == "parameters":
                continue
            responses = operation["responses"]
            assert "default" not in responses, (method, path)
            for response in responses.values():
                response = resolve(spec, response)
                assert response["description"]
                for header in response.get("headers", {}).values():
                    OAS31Validator.check_schema(header["schema"])
    references = re.findall(r'"\$ref": "([^"]+)"', json.dumps(spec))
    assert references
    for reference in set(references):
        resolve(spec, {"$ref": reference})  # KeyError when dangling
    listing = spec["paths"]["/files"]["get"]
    assert [p["name"] for p in listing["parameters"]] == [
        "limit",
        "cursor",
        "sort",
        "order",
        "type",
        "pattern",
        "hidden",
        "format",
    ]


def test_validation_against_the_spec_catches_a_wrong_body(server):
    spec = server.get_json("/openapi.json")
    _, headers, body = server.request("/files")
    check_against_spec(spec, "GET", "/files", 200, headers, body)
    with pytest.raises(jsonschema.ValidationError):
        check_against_spec(spec, "GET", "/files", 200, headers, b'{"x":1}')


def test_validation_against_the_spec_catches_a_status_or_header(server):
    spec = server.get_json("/openapi.json")
    _, headers, body = server.request("/files")
    _, error_headers, error_body = server.request("/files", method="POST")
    check_against_spec(spec, "POST", "/files", 405, error_headers, error_body)
    without_etag = {k: v for k, v in headers.items() if k != "ETag"}
    without_allow = {k: v for k, v in error_headers.items() if k != "Allow"}
    for method, path, status, sent, received, reason in (
        ("GET", "/files", 418, headers, body, "418 is not declared"),
        ("GET", "/files", 200, without_etag, body, "without the header ETag"),
        ("POST", "/files", 405, without_allow, error_body, "header Allow"),
        ("GET", "/nowhere", 405, error_headers, error_body, "405 is not"),
        ("POST", "/nowhere", 405, error_headers, error_body, "405 is not"),
    ):
        with pytest.raises(AssertionError, match=reason):
            check_against_spec(spec, method, path, status, sent, received)
    for name, value in (
        ("ETag", 'W/"0f"'),
        ("Cache-Control", "no-store"),
        ("Link", "</files?cursor=x>"),
    ):
        with pytest.raises(jsonschema.ValidationError):
            check_against_spec(
                spec, "GET", "/files", 200, {**headers, name: value}, body
            )


def test_help_and_version_exit_0():
    for flag, start in (
        ("--help", "usage: list_files_server.py"),
        ("--version", "list_files_server.py 1.0.0"),
    ):
        result = subprocess.run(
            [sys.executable, str(SERVER), flag],
            capture_output=True,
            text=True,
            env={"PATH": os.environ["PATH"]},
            timeout=20,
            check=False,
        )
        assert result.returncode == 0
        assert result.stdout.startswith(start)
        assert result.stderr == ""


def load_server_module():
    spec = importlib.util.spec_from_file_location("list_files_server", SERVER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def readme_api_section():
    text = README.read_text()
    start = text.index("## The API: `list_files_server.py`")
    return text[start : text.index("\n## ", start + 1)]


def test_every_flag_and_variable_is_in_help_and_the_readme():
    parser = load_server_module().build_parser({})
    flags = {o for action in parser._actions for o in action.option_strings}
    variables = {a.metavar for a in parser._actions if a.metavar}
    # and any variable read outside the parser
    source = SERVER.read_text()
    variables |= set(
        re.findall(r"""(?:environ\.get|getenv)\(\s*["']([A-Z_]+)""", source)
    )
    variables |= set(re.findall(r"""environ\[\s*["']([A-Z_]+)""", source))
    assert {"--dir", "--port", "--host", "--version"} <= flags
    assert {"FILE_DIRECTORY", "PORT", "HOST"} <= variables
    result = subprocess.run(
        [sys.executable, str(SERVER), "--help"],
        capture_output=True,
        text=True,
        env={"PATH": os.environ["PATH"]},
        timeout=20,
        check=True,
    )
    readme = readme_api_section()
    for flag in sorted(flags):
        assert re.search(rf"(^|[\s,\[]){flag}\b", result.stdout), flag
        assert f"`{flag}`" in readme, flag
    for variable in sorted(variables):
        assert f"${variable}" in result.stdout, variable
        assert f"`{variable}`" in readme, variable
