#!/usr/bin/env python3
"""List the files of one directory over HTTP, as JSON.

Usage:

    FILE_DIRECTORY=/srv/files python3 list_files_server.py --port 8080
    curl -s http://127.0.0.1:8080/files
    curl -s 'http://127.0.0.1:8080/files/sub?sort=mtime&order=desc'
    curl -s -H 'Accept: text/plain' http://127.0.0.1:8080/files

Endpoints: GET/HEAD /files and /files/<subpath> (the listing), /healthz
(liveness), /readyz (the directory can be listed), /metrics (Prometheus
text format) and /openapi.json (OpenAPI 3.1 description of all of them).
Only the standard library is used.

Configuration (a flag overrides its environment variable):

    FILE_DIRECTORY   --dir              directory to list (/data/files)
    HOST             --host             address to bind (0.0.0.0)
    PORT             --port             TCP port, 0 picks one (5000)
    MAX_CONNECTIONS  --max-connections  open connections; more get 503 (64)
    CONNECTION_TIMEOUT --timeout        seconds a client may idle or take
                                        to send a request head (10)
    MAX_ENTRIES      --max-entries      entries per response (100000)
    STAT_TTL         --stat-ttl         seconds size/mtime may be old (1)
    CACHE_MB         --cache-mb         memory for cached bodies (32)
    SHUTDOWN_GRACE   --shutdown-grace   seconds to finish requests on
                                        SIGTERM/SIGINT (5)
    ACCESS_LOG       --access-log       on/off: JSON access log (on)
    LOG_LEVEL        --log-level        DEBUG, INFO, WARNING, ERROR (INFO)

Output: one JSON line per request on stdout (the access log); one line
per diagnostic event on stderr.

Exit codes: 0 after SIGTERM or SIGINT, 1 when the address cannot be
bound, 2 for bad configuration. A missing directory is not bad
configuration: the server starts and /readyz reports it.

Freshness: a listing shows every change to the directory's entries
(created, removed, renamed) that completed before the request started.
The size and mtime of an entry are at most twice max(STAT_TTL, ten times
the directory's last stat pass) old; README.md ("Freshness") explains
the cache.

Limitations:
- Symlinks are listed, never followed: /files/<link> is 404 even when the
  link points inside the directory.
- Freshness relies on the directory's mtime/ctime changing when entries
  change; filesystems that cache attributes (NFS, FUSE) may lag.
- Plain HTTP only: put TLS and authentication in front of it.
- Only GET and HEAD; request bodies are not read, and a request that
  announces one closes the connection after the response.
"""

import argparse
import array
import base64
import bisect
import contextlib
import json
import logging
import os
import queue
import select
import selectors
import signal
import socket
import socketserver
import stat
import struct
import sys
import threading
import time
import zlib
from collections import OrderedDict, deque
from http import HTTPStatus
from json.encoder import encode_basestring_ascii as json_string
from urllib.parse import parse_qsl, quote, unquote_to_bytes

# http.server pulls in http.client, which imports ssl when it can. This
# server never speaks TLS; keeping ssl out saves ~4 MB of idle RSS.
if "ssl" not in sys.modules:
    sys.modules["ssl"] = None  # type: ignore[assignment]
    import http.server

    del sys.modules["ssl"]
else:  # pragma: no cover - imported by a program that already has ssl
    import http.server

__version__ = "1.0.0"

LOG = logging.getLogger("list_files_server")
PROG = "list_files_server.py"

TYPE_FILE, TYPE_DIR, TYPE_SYMLINK, TYPE_OTHER = range(4)
TYPE_NAMES = ("file", "dir", "symlink", "other")
TYPE_OF_MODE = {
    stat.S_IFREG: TYPE_FILE,
    stat.S_IFDIR: TYPE_DIR,
    stat.S_IFLNK: TYPE_SYMLINK,
}
SORT_KEYS = ("name", "mtime", "size")
QUERY_KEYS = frozenset(
    ("limit", "cursor", "sort", "order", "type", "pattern", "hidden", "format")
)
BOOLEANS = {"true": True, "1": True, "false": False, "0": False}

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NONBLOCK
SUBDIR_FLAGS = DIR_FLAGS | os.O_NOFOLLOW

# Directory timestamps are as coarse as the filesystem makes them (2 s on
# FAT); a scan that started this soon after the directory's mtime may
# have missed a change that left the mtime as it was.
RACY_WINDOW_NS = 2_000_000_000
GZIP_MIN_BYTES = 1024
# A client must read a response at least this fast (bytes per second).
MIN_SEND_RATE = 64 * 1024
# a response under SMALL_SEND_BYTES is sent in one call that may take the
# idle timeout plus SMALL_SEND_SECONDS; larger ones get a deadline that
# grows with their size at MIN_SEND_RATE
SMALL_SEND_BYTES = 65536
SMALL_SEND_SECONDS = SMALL_SEND_BYTES / MIN_SEND_RATE
IOV_MAX = 1024  # buffers per sendmsg() call (Linux UIO_MAXIOV)
TIMEVAL = struct.Struct("@ll")


class ConfigError(Exception):
    """A configuration value is unusable; main() exits 2."""


# ---------------------------------------------------------------- config


