"""Tests for list_files_server.py against a real server process.

Every test starts the real entry point as a subprocess on 127.0.0.1
port 0, talks HTTP to it over a real socket and stops it with SIGTERM.
"""

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from support import REPO_ROOT

SERVER = REPO_ROOT / "list_files_server.py"
LISTENING = re.compile(r"listening on \S+ port (\d+)")


class ServerProcess:
    """The server as a child process, with its output collected."""

    def __init__(self, directory, *args, env=None):
        environment = {"PATH": os.environ["PATH"], "PYTHONUNBUFFERED": "1"}
        environment.update(env or {})
        argv = [sys.executable, str(SERVER)]
        if directory is not None:
            argv += ["--dir", str(directory)]
        argv += ["--host", "127.0.0.1", "--port", "0", *args]
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
        self.port = None
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
                self.port = int(match.group(1))
                self.ready.set()
        self.ready.set()

    def stderr(self):
        return "".join(self.stderr_lines)

    def access_log(self):
        return [json.loads(line) for line in self.stdout_lines]

    def connect(self, timeout=10):
        return http.client.HTTPConnection(
            "127.0.0.1", self.port, timeout=timeout
        )

    def request(self, path, method="GET", headers=None):
        connection = self.connect()
        try:
            connection.request(method, path, headers=headers or {})
            response = connection.getresponse()
            body = response.read()
            return response.status, dict(response.getheaders()), body
        finally:
            connection.close()

    def get_json(self, path, status=200, headers=None):
        code, response_headers, body = self.request(path, headers=headers)
        assert code == status, body
        assert response_headers["Content-Type"] == "application/json"
        return json.loads(body)

    def stop(self, signum=signal.SIGTERM, timeout=10):
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


@pytest.fixture
def start_server():
    started = []

    def start(directory, *args, env=None):
        server = ServerProcess(directory, *args, env=env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()


@pytest.fixture
def server(start_server, files):
    return start_server(files)


def raw_exchange(server, data, timeout=10):
    """Send raw bytes, return everything received until EOF."""
    with socket.create_connection(("127.0.0.1", server.port), timeout) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


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
    status, headers, body = server.request("/files", method="POST")
    assert status == 405
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
    connection.request("GET", "/healthz")
    assert connection.getresponse().read() == b'{"status":"ok"}\n'
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


def test_access_log_is_one_json_line_per_request(server):
    reply = raw_exchange(
        server,
        b"GET /files/sub?x=\x1b[31m HTTP/1.1\r\nHost: t\r\n"
        b"Connection: close\r\n\r\n",
    )
    assert reply.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    server.stop()
    entries = server.access_log()
    assert len(entries) == 1
    entry = entries[0]
    assert entry["method"] == "GET"
    assert entry["path"] == "/files/sub?x=\x1b[31m"
    assert entry["status"] == 400
    assert entry["client"] == "127.0.0.1"
    assert isinstance(entry["bytes"], int) and entry["bytes"] > 0
    assert isinstance(entry["duration"], float)
    assert "\x1b" not in server.stdout_lines[0]
    assert "\\u001b" in server.stdout_lines[0]
