#!/usr/bin/env python3
"""A naive directory-listing API: the baseline the benchmark beats.

It scans the directory on every request: one `os.scandir`, one `stat`
per entry, and `json.dumps` of the whole listing, with no cache, no
paging and no limits. It answers with the same JSON shape as
`list_files_server.py`, so the two can be compared request for request:

    python3 bench/naive_list_server.py --dir bench/data/files-100 \\
        --port 8081 --host 127.0.0.1 &
    curl -s http://127.0.0.1:8081/files | head -c 300

`GET /files` returns `{"directory": "/", "files": [...], "count": N,
"next": null}`, each entry with `name`, `type` (file, dir, symlink,
other), `size` and `mtime` (RFC 3339, UTC, to the microsecond).
Anything else is 404. The benchmark also imports `listing_document` to
time the same work in-process (the "floor").

Environment variables: none (flags only).

Exit codes: 0 on SIGINT or SIGTERM, 2 for bad usage.

Limitations:
- A benchmark baseline, not a server to deploy: no limits, no timeouts,
  no path handling beyond `/files`, every request rescans everything.
- Names that are not valid UTF-8 come out as JSON `\\udcXX` escapes.
"""

import argparse
import contextlib
import json
import os
import signal
import stat
import sys
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

RFC3339_SECONDS = "%Y-%m-%dT%H:%M:%S"


def entry_type(mode):
    """Name the kind of file `mode` (an `st_mode`) describes."""
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


def rfc3339(ns):
    """Format a time in nanoseconds as RFC 3339 UTC, to microseconds."""
    seconds, fraction = divmod(ns, 1_000_000_000)
    whole = time.strftime(RFC3339_SECONDS, time.gmtime(seconds))
    return f"{whole}.{fraction // 1000:06d}Z"


def scan_directory(directory):
    """List `directory`: one dict per entry, with one lstat each."""
    entries = []
    with os.scandir(directory) as listing:
        for entry in listing:
            info = entry.stat(follow_symlinks=False)
            entries.append(
                {
                    "name": entry.name,
                    "type": entry_type(info.st_mode),
                    "size": info.st_size,
                    "mtime": rfc3339(info.st_mtime_ns),
                }
            )
    return entries


def listing_document(directory):
    """Return the JSON body of `GET /files` for `directory`, as bytes."""
    entries = scan_directory(directory)
    document = {
        "directory": "/",
        "files": entries,
        "count": len(entries),
        "next": None,
    }
    return json.dumps(document).encode()


class NaiveListingHandler(BaseHTTPRequestHandler):
    """Serve `GET /files`; the server sets `directory` on itself."""

    protocol_version = "HTTP/1.1"
    server_version = "naive-list"
    sys_version = ""

    def do_GET(self):
        if self.path.partition("?")[0] != "/files":
            self.send_body(HTTPStatus.NOT_FOUND, b'{"error": "not found"}')
            return
        body = listing_document(self.server.directory)
        self.send_body(HTTPStatus.OK, body)

    def send_body(self, status, body):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class NaiveListingServer(ThreadingHTTPServer):
    """One thread per connection, each rescanning on every request."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address, directory):
        super().__init__(address, NaiveListingHandler)
        self.directory = directory


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Naive directory-listing API (benchmark baseline)."
    )
    parser.add_argument("--dir", required=True, help="directory to list")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--host", default="127.0.0.1")
    return parser.parse_args(argv)


def stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = parse_args(argv)
    if not os.path.isdir(args.dir):
        print(
            f"naive_list_server: not a directory: {args.dir}", file=sys.stderr
        )
        return 2

    signal.signal(signal.SIGTERM, stop_on_sigterm)
    address = (args.host, args.port)
    with (
        NaiveListingServer(address, args.dir) as server,
        contextlib.suppress(KeyboardInterrupt),
    ):
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