class Config:
    """Settings read from the command line and the environment."""

    def __init__(self, **values):
        self.__dict__.update(values)


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit 2."""

    def error(self, message):
        raise ConfigError(message)


def env_default(environ, name, default):
    value = environ.get(name)
    return default if value is None or value == "" else value


def bounded_number(kind, name, low, high):
    def convert(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or value != value or not low <= value <= high:
            raise ConfigError(
                f"{name} must be a number from {low} to {high}, got {text!r}"
            )
        return value

    return convert


def build_parser(environ):
    parser = OneLineParser(
        prog=PROG,
        description="Serve a JSON listing of one directory over HTTP.",
        epilog="Every option also reads the environment variable named "
        "in capitals; the flag wins. Exit codes: 0 stopped by "
        "SIGTERM/SIGINT, 1 cannot listen, 2 bad configuration.",
    )
    options = (
        ("--dir", "FILE_DIRECTORY", "/data/files", str, "directory to list"),
        # all interfaces: inside a container, that is what -p publishes
        ("--host", "HOST", "0.0.0.0", str, "address to bind"),  # noqa: S104
        ("--port", "PORT", "5000", int, "TCP port (0: any free one)"),
        (
            "--max-connections",
            "MAX_CONNECTIONS",
            "64",
            int,
            "open connections; more are answered 503",
        ),
        (
            "--timeout",
            "CONNECTION_TIMEOUT",
            "10",
            float,
            "seconds a client may idle or take to send a request",
        ),
        (
            "--max-entries",
            "MAX_ENTRIES",
            "100000",
            int,
            "maximum entries per response",
        ),
        (
            "--stat-ttl",
            "STAT_TTL",
            "1",
            float,
            "seconds an entry's size/mtime may be old",
        ),
        ("--cache-mb", "CACHE_MB", "32", int, "MiB for cached bodies"),
        (
            "--shutdown-grace",
            "SHUTDOWN_GRACE",
            "5",
            float,
            "seconds to finish requests after SIGTERM",
        ),
        ("--access-log", "ACCESS_LOG", "on", str, "on or off"),
        ("--log-level", "LOG_LEVEL", "INFO", str, "DEBUG ... ERROR"),
    )
    for flag, env, default, _, help_text in options:
        parser.add_argument(
            flag,
            metavar=env,
            default=env_default(environ, env, default),
            help=f"{help_text} (${env}, default {default})",
        )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {__version__}"
    )
    return parser


def parse_config(argv, environ):
    """Return a Config, or raise ConfigError with a one-line reason."""
    args = build_parser(environ).parse_args(argv)
    limits = {
        "port": (int, "PORT", 0, 65535),
        "max_connections": (int, "MAX_CONNECTIONS", 1, 100_000),
        "timeout": (float, "CONNECTION_TIMEOUT", 0.05, 3600.0),
        "max_entries": (int, "MAX_ENTRIES", 1, 10_000_000),
        "stat_ttl": (float, "STAT_TTL", 0.0, 3600.0),
        "cache_mb": (int, "CACHE_MB", 0, 1_000_000),
        "shutdown_grace": (float, "SHUTDOWN_GRACE", 0.0, 3600.0),
    }
    values = {}
    for key, (kind, name, low, high) in limits.items():
        values[key] = bounded_number(kind, name, low, high)(getattr(args, key))
    access_log = args.access_log.lower()
    if access_log not in ("on", "off"):
        raise ConfigError(f"ACCESS_LOG must be on or off, got {access_log!r}")
    level = args.log_level.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(
            f"LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got {level!r}"
        )
    if not args.dir or "\0" in args.dir:
        raise ConfigError("FILE_DIRECTORY must be a non-empty path")
    if not args.host:
        raise ConfigError("HOST must not be empty")
    return Config(
        directory=os.path.abspath(args.dir),
        host=args.host,
        access_log=access_log == "on",
        log_level=level,
        **values,
    )


# --------------------------------------------------------------- helpers


def escape_for_log(text):
    """Make text safe for a one-line log: no control characters."""
    return text.encode("unicode_escape", "backslashreplace").decode("ascii")


def display_name(raw):
    """The name for humans: undecodable bytes become U+FFFD."""
    return raw.decode("utf-8", "replace")


_HOUR_PREFIX = {}
_MINUTE_SECOND = [f"{m:02d}:{s:02d}" for m in range(60) for s in range(60)]


def hour_prefix(hour):
    """'YYYY-MM-DDTHH:' for an hour since the epoch, cached."""
    prefix = _HOUR_PREFIX.get(hour)
    if prefix is None:
        if len(_HOUR_PREFIX) > 100_000:
            _HOUR_PREFIX.clear()
        prefix = time.strftime("%Y-%m-%dT%H:", time.gmtime(hour * 3600))
        _HOUR_PREFIX[hour] = prefix
    return prefix


def rfc3339(ns):
    """RFC 3339 UTC time with microseconds for a time in nanoseconds."""
    seconds, fraction = divmod(ns, 1_000_000_000)
    hour, within = divmod(seconds, 3600)
    return (
        f"{hour_prefix(hour)}{_MINUTE_SECOND[within]}.{fraction // 1000:06d}Z"
    )


_HTTP_DATE = [0, ""]


def http_date():
    now = int(time.time())
    if _HTTP_DATE[0] != now:
        stamp = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now))
        _HTTP_DATE[:] = [now, stamp]
    return _HTTP_DATE[1]


def json_bytes(document):
    return (json.dumps(document, separators=(",", ":")) + "\n").encode()


def error_body(status, message):
    return json_bytes({"error": {"status": status, "message": message}})


# --------------------------------------------------------------- listing


class HTTPError(Exception):
    """Ends a request with a JSON error; the message is safe to show."""

    def __init__(self, status, message, headers=()):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = tuple(headers)


def open_root(root):
    """Open the configured directory; HTTPError 503 when unusable."""
    try:
        return os.open(root, DIR_FLAGS)
    except OSError:
        raise HTTPError(503, "the directory is not available") from None


def open_subdirectory(root_fd, parts):
    """Walk `parts` from root_fd one component at a time.

    Each step is an openat() with O_NOFOLLOW|O_DIRECTORY relative to the
    previous step's descriptor, so neither a symlink nor a component
    swapped for one while the request runs can lead outside the root.
    The caller owns the returned descriptor; root_fd is not closed.
    """
    fd = os.dup(root_fd)
    try:
        for part in parts:
            next_fd = os.open(part, SUBDIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = next_fd
    except PermissionError:
        os.close(fd)
        raise HTTPError(403, "the directory is not readable") from None
    except OSError:
        os.close(fd)
        raise HTTPError(404, "not found") from None
    return fd


def parse_subpath(raw_path):
    """Split '/files/a/b' into [b'a', b'b'], or raise HTTPError 404.

    Rejected: empty components (doubled slashes), '.', '..', and
    components that decode to a slash, a backslash or a NUL byte.
    """
    if raw_path in ("/files", "/files/"):
        return []
    rest = raw_path[len("/files/") :]
    if rest.endswith("/"):
        rest = rest[:-1]
    parts = []
    for segment in rest.split("/"):
        part = unquote_to_bytes(segment)
        if (
            part in (b"", b".", b"..")
            or b"/" in part
            or b"\\" in part
            or b"\0" in part
        ):
            raise HTTPError(404, "not found")
        parts.append(part)
    return parts


class Snapshot:
    """One scan of a directory: names sorted by code point, and columns.

    Names are str as os.listdir returns them (undecodable bytes as
    surrogate escapes); types is a bytearray of TYPE_* codes; sizes and
    mtimes (ns) are arrays of int64 where -1 means "could not stat".
    Instances are never changed after publication, except `stats_at`.
    """

    __slots__ = (
        "id",
        "identity",
        "mtimes",
        "names",
        "racy",
        "scan_started",
        "sizes",
        "stat_seconds",
        "stats_at",
        "types",
        "views",
    )

    _ids = iter(range(1, 1 << 62))

    def __init__(self, identity, names, columns, scan_started, racy):
        self.id = next(Snapshot._ids)
        self.identity = identity
        self.names = names
        self.types, self.sizes, self.mtimes, self.stat_seconds = columns
        self.scan_started = scan_started
        self.stats_at = time.monotonic()
        self.racy = racy
        self.views = {}


def directory_identity(st):
    return (
        st.st_dev,
        st.st_ino,
        st.st_mtime_ns,
        st.st_ctime_ns,
        st.st_size,
        st.st_nlink,
        st.st_mode,
    )


def stat_entries(fd, names):
    """lstat every name relative to fd; return columns or None.

    None means an entry vanished, so the directory changed under us.
    Entries are never opened: a FIFO or a socket cannot block the scan.
    """
    started = time.monotonic()
    types = bytearray()
    sizes = array.array("q")
    mtimes = array.array("q")
    add_type, add_size, add_mtime = types.append, sizes.append, mtimes.append
    lstat = os.lstat
    type_of = TYPE_OF_MODE.get
    for name in names:
        try:
            st = lstat(name, dir_fd=fd)
        except FileNotFoundError:
            return None
        except OSError:
            add_type(TYPE_OTHER)
            add_size(-1)
            add_mtime(-1)
            continue
        add_type(type_of(stat.S_IFMT(st.st_mode), TYPE_OTHER))
        add_size(st.st_size)
        add_mtime(st.st_mtime_ns)
    return types, sizes, mtimes, time.monotonic() - started


class ListingCache:
    """Scans directories once and re-validates them on every request.

    A snapshot is reused while the directory's own stat (device, inode,
    mtime, ctime, size, link count, mode) is unchanged, unless the scan
    was "racy": it started within RACY_WINDOW_NS of the directory's
    mtime, so a later change could share that mtime; a racy snapshot
    serves only requests that started before its scan did.  Entry
    stats are re-read when older than the stat TTL.
    """

    def __init__(self, stat_ttl, metrics, max_cached_entries=2_000_000):
        self.stat_ttl = stat_ttl
        self.metrics = metrics
        self.max_cached_entries = max_cached_entries
        self.snapshots = OrderedDict()
        self.key_locks = {}
        self.lock = threading.Lock()

    def cached(self, key, path, request_started):
        """The snapshot of `path` when it needs no new reading, else None.

        Only for a path that no request can redirect (the root): a
        mismatch sends the caller through get() and its descriptor walk.
        """
        snapshot = self.snapshots.get(key)
        if snapshot is None:
            return None
        try:
            identity = directory_identity(os.stat(path))
        except OSError:
            return None
        if self.usable(snapshot, identity, request_started):
            return snapshot
        return None

    def get(self, key, fd, request_started):
        """Return a Snapshot of directory fd valid for this request."""
        snapshot = self.snapshots.get(key)
        identity = directory_identity(os.fstat(fd))
        if self.usable(snapshot, identity, request_started):
            return snapshot
        with self.lock:
            key_lock = self.key_locks.setdefault(key, threading.Lock())
        if self.usable(snapshot, identity, request_started, ttls=2):
            # only the entry stats are old: re-read them in the
            # background and answer from the previous ones meanwhile
            if key_lock.acquire(blocking=False):
                threading.Thread(
                    target=self.refresh_in_background,
                    args=(key, os.dup(fd), key_lock, snapshot),
                    name="stat-refresh",
                    daemon=True,
                ).start()
            return snapshot
        with key_lock:
            snapshot = self.snapshots.get(key)
            identity = directory_identity(os.fstat(fd))
            if self.usable(snapshot, identity, request_started):
                return snapshot
            if self.entries_valid(snapshot, identity, request_started):
                fresh = self.refresh_stats(snapshot, fd)
            else:
                fresh = None
            if fresh is None:
                # let the old scan go before a new one: two copies of a
                # million-entry directory would double the peak memory
                self.drop(key)
                del snapshot
                fresh = self.scan(fd)
            self.store(key, fresh)
            return fresh

    def refresh_in_background(self, key, fd, key_lock, snapshot):
        """Thread body: refresh_stats() for get(); owns fd and the lock."""
        try:
            fresh = self.refresh_stats(snapshot, fd)
            if fresh is not None and self.snapshots.get(key) is snapshot:
                self.store(key, fresh)
        except OSError as error:
            LOG.debug("stat refresh failed: %s", error.strerror)
        finally:
            os.close(fd)
            key_lock.release()

    def entries_valid(self, snapshot, identity, request_started):
        if snapshot is None or snapshot.identity != identity:
            return False
        return not snapshot.racy or snapshot.scan_started >= request_started

    def usable(self, snapshot, identity, request_started, ttls=1):
        if not self.entries_valid(snapshot, identity, request_started):
            return False
        ttl = max(self.stat_ttl, 10 * snapshot.stat_seconds)
        return time.monotonic() - snapshot.stats_at <= ttl * ttls

    def scan(self, fd):
        """Read the directory afresh (names, then one lstat each)."""
        while True:
            started = time.monotonic()
            wall_started = time.time_ns()
            st = os.fstat(fd)
            names = os.listdir(fd)
            names.sort()
            columns = stat_entries(fd, names)
            if columns is not None:
                break
        racy = st.st_mtime_ns >= wall_started - RACY_WINDOW_NS
        self.metrics.observe_scan(time.monotonic() - started)
        return Snapshot(directory_identity(st), names, columns, started, racy)

    def refresh_stats(self, snapshot, fd):
        """Re-read entry stats; the same snapshot if nothing changed."""
        columns = stat_entries(fd, snapshot.names)
        if columns is None:
            return None
        types, sizes, mtimes, seconds = columns
        if (
            types == snapshot.types
            and sizes == snapshot.sizes
            and mtimes == snapshot.mtimes
        ):
            snapshot.stats_at = time.monotonic()
            snapshot.stat_seconds = seconds
            return snapshot
        fresh = Snapshot(
            snapshot.identity,
            snapshot.names,
            columns,
            snapshot.scan_started,
            snapshot.racy,
        )
        return fresh

    def drop(self, key):
        with self.lock:
            self.snapshots.pop(key, None)

    def store(self, key, snapshot):
        with self.lock:
            self.snapshots[key] = snapshot
            self.snapshots.move_to_end(key)
            total = sum(len(s.names) for s in self.snapshots.values())
            while total > self.max_cached_entries and len(self.snapshots) > 1:
                old_key, old = self.snapshots.popitem(last=False)
                self.key_locks.pop(old_key, None)
                total -= len(old.names)


class Query:
    """The validated query parameters of a listing request."""

    __slots__ = (
        "cursor",
        "format",
        "hidden",
        "limit",
        "order",
        "pattern",
        "sort",
        "types",
    )

    def fingerprint(self, key):
        """What a cursor must have been made for (path and filters)."""
        text = repr(
            (key, self.sort, self.order, self.types, self.pattern, self.hidden)
        )
        return zlib.crc32(text.encode("utf-8", "surrogateescape"))

    def view_key(self):
        return (self.sort, self.order, self.types, self.pattern, self.hidden)


def parse_query(raw_query, max_entries, accept):
    """Validate the query string; HTTPError 400 on any bad value."""
    try:
        pairs = parse_qsl(
            raw_query,
            keep_blank_values=True,
            errors="surrogateescape",
            max_num_fields=len(QUERY_KEYS),
        )
    except ValueError:
        raise HTTPError(400, "too many query parameters") from None
    values = {}
    for name, value in pairs:
        if name not in QUERY_KEYS:
            shown = name if len(name) <= 40 else name[:40] + "..."
            raise HTTPError(400, f"unknown query parameter {shown!r}")
        if name in values:
            raise HTTPError(400, f"query parameter {name!r} is repeated")
        values[name] = value

    query = Query()
    limit = values.get("limit", str(max_entries))
    if not (limit.isascii() and limit.isdigit()) or not (
        1 <= int(limit) <= max_entries
    ):
        raise HTTPError(
            400, f"limit must be an integer from 1 to {max_entries}"
        )
    query.limit = int(limit)
    query.cursor = values.get("cursor")
    query.sort = values.get("sort", "name")
    if query.sort not in SORT_KEYS:
        raise HTTPError(400, "sort must be name, mtime or size")
    query.order = values.get("order", "asc")
    if query.order not in ("asc", "desc"):
        raise HTTPError(400, "order must be asc or desc")
    types = values.get("type")
    if types is None:
        query.types = None
    else:
        wanted = set(types.split(","))
        if not wanted or not wanted <= set(TYPE_NAMES):
            raise HTTPError(
                400,
                "type must be a comma-separated list of "
                "file, dir, symlink, other",
            )
        query.types = tuple(sorted(TYPE_NAMES.index(t) for t in wanted))
    query.pattern = values.get("pattern")
    if query.pattern is not None and not 1 <= len(query.pattern) <= 255:
        raise HTTPError(400, "pattern must be 1 to 255 characters")
    hidden = values.get("hidden", "true")
    if hidden not in BOOLEANS:
        raise HTTPError(400, "hidden must be true or false")
    query.hidden = BOOLEANS[hidden]
    fmt = values.get("format")
    if fmt is None:
        fmt = "text" if prefers_text(accept) else "json"
    elif fmt not in ("json", "text"):
        raise HTTPError(400, "format must be json or text")
    query.format = fmt
    return query


class QueryCache:
    """parse_query() results by query string and Accept header.

    Clients repeat a handful of queries; a Query is never changed after
    parsing, so one instance serves every request that sent the same.
    """

    def __init__(self, max_entries, size=512):
        self.max_entries = max_entries
        self.size = size
        self.parsed = {}

    def parse(self, raw_query, accept):
        key = (raw_query, accept)
        query = self.parsed.get(key)
        if query is None:
            query = parse_query(raw_query, self.max_entries, accept)
            if len(raw_query) + len(accept or "") > 512:
                return query  # keep the cache small
            if len(self.parsed) >= self.size:
                self.parsed.clear()
            self.parsed[key] = query
        return query


def prefers_text(accept):
    """True when Accept ranks text/plain above application/json."""
    if not accept or "text/plain" not in accept:
        return False
    best = {"json": -1.0, "text": -1.0}
    for item in accept.split(","):
        media, _, params = item.strip().partition(";")
        weight = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name == "q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = 0.0
        media = media.strip().lower()
        if media == "text/plain":
            best["text"] = max(best["text"], weight)
        elif media in ("application/json", "application/*", "*/*"):
            best["json"] = max(best["json"], weight)
    return best["text"] > 0 and best["text"] > best["json"]


def build_view(snapshot, query):
    """The indices of the entries the query selects, in its order."""
    key = query.view_key()
    view = snapshot.views.get(key)
    if view is not None:
        return view
    count = len(snapshot.names)
    if query.sort == "name":
        order = range(count)
    else:
        column = snapshot.mtimes if query.sort == "mtime" else snapshot.sizes
        # names are sorted and sort() is stable: ties stay in name order
        order = array.array("l", sorted(range(count), key=column.__getitem__))
    if query.types is not None or query.pattern or not query.hidden:
        order = array.array("l", filter_entries(snapshot, order, query))
    if query.order == "desc":
        order = order[::-1]
    if len(snapshot.views) >= 16:
        snapshot.views.clear()
    snapshot.views[key] = order
    return order


def filter_entries(snapshot, order, query):
    names, types = snapshot.names, snapshot.types
    selected = order
    if query.types is not None:
        wanted = set(query.types)
        selected = [i for i in selected if types[i] in wanted]
    if not query.hidden:
        selected = [i for i in selected if not names[i].startswith(".")]
    if query.pattern:
        import fnmatch
        import re

        match = re.compile(fnmatch.translate(query.pattern), re.S).match
        selected = [i for i in selected if match(names[i])]
    return selected


def sort_key(snapshot, query, index):
    name = snapshot.names[index]
    if query.sort == "mtime":
        return (snapshot.mtimes[index], name)
    if query.sort == "size":
        return (snapshot.sizes[index], name)
    return (name,)


def encode_cursor(fingerprint, position, key):
    """Opaque text for 'after the entry with this sort key'.

    The position is only a hint: it is used when the entry before it
    still has the key, else the key is searched for.
    """
    raw = json.dumps([1, fingerprint, position, *key])
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


# A cursor this server makes holds at most a 255-byte name, which JSON
# escapes to at most 6 characters a byte, and three integers; base64
# makes that under 2,200 characters.  Longer text is not decoded.
MAX_CURSOR_CHARS = 4096


def decode_cursor(text, fingerprint, sort):
    """Return (position, key) or raise HTTPError 400.

    The key must have the shape sort_key() gives for `sort`: (name,)
    for name, (integer, name) for mtime and size; page_start() compares
    it with the keys of the listing.
    """
    value = None
    if len(text) <= MAX_CURSOR_CHARS:
        try:
            padded = text + "=" * (-len(text) % 4)
            raw = base64.urlsafe_b64decode(padded.encode("ascii"))
            value = json.loads(raw)
        except (ValueError, UnicodeError, RecursionError):
            value = None
    if not is_cursor_value(value):
        raise HTTPError(400, "cursor is not valid")
    _, made_for, position, *key = value
    if made_for != fingerprint:
        raise HTTPError(400, "cursor belongs to a different query")
    # after the fingerprint, which covers the sort: a real cursor of
    # another sort is "a different query", not "not valid"
    if len(key) != (1 if sort == "name" else 2):
        raise HTTPError(400, "cursor is not valid")
    return position, tuple(key)


def is_cursor_value(value):
    """True for [1, fingerprint, position, *key] with a key of one name
    or of an integer and a name; integers are not bools."""
    if type(value) is not list or len(value) not in (4, 5):
        return False
    *numbers, name = value
    version, _, position = numbers[:3]
    return (
        all(type(number) is int for number in numbers)
        and version == 1
        and position >= 0
        and type(name) is str
    )


def page_start(snapshot, query, view, cursor):
    """Where the page after the cursor's entry starts in view."""
    position, key = cursor
    if (
        0 < position <= len(view)
        and sort_key(snapshot, query, view[position - 1]) == key
    ):
        return position
    descending = query.order == "desc"
    low, high = 0, len(view)
    while low < high:
        middle = (low + high) // 2
        probe = sort_key(snapshot, query, view[middle])
        after = probe < key if descending else probe > key
        if after:
            high = middle
        else:
            low = middle + 1
    return low


def render_entry_blocks(snapshot, indices):
    """The entries at indices as JSON, comma-separated, in UTF-8 blocks.

    A block holds RENDER_BLOCK entries, so that only one block's worth
    of Python strings is alive at a time: a 100,000-entry page would
    otherwise hold about three copies of itself while being rendered.
    """
    for start in range(0, len(indices), RENDER_BLOCK):
        block = indices[start : start + RENDER_BLOCK]
        text = render_entries(snapshot, block)
        yield (text if start == 0 else "," + text).encode()


RENDER_BLOCK = 4096


def render_entries(snapshot, indices):
    """JSON text of the entries at indices, comma-separated."""
    if isinstance(indices, range) and indices.step == 1:
        start, stop = indices.start, indices.stop
        names = snapshot.names[start:stop]
        types = snapshot.types[start:stop]
        sizes = snapshot.sizes[start:stop]
        mtimes = snapshot.mtimes[start:stop]
    else:
        names = [snapshot.names[i] for i in indices]
        types = [snapshot.types[i] for i in indices]
        sizes = [snapshot.sizes[i] for i in indices]
        mtimes = [snapshot.mtimes[i] for i in indices]
    encode = json.encoder.encode_basestring
    hours = _HOUR_PREFIX
    minute_second = _MINUTE_SECOND
    type_names = TYPE_NAMES
    parts = []
    add = parts.append
    for name, kind, size, mtime in zip(
        names, types, sizes, mtimes, strict=True
    ):
        extra = ""
        if not name.isascii():
            try:
                name.encode()
            except UnicodeEncodeError:
                raw = os.fsencode(name)
                b64 = base64.b64encode(raw).decode()
                extra = f',"name_b64":"{b64}"'
                name = display_name(raw)
        if mtime < 0:
            add(
                f'{{"name":{encode(name)}{extra},"type":"{type_names[kind]}"'
                ',"size":null,"mtime":null}'
            )
            continue
        seconds, fraction = divmod(mtime, 1_000_000_000)
        hour, within = divmod(seconds, 3600)
        prefix = hours.get(hour) or hour_prefix(hour)
        add(
            f'{{"name":{encode(name)}{extra},"type":"{type_names[kind]}",'
            f'"size":{size},"mtime":"{prefix}{minute_second[within]}'
            f'.{fraction // 1000:06d}Z"}}'
        )
    return ",".join(parts)


_TEXT_ESCAPES = {i: f"\\x{i:02x}" for i in range(32)}
_TEXT_ESCAPES.update({9: "\\t", 10: "\\n", 13: "\\r", 127: "\\x7f"})


def text_name(name):
    """A name on one line: backslash, control and undecodable bytes
    escaped C-style (\\\\, \\n, \\t, \\xNN)."""
    if name.isprintable() and "\\" not in name:
        return name
    raw = os.fsencode(name).replace(b"\\", b"\\\\")
    return raw.decode("utf-8", "backslashreplace").translate(_TEXT_ESCAPES)


class Page:
    """A rendered response body and what the headers need about it."""

    __slots__ = ("chunks", "etag", "gzip", "length", "next_link", "size")

    def __init__(self, chunks, next_link):
        import hashlib

        # kept in pieces: joining a 10 MB page would copy it once more
        self.chunks = tuple(chunks)
        self.next_link = next_link
        digest = hashlib.blake2b(digest_size=12)
        for chunk in self.chunks:
            digest.update(chunk)
        self.etag = f'"{digest.hexdigest()}"'
        self.gzip = None
        self.length = self.size = sum(map(len, self.chunks))

    def gzipped(self):
        if self.gzip is None:
            compressor = zlib.compressobj(6, zlib.DEFLATED, 31)
            packed = [compressor.compress(c) for c in self.chunks]
            packed.append(compressor.flush())
            self.gzip = b"".join(packed)
            self.size += len(self.gzip)
        return self.gzip


class BodyCache:
    """Rendered pages by (snapshot, query, position), within a budget."""

    def __init__(self, budget_bytes):
        self.budget = budget_bytes
        self.pages = OrderedDict()
        self.used = 0
        self.lock = threading.Lock()

    def get(self, key):
        with self.lock:
            page = self.pages.get(key)
            if page is not None:
                self.pages.move_to_end(key)
            return page

    def put(self, key, page):
        with self.lock:
            if key in self.pages or page.size * 2 > self.budget:
                return
            self.pages[key] = page
            self.used += page.size
            self.trim()

    def grew(self, page, extra):
        with self.lock:
            if any(p is page for p in self.pages.values()):
                self.used += extra
                self.trim()

    def trim(self):
        while self.used > self.budget and self.pages:
            _, old = self.pages.popitem(last=False)
            self.used -= old.size


def link_path(parts):
    if not parts:
        return "/files"
    return "/files/" + "/".join(quote(p, safe="") for p in parts)


def render_page(snapshot, query, parts, view, start, fingerprint):
    """Render one page of a listing as a Page."""
    stop = min(start + query.limit, len(view))
    indices = view[start:stop]
    next_link = None
    if stop < len(view):
        key = sort_key(snapshot, query, view[stop - 1])
        cursor = encode_cursor(fingerprint, stop, key)
        params = [("cursor", cursor)]
        for name in ("limit", "sort", "order", "pattern"):
            value = getattr(query, name)
            if value is not None:
                params.append((name, str(value)))
        if query.types is not None:
            params.append(
                ("type", ",".join(TYPE_NAMES[t] for t in query.types))
            )
        params.append(("hidden", "true" if query.hidden else "false"))
        params.append(("format", query.format))
        encoded = "&".join(
            f"{k}={quote(v, safe='', errors='surrogateescape')}"
            for k, v in params
        )
        next_link = f"{link_path(parts)}?{encoded}"
    if query.format == "text":
        lines = [text_name(snapshot.names[i]) for i in indices]
        lines.append("")
        chunks = ["\n".join(lines).encode()]
    else:
        directory = "/" + "/".join(display_name(p) for p in parts)
        head = json.dumps(
            {
                "directory": directory,
                "count": stop - start,
                "total": len(view),
                "next": next_link,
            },
            separators=(",", ":"),
            ensure_ascii=False,
        )
        chunks = [
            f'{head[:-1]},"files":['.encode(),
            *render_entry_blocks(snapshot, indices),
            b"]}\n",
        ]
    return Page(chunks, next_link)


# --------------------------------------------------------------- metrics


REQUEST_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
SCAN_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Histogram:
    __slots__ = ("buckets", "counts", "sum")

    def __init__(self, buckets):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, value):
        index = bisect.bisect_left(self.buckets, value)
        self.counts[index] += 1
        self.sum += value

    def lines(self, name, labels):
        prefix = labels + "," if labels else ""
        cumulative = 0
        for bound, count in zip(self.buckets, self.counts[:-1], strict=True):
            cumulative += count
            yield f'{name}_bucket{{{prefix}le="{bound}"}} {cumulative}'
        cumulative += self.counts[-1]
        yield f'{name}_bucket{{{prefix}le="+Inf"}} {cumulative}'
        braces = f"{{{labels}}}" if labels else ""
        yield f"{name}_sum{braces} {self.sum!r}"
        yield f"{name}_count{braces} {cumulative}"


class Metrics:
    """Counters for /metrics; every method is safe from any thread."""

    def __init__(self, max_connections, max_entries):
        self.lock = threading.Lock()
        self.requests = {}
        self.durations = {}
        # (open connections, requests in flight); the server replaces it
        self.connection_counts = lambda: (0, 0)
        self.max_connections = max_connections
        self.max_entries = max_entries
        self.refused = 0
        self.scan = Histogram(SCAN_BUCKETS)
        self.last_entries = 0
        self.directory_ready = 0
        self.started = time.time()

    def observe_request(self, route, method, status, seconds):
        with self.lock:
            key = (route, method, status)
            self.requests[key] = self.requests.get(key, 0) + 1
            histogram = self.durations.get(route)
            if histogram is None:
                histogram = self.durations[route] = Histogram(REQUEST_BUCKETS)
            histogram.observe(seconds)

    def observe_scan(self, seconds):
        with self.lock:
            self.scan.observe(seconds)

    def add(self, name, delta):
        with self.lock:
            setattr(self, name, getattr(self, name) + delta)

    def render(self):
        """The exposition text, format 0.0.4."""
        out = []
        connections_open, in_flight = self.connection_counts()

        def family(name, kind, help_text):
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")

        with self.lock:
            family(
                "list_files_http_requests_total",
                "counter",
                "HTTP requests answered, by route, method and status.",
            )
            for (route, method, status), count in sorted(
                self.requests.items()
            ):
                out.append(
                    "list_files_http_requests_total{"
                    f'route="{route}",method="{method}",status="{status}"}} '
                    f"{count}"
                )
            family(
                "list_files_http_request_duration_seconds",
                "histogram",
                "Time from request head received to response sent.",
            )
            for route, histogram in sorted(self.durations.items()):
                out.extend(
                    histogram.lines(
                        "list_files_http_request_duration_seconds",
                        f'route="{route}"',
                    )
                )
            gauges = (
                (
                    "list_files_http_requests_in_flight",
                    "Requests being answered now.",
                    in_flight,
                ),
                (
                    "list_files_http_connections_open",
                    "Client connections open now.",
                    connections_open,
                ),
                (
                    "list_files_http_connections_max",
                    "Configured maximum of open connections.",
                    self.max_connections,
                ),
            )
            for name, help_text, value in gauges:
                family(name, "gauge", help_text)
                out.append(f"{name} {value}")
            family(
                "list_files_http_connections_refused_total",
                "counter",
                "Connections answered 503 for being over the limit.",
            )
            out.append(
                f"list_files_http_connections_refused_total {self.refused}"
            )
            family(
                "list_files_scan_duration_seconds",
                "histogram",
                "Time to read a directory and stat its entries.",
            )
            out.extend(self.scan.lines("list_files_scan_duration_seconds", ""))
            for name, help_text, value in (
                (
                    "list_files_last_listing_entries",
                    "Entries in the directory of the last listing served.",
                    self.last_entries,
                ),
                (
                    "list_files_page_entries_max",
                    "Configured maximum of entries per response.",
                    self.max_entries,
                ),
                (
                    "list_files_directory_ready",
                    "1 when the directory could be opened at the last "
                    "check, else 0.",
                    self.directory_ready,
                ),
            ):
                family(name, "gauge", help_text)
                out.append(f"{name} {value}")
        family("list_files_build_info", "gauge", "Version of the server.")
        python = ".".join(map(str, sys.version_info[:3]))
        out.append(
            f'list_files_build_info{{version="{__version__}",'
            f'python_version="{python}"}} 1'
        )
        out.extend(process_metric_lines(self.started))
        out.append("")
        return "\n".join(out).encode()


def process_metric_lines(fallback_start):
    """The usual process_* metrics, read from /proc/self."""
    try:
        with open("/proc/self/stat", "rb") as stream:
            fields = stream.read().rsplit(b")", 1)[1].split()
        with open("/proc/stat", "rb") as stream:
            boot = next(
                int(line.split()[1])
                for line in stream
                if line.startswith(b"btime ")
            )
    except (OSError, StopIteration, IndexError, ValueError):
        return []
    ticks = os.sysconf("SC_CLK_TCK")
    page = os.sysconf("SC_PAGE_SIZE")
    # fields[0] is field 3 of proc(5): state
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    threads = int(fields[17])
    start = boot + int(fields[19]) / ticks if boot else fallback_start
    virtual = int(fields[20])
    resident = int(fields[21]) * page
    try:
        open_fds = len(os.listdir("/proc/self/fd"))
    except OSError:
        open_fds = -1
    import resource

    max_fds = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    rows = (
        ("process_cpu_seconds_total", "counter", "CPU time used.", cpu),
        (
            "process_start_time_seconds",
            "gauge",
            "Start time since the Unix epoch in seconds.",
            start,
        ),
        (
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            resident,
        ),
        (
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            virtual,
        ),
        ("process_open_fds", "gauge", "Open file descriptors.", open_fds),
        (
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            max_fds,
        ),
        ("process_threads", "gauge", "Threads in the process.", threads),
    )
    lines = []
    for name, kind, help_text, value in rows:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.append(f"{name} {value}")
    return lines


# ---------------------------------------------------------------- server


class RefusedConnections(threading.Thread):
    """Drains and closes connections that were answered 503 at accept.

    The 503 is sent at once; reading what the client still sends before
    closing avoids a TCP reset that could discard that answer.  One
    thread serves all of them, so refusals cannot exhaust threads.
    """

    max_pending = 256
    linger_seconds = 2.0

    def __init__(self):
        super().__init__(name="refused-connections", daemon=True)
        self.incoming = queue.SimpleQueue()
        self.selector = selectors.DefaultSelector()
        self.deadlines = {}

    def add(self, sock):
        if len(self.deadlines) >= self.max_pending:
            sock.close()
            return
        self.incoming.put(sock)

    def run(self):
        while True:
            block = not self.deadlines
            try:
                while True:
                    sock = self.incoming.get(block=block)
                    block = False
                    self.deadlines[sock] = (
                        time.monotonic() + self.linger_seconds
                    )
                    self.selector.register(sock, selectors.EVENT_READ)
            except queue.Empty:
                pass
            for key, _ in self.selector.select(0.05):
                try:
                    data = key.fileobj.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    self.drop(key.fileobj)
            now = time.monotonic()
            for sock, deadline in list(self.deadlines.items()):
                if deadline < now:
                    self.drop(sock)

    def drop(self, sock):
        self.selector.unregister(sock)
        del self.deadlines[sock]
        sock.close()


class ListFilesServer(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer with a connection cap and graceful shutdown.

    main() calls serve_forever() in a thread, then stop() on a signal.
    """

    daemon_threads = True
    block_on_close = False
    request_queue_size = 128

    def __init__(self, config):
        self.config = config
        self.metrics = Metrics(config.max_connections, config.max_entries)
        self.metrics.connection_counts = self.connection_counts
        self.listings = ListingCache(config.stat_ttl, self.metrics)
        self.bodies = BodyCache(config.cache_mb * 1024 * 1024)
        self.queries = QueryCache(config.max_entries)
        self.connections = {}
        self.connections_lock = threading.Lock()
        self.all_closed = threading.Condition(self.connections_lock)
        self.stopping = False
        self.refused = RefusedConnections()
        self.access_log = (
            AccessLog(sys.stdout.fileno()) if config.access_log else None
        )
        try:
            infos = socket.getaddrinfo(
                config.host,
                config.port,
                type=socket.SOCK_STREAM,
                flags=socket.AI_PASSIVE,
            )
        except socket.gaierror as error:
            raise ConfigError(
                f"HOST {config.host!r} is not an address: {error.strerror}"
            ) from None
        family, _, _, _, address = infos[0]
        self.address_family = family
        super().__init__(address[:2], ListFilesHandler)
        self.refused.start()

    def server_bind(self):
        """Bind without HTTPServer's reverse DNS lookup of the host."""
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def process_request(self, request, client_address):
        """Called by the accept loop: start a handler thread or refuse."""
        with self.connections_lock:
            full = len(self.connections) >= self.config.max_connections
            if not full and not self.stopping:
                self.connections[request] = False
        if self.stopping:
            self.shutdown_request(request)
        elif full:
            self.refuse(request)
        else:
            super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.connections_lock:
                self.connections.pop(request, None)
                self.all_closed.notify_all()

    def refuse(self, sock):
        self.metrics.add("refused", 1)
        LOG.warning("connection refused: %d open", len(self.connections))
        try:
            sock.setblocking(False)
            sock.send(REFUSED_RESPONSE)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            sock.close()
            return
        self.refused.add(sock)

    def connection_counts(self):
        """(open connections, connections answering a request now)."""
        with self.connections_lock:
            return len(self.connections), sum(self.connections.values())

    def set_busy(self, sock, busy):
        """Handlers mark themselves busy while answering a request.

        Returns False when the server is stopping and the connection is
        idle: the handler should close it.
        """
        with self.connections_lock:
            if sock in self.connections:
                self.connections[sock] = busy
            if not busy:
                self.all_closed.notify_all()
            return busy or not self.stopping

    def stop(self, grace):
        """Stop accepting, close idle connections, wait for the rest."""
        self.shutdown()
        self.socket.close()
        with self.connections_lock:
            self.stopping = True
            idle = [s for s, busy in self.connections.items() if not busy]
        for sock in idle:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + grace
        with self.connections_lock:
            while any(self.connections.values()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self.all_closed.wait(min(remaining, 0.05))
                for sock, busy in self.connections.items():
                    if not busy:
                        with contextlib.suppress(OSError):
                            sock.shutdown(socket.SHUT_RDWR)
            unfinished = sum(self.connections.values())
        if unfinished:
            LOG.warning("stopped with %d requests unfinished", unfinished)


STATUS_LINES = {
    s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\nServer: list-files"
    for s in HTTPStatus
}

REFUSED_BODY = error_body(503, "too many connections, retry later")
REFUSED_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Server: list-files\r\n"
    b"Content-Type: application/json\r\n"
    b"Content-Length: " + str(len(REFUSED_BODY)).encode() + b"\r\n"
    b"Retry-After: 1\r\n"
    b"Cache-Control: no-store\r\n"
    b"X-Content-Type-Options: nosniff\r\n"
    b"Connection: close\r\n\r\n" + REFUSED_BODY
)


def set_kernel_timeout(sock, option, deadline):
    """Arm SO_RCVTIMEO or SO_SNDTIMEO for the time left until deadline.

    Handler sockets stay in blocking mode and the kernel enforces the
    timeout: a Python-level timeout would poll() before every recv() and
    send(), and each of those system calls hands the GIL to another
    thread.  TimeoutError when the deadline has passed.
    """
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError
    seconds = int(remaining)
    micros = max(int((remaining - seconds) * 1_000_000), 1)
    sock.setsockopt(socket.SOL_SOCKET, option, TIMEVAL.pack(seconds, micros))


# How long the access log's writer waits after the first line of a
# batch for more: the most a line is late, and what SIGKILL can lose.
ACCESS_LOG_DELAY_SECONDS = 0.01


class AccessLog:
    """One JSON object per line on fd, written by a thread of its own.

    A request thread only queues its line: a write() of its own would
    hand the GIL to another thread, which costs more than the write.
    The writer wakes on the first line of a batch, waits
    ACCESS_LOG_DELAY_SECONDS for more, and writes them in as few
    write() calls as hold whole lines within PIPE_BUF bytes each: such
    a write is never interleaved with another in a pipe, and the kernel
    serialises writes to a regular file.  A line that would be longer
    has its path (or then its method) cut short and carries
    "truncated": true.  flush() writes what is queued (at exit).
    """

    def __init__(self, fd):
        self.fd = fd
        self.lines = deque()
        self.wake = threading.Event()
        self.flushing = threading.Lock()
        threading.Thread(
            target=self.run, name="access-log", daemon=True
        ).start()

    def write(self, time, client, method, path, status, sent, duration):
        line = encode_log_line(
            time, client, method, path, status, sent, duration
        )
        while len(line) > select.PIPE_BUF:
            if len(path) > 64:
                path = path[: len(path) // 2]
            else:
                method = method[: len(method) // 2]
            line = encode_log_line(
                time, client, method, path, status, sent, duration, True
            )
        # Queued before wake is read: the writer clears wake before it
        # drains, so a line it misses always sets wake again.
        self.lines.append(line)
        if not self.wake.is_set():
            self.wake.set()

    def run(self):
        while True:
            self.wake.wait()
            time.sleep(ACCESS_LOG_DELAY_SECONDS)
            self.wake.clear()
            self.flush()

    def flush(self):
        with self.flushing:
            batch, size = [], 0
            while self.lines:
                line = self.lines.popleft()
                if size + len(line) > select.PIPE_BUF:
                    self.write_all(b"".join(batch))
                    batch, size = [], 0
                batch.append(line)
                size += len(line)
            if batch:
                self.write_all(b"".join(batch))

    def write_all(self, data):
        with contextlib.suppress(OSError):
            written = os.write(self.fd, data)
            while written < len(data):
                data = data[written:]
                written = os.write(self.fd, data)


def encode_log_line(
    time, client, method, path, status, sent, duration, truncated=False
):
    """The access log line: json.dumps() of these fields, made faster."""
    text = (
        f'{{"time":"{time}","client":{json_string(client)},'
        f'"method":{json_string(method)},"path":{json_string(path)},'
        f'"status":{status:d},"bytes":{sent:d},"duration":{duration!r}'
    )
    if truncated:
        text += ',"truncated":true'
    return (text + "}\n").encode("ascii")


class BadRequest(Exception):
    """The request head cannot be parsed; answered and then closed."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.message = message


ROUTES = {
    "/healthz": "healthz",
    "/readyz": "readyz",
    "/metrics": "metrics",
    "/openapi.json": "openapi",
}


class ListFilesHandler(http.server.BaseHTTPRequestHandler):
    """One client connection; ListFilesServer starts it in a thread.

    The request head is read straight from the socket against a deadline
    (slow senders are cut off), and responses are written in one or two
    sendall() calls; BaseHTTPRequestHandler's line-by-line parser and
    its email-based header parsing are not used.
    """

    protocol_version = "HTTP/1.1"
    server_version = "list-files"
    sys_version = ""
    max_request_line = 8192
    max_header_bytes = 16384
    max_headers = 100

    def setup(self):
        self.connection = self.request
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # the timeouts most calls need stay armed; others re-arm them
        self.full_timeouts = {
            socket.SO_RCVTIMEO: self.server.config.timeout,
            socket.SO_SNDTIMEO: self.server.config.timeout
            + SMALL_SEND_SECONDS,
        }
        self.armed = {}
        self.pending = bytearray()
        self.close_connection = False
        self.config = self.server.config

    def finish(self):
        pass

    def version_string(self):
        return self.server_version

    def handle(self):
        while not self.close_connection:
            self.handle_one_request()

    def handle_one_request(self):
        """Read one request head, answer it; set close_connection."""
        try:
            head = self.read_head()
        except BadRequest as error:
            self.started = time.monotonic()
            self.method, self.target, self.route = "-", "-", "unmatched"
            self.close_connection = True
            self.respond_error(error.status, error.message)
            return
        if head is None:
            self.close_connection = True
            return
        if not self.server.set_busy(self.connection, True):
            self.close_connection = True
        try:
            self.answer(head)
        finally:
            if not self.server.set_busy(self.connection, False):
                self.close_connection = True

    @property
    def metrics(self):
        return self.server.metrics

    def arm(self, option, deadline=None):
        """Set the kernel timeout `option` to its full value (deadline
        None) or to the time left until deadline."""
        if deadline is None:
            if self.armed.get(option) == "full":
                return
            deadline = time.monotonic() + self.full_timeouts[option]
            self.armed[option] = "full"
        else:
            self.armed[option] = "partial"
        set_kernel_timeout(self.connection, option, deadline)

    def receive(self, deadline, first):
        """One recv(): the first of a request waits the full timeout."""
        self.arm(socket.SO_RCVTIMEO, None if first else deadline)
        try:
            return self.connection.recv(65536)
        except BlockingIOError:
            raise TimeoutError from None

    def send_buffers(self, buffers, deadline):
        """sendall() of several buffers until deadline, by sendmsg().

        One writev-like call covers many chunks of a large page, where a
        send() per chunk would hand the GIL to other threads each time.
        """
        pending = [memoryview(b) for b in buffers if b]
        first = 0
        while first < len(pending):
            self.arm(socket.SO_SNDTIMEO, deadline)
            sent = self.connection.sendmsg(pending[first : first + IOV_MAX])
            while sent:
                size = len(pending[first])
                if sent < size:
                    pending[first] = pending[first][sent:]
                    break
                sent -= size
                first += 1

    def send(self, data, deadline=None):
        """sendall() within the full send timeout or until deadline."""
        self.arm(socket.SO_SNDTIMEO, deadline)
        with memoryview(data) as view:
            sent = self.connection.send(view)
            while sent < len(view):
                view = view[sent:]
                if deadline is None:
                    deadline = time.monotonic() + SMALL_SEND_SECONDS
                self.arm(socket.SO_SNDTIMEO, deadline)
                sent = self.connection.send(view)

    def read_head(self):
        """The request head as bytes, None on a clean close or idle
        timeout; BadRequest for oversized or too slow heads."""
        deadline = time.monotonic() + self.config.timeout
        limit = self.max_request_line + self.max_header_bytes
        buffer = self.pending
        while True:
            # the head ends at its first empty line, whether the lines
            # end in CRLF or in a bare LF (RFC 9112, 2.2), so that a
            # "\r\n\n" cannot hide a second request among the fields
            crlf = buffer.find(b"\n\r\n")
            lf = buffer.find(b"\n\n")
            if crlf >= 0 and (lf < 0 or crlf < lf):
                end = crlf + 3
                break
            if lf >= 0:
                end = lf + 2
                break
            first_line = buffer.find(b"\n")
            if (first_line < 0 and len(buffer) > self.max_request_line) or (
                first_line > self.max_request_line
            ):
                raise BadRequest(414, "request line too long")
            if len(buffer) > limit:
                raise BadRequest(431, "request header fields too large")
            try:
                chunk = self.receive(deadline, first=not buffer)
            except (TimeoutError, OSError):
                if buffer.strip():
                    raise BadRequest(408, "request timeout") from None
                return None
            if not chunk:
                if buffer.strip():
                    raise BadRequest(400, "incomplete request")
                return None
            if not buffer.strip():
                # the deadline for a request counts from its first byte
                deadline = time.monotonic() + self.config.timeout
            buffer += chunk
        head = bytes(buffer[:end])
        del buffer[:end]
        first_line = head.find(b"\n")
        if first_line > self.max_request_line:
            raise BadRequest(414, "request line too long")
        if len(head) - first_line > self.max_header_bytes:
            raise BadRequest(431, "request header fields too large")
        return head

    def parse_head(self, head):
        """Set method, target, headers; BadRequest when malformed."""
        lines = head.decode("latin-1").split("\n")
        request_line = lines[0].rstrip("\r")
        words = request_line.split(" ")
        if len(words) != 3:
            raise BadRequest(400, "malformed request line")
        self.method, self.target, version = words
        self.request_version = version
        if version not in ("HTTP/1.1", "HTTP/1.0"):
            raise BadRequest(400, "unsupported HTTP version")
        # lines: the request line, the fields, then "" twice (the blank
        # line and what follows it); a repeated name counts each time
        if len(lines) - 3 > self.max_headers:
            raise BadRequest(431, "too many header fields")
        headers = {}
        for line in lines[1:]:
            line = line.rstrip("\r")
            if not line:
                continue
            name, colon, value = line.partition(":")
            if (
                not colon
                or not name
                or name != name.strip()
                or line[0] in " \t"
            ):
                raise BadRequest(400, "malformed header line")
            name = name.lower()
            value = value.strip()
            if name in headers:
                headers[name] += ", " + value
            else:
                headers[name] = value
        self.header_map = headers
        connection = headers.get("connection", "").lower()
        if version == "HTTP/1.0":
            self.close_connection = "keep-alive" not in connection
        elif "close" in connection:
            self.close_connection = True
        if "transfer-encoding" in headers or headers.get(
            "content-length", "0"
        ) not in ("0", ""):
            # the body is not read, so the connection cannot be reused
            self.close_connection = True
        if not self.target.startswith("/"):
            raise BadRequest(400, "request target must be a path")

    def answer(self, head):
        self.started = time.monotonic()
        self.method, self.target, self.route = "-", "-", "unmatched"
        try:
            self.parse_head(head)
        except BadRequest as error:
            self.close_connection = True
            self.respond_error(error.status, error.message)
            return
        path, _, raw_query = self.target.partition("?")
        name = ROUTES.get(path)
        if name is None and (path == "/files" or path.startswith("/files/")):
            name = "files"
        if name is None:
            self.respond_error(404, "not found")
            return
        if name != "files":
            self.route = path
        elif path in ("/files", "/files/"):
            self.route = "/files"
        else:
            self.route = "/files/{path}"
        if self.method not in ("GET", "HEAD"):
            self.respond_error(
                405, "method not allowed", (("Allow", "GET, HEAD"),)
            )
            return
        try:
            getattr(self, "serve_" + name)(path, raw_query)
        except HTTPError as error:
            self.respond_error(error.status, error.message, error.headers)
        except Exception:
            LOG.exception("unexpected error answering %s", self.route)
            self.close_connection = True
            self.respond_error(500, "internal server error")

    # --------------------------------------------------------- routes

    def serve_healthz(self, path, raw_query):
        self.respond(200, json_bytes({"status": "ok"}), cache="no-store")

    def serve_readyz(self, path, raw_query):
        reason = directory_problem(self.config.directory)
        self.metrics.directory_ready = 0 if reason else 1
        if reason:
            body = json_bytes({"status": "not ready", "reason": reason})
            self.respond(503, body, cache="no-store")
        else:
            body = json_bytes({"status": "ready"})
            self.respond(200, body, cache="no-store")

    def serve_metrics(self, path, raw_query):
        self.respond(
            200,
            self.metrics.render(),
            "text/plain; version=0.0.4; charset=utf-8",
            cache="no-store",
        )

    def serve_openapi(self, path, raw_query):
        self.respond(200, openapi_body(self.config), cache="no-cache")

    def serve_files(self, path, raw_query):
        started = self.started
        if "\\" in path or "\0" in path:
            raise HTTPError(404, "not found")
        parts = parse_subpath(path)
        query = self.server.queries.parse(
            raw_query, self.header_map.get("accept")
        )
        key = b"/".join(parts)
        snapshot = None
        if not parts:
            # the root's own path leads nowhere a request could choose:
            # one stat() re-validates a cached listing of it
            snapshot = self.server.listings.cached(
                key, self.config.directory, started
            )
        if snapshot is None:
            root_fd = open_root(self.config.directory)
            try:
                fd = open_subdirectory(root_fd, parts)
            finally:
                os.close(root_fd)
            try:
                snapshot = self.server.listings.get(key, fd, started)
            finally:
                os.close(fd)
        fingerprint = None
        view = build_view(snapshot, query)
        start = 0
        if query.cursor is not None:
            fingerprint = query.fingerprint(key)
            cursor = decode_cursor(query.cursor, fingerprint, query.sort)
            start = page_start(snapshot, query, view, cursor)
        cache_key = (
            key,
            snapshot.id,
            query.view_key(),
            query.format,
            query.limit,
            start,
        )
        page = self.server.bodies.get(cache_key)
        if page is None:
            if fingerprint is None:
                fingerprint = query.fingerprint(key)
            page = render_page(
                snapshot, query, parts, view, start, fingerprint
            )
            self.server.bodies.put(cache_key, page)
        self.metrics.last_entries = len(snapshot.names)
        self.send_page(page, query)

    def send_page(self, page, query):
        headers = [("ETag", page.etag), ("Vary", "Accept, Accept-Encoding")]
        if page.next_link is not None:
            headers.append(("Link", f'<{page.next_link}>; rel="next"'))
        content_type = (
            "text/plain; charset=utf-8"
            if query.format == "text"
            else "application/json"
        )
        if etag_matches(self.header_map.get("if-none-match"), page.etag):
            self.respond(304, b"", content_type, headers, cache="no-cache")
            return
        body = page.chunks
        if page.length >= GZIP_MIN_BYTES and accepts_gzip(
            self.header_map.get("accept-encoding")
        ):
            size_before = page.size
            body = page.gzipped()
            if page.size != size_before:
                self.server.bodies.grew(page, page.size - size_before)
            headers[0] = ("ETag", page.etag[:-1] + '-gzip"')
            headers.append(("Content-Encoding", "gzip"))
        self.respond(200, body, content_type, headers, cache="no-cache")

    # ------------------------------------------------------- responses

    def respond_error(self, status, message, headers=()):
        if status == 503:
            headers = (*headers, ("Retry-After", "1"))
        self.respond(status, error_body(status, message), headers=headers)

    def respond(
        self,
        status,
        body,
        content_type="application/json",
        headers=(),
        cache="no-store",
    ):
        """Send status, headers and body (no body for HEAD and 304)."""
        lines = [
            STATUS_LINES[status],
            f"Date: {http_date()}",
            f"Content-Type: {content_type}",
            "X-Content-Type-Options: nosniff",
            f"Cache-Control: {cache}",
        ]
        if isinstance(body, bytes):
            body = (body,)
        length = sum(map(len, body))
        if status != 304:
            lines.append(f"Content-Length: {length}")
        for name, value in headers:
            lines.append(f"{name}: {value}")
        if self.close_connection:
            lines.append("Connection: close")
        elif self.request_version_is_1_0():
            lines.append("Connection: keep-alive")
        lines.append("\r\n")
        head = "\r\n".join(lines).encode("latin-1")
        if self.method == "HEAD" or status == 304:
            body, length = (), 0
        sent = 0
        try:
            if length < SMALL_SEND_BYTES:
                self.send(b"".join((head, *body)))
            else:
                deadline = (
                    time.monotonic()
                    + self.config.timeout
                    + length / MIN_SEND_RATE
                )
                self.send_buffers((head, *body), deadline)
            sent = length
        except OSError:
            self.close_connection = True
        duration = time.monotonic() - self.started
        self.metrics.observe_request(
            self.route, self.metric_method(), status, duration
        )
        if self.server.access_log is not None:
            self.server.access_log.write(
                rfc3339(time.time_ns()),
                self.client_address[0],
                self.method,
                self.target,
                status,
                sent,
                round(duration, 6),
            )

    def request_version_is_1_0(self):
        return getattr(self, "request_version", "") == "HTTP/1.0"

    def metric_method(self):
        if self.method in ("GET", "HEAD", "POST", "PUT", "DELETE"):
            return self.method
        return "other"


def etag_matches(header, etag):
    if not header:
        return False
    if header.strip() == "*":
        return True
    for candidate in header.split(","):
        tag = candidate.strip().removeprefix("W/")
        if tag.endswith('-gzip"'):
            tag = tag[: -len('-gzip"')] + '"'
        if tag == etag:
            return True
    return False


def accepts_gzip(header):
    if not header:
        return False
    for item in header.split(","):
        coding, _, params = item.strip().partition(";")
        if coding.strip().lower() in ("gzip", "x-gzip", "*"):
            return params.replace(" ", "") not in ("q=0", "q=0.0", "q=0.00")
    return False


def directory_problem(directory):
    """None when the directory can be listed, else a short reason."""
    try:
        fd = os.open(directory, DIR_FLAGS)
    except FileNotFoundError:
        return "the directory does not exist"
    except NotADirectoryError:
        return "the configured path is not a directory"
    except PermissionError:
        return "the directory is not readable"
    except OSError:
        return "the directory cannot be opened"
    try:
        with os.scandir(fd) as entries:
            next(entries, None)
    except OSError:
        return "the directory cannot be listed"
    finally:
        os.close(fd)
    return None


_OPENAPI = []


def openapi_body(config):
    if not _OPENAPI:
        _OPENAPI.append(json_bytes(openapi_document(config.max_entries)))
    return _OPENAPI[0]


def openapi_document(max_entries):
    """The OpenAPI 3.1 description of every endpoint."""

    def ref(name):
        return {"$ref": f"#/components/schemas/{name}"}

    def json_content(name):
        return {"application/json": {"schema": ref(name)}}

    def header(schema, description=None, required=True):
        declared = {"required": required, "schema": schema}
        if description:
            declared["description"] = description
        return declared

    no_store = {"Cache-Control": header({"const": "no-store"})}
    no_cache = {"Cache-Control": header({"const": "no-cache"})}
    closes = {**no_store, "Connection": header({"const": "close"})}
    retry_after = header(
        {"type": "string", "pattern": "^[0-9]+$"},
        "Seconds to wait before trying again.",
    )

    def error(description, headers=None):
        return {
            "description": description,
            "headers": headers or no_store,
            "content": json_content("Error"),
        }

    def plain(description, schema=None):
        return {
            "description": description,
            "headers": no_store,
            "content": {
                "text/plain": {"schema": schema or {"type": "string"}}
            },
        }

    # answers any request can get, whatever its path and method; the
    # operations refer to them by name to keep the document small
    shared_responses = {
        "BadRequest": error("The request head is malformed."),
        "RequestTimeout": error(
            "The request head did not arrive within CONNECTION_TIMEOUT "
            "of its first byte.",
            closes,
        ),
        "URITooLong": error("The request line is longer than 8 KiB.", closes),
        "HeaderFieldsTooLarge": error(
            "The header block is larger than 16 KiB or has more than "
            "100 fields.",
            closes,
        ),
        "TooManyConnections": error(
            "Over MAX_CONNECTIONS open connections.",
            {**closes, "Retry-After": retry_after},
        ),
        "ServerError": error("An unexpected error in the server.", closes),
        "MethodNotAllowed": error(
            "Only GET and HEAD are allowed.",
            {**no_store, "Allow": header({"const": "GET, HEAD"})},
        ),
        "NotFound": error("A path this document does not describe."),
    }

    def shared(name):
        return {"$ref": f"#/components/responses/{name}"}

    request_errors = {
        "400": shared("BadRequest"),
        "408": shared("RequestTimeout"),
        "414": shared("URITooLong"),
        "431": shared("HeaderFieldsTooLarge"),
        "503": shared("TooManyConnections"),
    }
    server_error = {"500": shared("ServerError")}
    not_allowed = {
        "summary": "Not allowed: only GET and HEAD are",
        "responses": {**request_errors, "405": shared("MethodNotAllowed")},
    }

    listing_parameters = [
        {
            "name": "limit",
            "in": "query",
            "description": "Entries per page (default and maximum: the "
            "server's MAX_ENTRIES).",
            "schema": {
                "type": "integer",
                "minimum": 1,
                "maximum": max_entries,
            },
        },
        {
            "name": "cursor",
            "in": "query",
            "description": "Opaque position from a previous page's `next`.",
            "schema": {"type": "string", "maxLength": MAX_CURSOR_CHARS},
        },
        {
            "name": "sort",
            "in": "query",
            "description": "Sort key; ties are broken by name.",
            "schema": {"enum": list(SORT_KEYS), "default": "name"},
        },
        {
            "name": "order",
            "in": "query",
            "schema": {"enum": ["asc", "desc"], "default": "asc"},
        },
        {
            "name": "type",
            "in": "query",
            "description": "Comma-separated entry types to keep.",
            "schema": {
                "type": "string",
                "pattern": "^(file|dir|symlink|other)"
                "(,(file|dir|symlink|other))*$",
            },
        },
        {
            "name": "pattern",
            "in": "query",
            "description": "Glob (*, ?, [...]) matched against the whole "
            "name, case-sensitive; * also matches a leading dot.",
            "schema": {"type": "string", "minLength": 1, "maxLength": 255},
        },
        {
            "name": "hidden",
            "in": "query",
            "description": "Whether names starting with a dot are listed.",
            "schema": {"enum": ["true", "false", "1", "0"], "default": "true"},
        },
        {
            "name": "format",
            "in": "query",
            "description": "json, or text (one name per line); without it, "
            "Accept: text/plain selects text.",
            "schema": {"enum": ["json", "text"]},
        },
    ]
    listing_headers = {
        "ETag": header({"type": "string", "pattern": '^"[0-9a-z-]+"$'}),
        "Link": header(
            {"type": "string", "pattern": '^<[^>]+>; rel="next"$'},
            "The next page; only when there is one.",
            required=False,
        ),
        "Vary": header({"const": "Accept, Accept-Encoding"}),
        **no_cache,
    }
    listing_responses = {
        "200": {
            "description": "The listing (one page of it).",
            "headers": listing_headers,
            "content": {
                "application/json": {"schema": ref("Listing")},
                "text/plain": {
                    "schema": {
                        "type": "string",
                        "description": "One name per line; backslash, "
                        "control characters and bytes that are not UTF-8 "
                        "are escaped as \\\\, \\n, \\t, \\r, \\xNN.",
                    }
                },
            },
        },
        "304": {
            "description": "Not modified (If-None-Match matched).",
            "headers": {"ETag": listing_headers["ETag"], **no_cache},
        },
        **request_errors,
        "400": error(
            "A query parameter or the cursor is not valid, or the "
            "request head is malformed."
        ),
        "404": error("No such directory inside the root (also any escape)."),
        "503": error(
            "The directory is not available, or over MAX_CONNECTIONS "
            "open connections (then with Connection: close).",
            {**no_store, "Retry-After": retry_after},
        ),
        **server_error,
    }
    listing_operation = {
        "parameters": listing_parameters,
        "responses": listing_responses,
    }
    path_parameter = {
        "name": "path",
        "in": "path",
        "required": True,
        "description": "Subdirectory, relative to the root; "
        "symlinks are not followed.",
        "schema": {"type": "string"},
    }
    sub_operation = {
        "parameters": listing_parameters,
        "responses": {
            **listing_responses,
            "403": error("The subdirectory is not readable."),
        },
    }

    def both(operation, summary):
        get = {"summary": summary, **operation}
        head = {"summary": summary + " (headers only)", **operation}
        return {"get": get, "head": head}

    def probe(summary, responses):
        return {
            "get": {
                "summary": summary,
                "responses": {**request_errors, **responses, **server_error},
            }
        }

    document = {
        "openapi": "3.1.0",
        "info": {
            "title": "list-files",
            "version": __version__,
            "description": "Lists one directory. Every error has an "
            "Error body; paths not described here are answered 404.",
        },
        "paths": {
            "/files": both(listing_operation, "List the root directory"),
            "/files/{path}": {
                "parameters": [path_parameter],
                **both(sub_operation, "List a subdirectory"),
            },
            "/healthz": probe(
                "Liveness",
                {
                    "200": {
                        "description": "The process serves.",
                        "headers": no_store,
                        "content": json_content("Health"),
                    },
                },
            ),
            "/readyz": probe(
                "Readiness: the directory can be listed",
                {
                    "200": {
                        "description": "Ready.",
                        "headers": no_store,
                        "content": json_content("Ready"),
                    },
                    "503": {
                        "description": "Not ready, with the reason; or "
                        "over MAX_CONNECTIONS open connections (an Error, "
                        "with Retry-After and Connection: close).",
                        "headers": {
                            **no_store,
                            "Retry-After": {**retry_after, "required": False},
                        },
                        "content": {
                            "application/json": {
                                "schema": {
                                    "oneOf": [ref("NotReady"), ref("Error")]
                                }
                            }
                        },
                    },
                },
            ),
            "/metrics": probe(
                "Prometheus text exposition format 0.0.4",
                {"200": plain("Metrics.")},
            ),
            "/openapi.json": probe(
                "This document",
                {
                    "200": {
                        "description": "OpenAPI 3.1.",
                        "headers": no_cache,
                        "content": {
                            "application/json": {"schema": {"type": "object"}}
                        },
                    },
                },
            ),
        },
        "components": {
            "responses": shared_responses,
            "schemas": {
                "Entry": {
                    "type": "object",
                    "required": ["name", "type", "size", "mtime"],
                    "additionalProperties": False,
                    "properties": {
                        "name": {
                            "type": "string",
                            "description": "The name; bytes that are not "
                            "UTF-8 are shown as U+FFFD.",
                        },
                        "name_b64": {
                            "type": "string",
                            "contentEncoding": "base64",
                            "description": "Only for names that are not "
                            "valid UTF-8: the exact bytes, base64.",
                        },
                        "type": {"enum": list(TYPE_NAMES)},
                        "size": {
                            "type": ["integer", "null"],
                            "minimum": 0,
                            "description": "lstat size in bytes; null "
                            "when the entry cannot be stat'ed.",
                        },
                        "mtime": {
                            "type": ["string", "null"],
                            "format": "date-time",
                            "pattern": "^\\d{4}-\\d\\d-\\d\\dT"
                            "\\d\\d:\\d\\d:\\d\\d\\.\\d{6}Z$",
                            "description": "RFC 3339 UTC, microseconds.",
                        },
                    },
                },
                "Listing": {
                    "type": "object",
                    "required": [
                        "directory",
                        "count",
                        "total",
                        "next",
                        "files",
                    ],
                    "additionalProperties": False,
                    "properties": {
                        "directory": {
                            "type": "string",
                            "description": "Path relative to the root; "
                            "/ for the root.",
                        },
                        "count": {
                            "type": "integer",
                            "minimum": 0,
                            "description": "Entries in this response.",
                        },
                        "total": {
                            "type": "integer",
                            "minimum": 0,
                            "description": "Entries the query selects, "
                            "over all pages.",
                        },
                        "next": {
                            "type": ["string", "null"],
                            "description": "URL path and query of the "
                            "next page; null on the last.",
                        },
                        "files": {
                            "type": "array",
                            "maxItems": max_entries,
                            "items": ref("Entry"),
                        },
                    },
                },
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "additionalProperties": False,
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["status", "message"],
                            "additionalProperties": False,
                            "properties": {
                                "status": {
                                    "type": "integer",
                                    "minimum": 400,
                                    "maximum": 599,
                                },
                                "message": {"type": "string"},
                            },
                        }
                    },
                },
                "Health": {
                    "type": "object",
                    "required": ["status"],
                    "additionalProperties": False,
                    "properties": {"status": {"const": "ok"}},
                },
                "Ready": {
                    "type": "object",
                    "required": ["status"],
                    "additionalProperties": False,
                    "properties": {"status": {"const": "ready"}},
                },
                "NotReady": {
                    "type": "object",
                    "required": ["status", "reason"],
                    "additionalProperties": False,
                    "properties": {
                        "status": {"const": "not ready"},
                        "reason": {"type": "string"},
                    },
                },
            },
        },
    }
    for operations in document["paths"].values():
        if "head" not in operations:
            get = operations["get"]
            operations["head"] = {
                **get,
                "summary": get["summary"] + " (headers only)",
            }
        for method in ("put", "post", "delete", "options", "patch", "trace"):
            operations[method] = not_allowed
    return document


# ------------------------------------------------------------------ main


def configure_logging(level):
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    )
    LOG.addHandler(handler)
    LOG.setLevel(level)
    LOG.propagate = False


def main(argv=None) -> int:
    try:
        config = parse_config(argv, os.environ)
    except ConfigError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    configure_logging(config.log_level)
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    try:
        server = ListFilesServer(config)
    except ConfigError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        LOG.error(
            "cannot listen on %s port %d: %s",
            escape_for_log(config.host),
            config.port,
            error.strerror or "error",
        )
        return 1

    serving = threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": 0.05},
        name="accept",
        daemon=True,
    )
    serving.start()
    host, port = server.server_address[:2]
    LOG.info(
        "listening on %s port %d, listing %s",
        host,
        port,
        escape_for_log(config.directory),
    )
    problem = directory_problem(config.directory)
    if problem:
        LOG.warning("not ready: %s", problem)

    while not stop.wait(1.0):
        pass
    LOG.info(
        "stopping: finishing requests for up to %ss", config.shutdown_grace
    )
    server.stop(config.shutdown_grace)
    if server.access_log is not None:
        server.access_log.flush()
    LOG.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
