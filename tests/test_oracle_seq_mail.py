"""Tests for oracle_seq_mail.py: the real entry point, run as a process.

The Oracle server cannot run here, so where a query must succeed the
object that `oracledb.connect` returns is replaced (FakeOracle, below)
by a small program, built from this module's FakeOracle source, that
patches `oracledb.connect` and then runs the script as __main__.
Everything else is real: the oracledb driver against real sockets that
refuse, hang or talk nonsense; an aiosmtpd server with STARTTLS, SMTPS
and AUTH using certificates made by trustme; and, in a Docker container
whose PID 1 is systemd, the shipped units with their sandbox.
"""

import base64
import email
import email.policy
import inspect
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from email.utils import parsedate_to_datetime
from pathlib import Path

import oracledb
import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult
from support import (
    REPO_ROOT,
    assert_promtool_accepts_metrics,
    require,
    require_docker,
    unit_exposure,
)
from systemd_container import SystemdContainer, booted

SCRIPT = REPO_ROOT / "oracle_seq_mail.py"
SERVICE = REPO_ROOT / "oracle_seq_mail.service"
TIMER = REPO_ROOT / "oracle_seq_mail.timer"
TESTS_DIR = Path(__file__).resolve().parent

# Distinctive test-only values, searched for in every output.
DB_SECRET = "Db-Pw-7f3c9e21-zq"  # noqa: S105
MAIL_SECRET = "Mail-Pw-4b8d2a66-xk"  # noqa: S105
SECRETS = (DB_SECRET, MAIL_SECRET)

SEQUENCE_SQL = (
    "SELECT sequence_owner, TO_CHAR(last_number), cache_size, increment_by"
    " FROM all_sequences"
    " WHERE sequence_owner = NVL(:owner, USER)"
    " AND sequence_name = :name"
)

# ------------------------------------------------------------ fake Oracle


class FakeOracle:
    """Stands in for the connection `oracledb.connect` returns.

    Configured by the FAKE_ORACLE variable (JSON): `row` to return from
    fetchone, `connect_errors` (one entry per connect attempt, null for
    success), `execute_error`. Every call is appended to `log` as JSON.
    """

    def __init__(self, settings):
        self.settings = settings
        self.log_path = Path(settings["log"])
        self.attempts = 0

    def record(self, call, **details):
        with self.log_path.open("a", encoding="utf-8") as stream:
            stream.write(json.dumps({"call": call, **details}) + "\n")

    def connect(self, dsn=None, **kwargs):
        self.record("connect", dsn=dsn, **kwargs)
        errors = self.settings.get("connect_errors", [])
        self.attempts += 1
        if self.attempts <= len(errors) and errors[self.attempts - 1]:
            raise oracledb.DatabaseError(errors[self.attempts - 1])
        return FakeConnection(self)


class FakeConnection:
    def __init__(self, fake):
        self.fake = fake

    def __setattr__(self, name, value):
        if name != "fake":
            self.fake.record("set", name=name, value=value)
        object.__setattr__(self, name, value)

    def cursor(self):
        self.fake.record("cursor")
        return FakeCursor(self.fake)

    def commit(self):
        self.fake.record("commit")

    def rollback(self):
        self.fake.record("rollback")

    def close(self):
        self.fake.record("close")


class FakeCursor:
    def __init__(self, fake):
        self.fake = fake

    def execute(self, statement, parameters=None, **keyword_parameters):
        self.fake.record(
            "execute", sql=statement, binds=parameters, kw=keyword_parameters
        )
        error = self.fake.settings.get("execute_error")
        if error:
            raise oracledb.DatabaseError(error)

    def fetchone(self):
        self.fake.record("fetchone")
        row = self.fake.settings.get("row")
        return tuple(row) if row is not None else None

    def close(self):
        self.fake.record("cursor.close")


def calls(log_path):
    if not log_path.exists():
        return []
    lines = log_path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def call_names(log_path):
    return [c["call"] for c in calls(log_path)]


# ------------------------------------------------------------ SMTP server


class RecordingHandler:
    """Keeps what the server saw; DATA may fail with 451 a few times."""

    def __init__(self, transient_failures=0):
        self.transient_failures = transient_failures
        self.data_attempts = 0
        self.mail_commands = 0
        self.messages = []

    async def handle_MAIL(self, server, session, envelope, address, options):
        self.mail_commands += 1
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self.data_attempts += 1
        if self.data_attempts <= self.transient_failures:
            return "451 4.3.0 Try again later"
        self.messages.append(envelope)
        return "250 2.0.0 Queued"


class Authenticator:
    """Records every AUTH attempt; accepts one user and password."""

    def __init__(self, user, password):
        self.user = user.encode()
        self.password = password.encode()
        self.attempts = []

    def __call__(self, server, session, envelope, mechanism, auth_data):
        self.attempts.append((mechanism, auth_data.login, session.ssl))
        ok = (auth_data.login, auth_data.password) == (
            self.user,
            self.password,
        )
        # handled=False: the server, not this callback, sends 235 or 535.
        return AuthResult(success=ok, handled=False)


class PortZeroController(Controller):
    """aiosmtpd's Controller, listening on a socket bound to port 0."""

    def __init__(self, handler, address="127.0.0.1", **kwargs):
        self.listener = socket.socket()
        self.listener.bind((address, 0))
        port = self.listener.getsockname()[1]
        super().__init__(handler, hostname=address, port=port, **kwargs)

    def _create_server(self):
        return self.loop.create_server(
            self._factory_invoker, sock=self.listener, ssl=self.ssl_context
        )


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture(scope="module")
def server_context(ca):
    """TLS context of a server whose certificate names 127.0.0.1."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    return context


@pytest.fixture
def ca_file(ca, tmp_path):
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
def smtp_server():
    """Factory: start an SMTP server; all are stopped at teardown."""
    started = []

    def start(handler=None, authenticator=None, **kwargs):
        handler = handler or RecordingHandler()
        authenticator = authenticator or Authenticator(
            "ops@example.com", MAIL_SECRET
        )
        controller = PortZeroController(
            handler, authenticator=authenticator, **kwargs
        )
        controller.start()
        started.append(controller)
        controller.recorder = handler
        controller.auth = authenticator
        return controller

    yield start
    for controller in started:
        controller.stop()


def starttls_server(smtp_server, server_context, **kwargs):
    return smtp_server(
        tls_context=server_context,
        require_starttls=True,
        auth_require_tls=True,
        **kwargs,
    )


# -------------------------------------------------------------- listeners


class Listener:
    """A TCP listener on 127.0.0.1:0 that accepts and then `behaviour`."""

    def __init__(self, behaviour):
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen()
        self.port = self.socket.getsockname()[1]
        self.behaviour = behaviour
        self.accepted = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            self.accepted.append(connection)
            if self.behaviour == "garbage":
                connection.sendall(b"\x00\xffNOT-TNS\r\n" * 64)
                connection.close()

    def close(self):
        self.socket.close()
        for connection in self.accepted:
            connection.close()


@pytest.fixture
def listener():
    made = []

    def make(behaviour="silent"):
        made.append(Listener(behaviour))
        return made[-1]

    yield make
    for item in made:
        item.close()


def closed_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ------------------------------------------------------------------ runs


@pytest.fixture
def env(tmp_path):
    """A complete, hermetic configuration; secrets in 0600 files."""
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    db_password = secrets / "db_password"
    db_password.write_text(DB_SECRET + "\n")
    db_password.chmod(0o600)
    mail_password = secrets / "email_password"
    mail_password.write_text(MAIL_SECRET + "\n")
    mail_password.chmod(0o600)
    return {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
        "DB_USER": "scott",
        "DB_PASSWORD_FILE": str(db_password),
        "DB_CONN_STRING": f"127.0.0.1:{closed_port()}/ORCLPDB1",
        "SEQUENCE_OWNER": "app",
        "SEQUENCE_NAME": "order_seq",
        "DB_TIMEOUT": "2",
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(closed_port()),
        "SMTP_TIMEOUT": "5",
        "EMAIL_USER": "ops@example.com",
        "EMAIL_PASSWORD_FILE": str(mail_password),
        "EMAIL_TO": "dba@example.com, Ops Team <ops@example.com>",
    }


@pytest.fixture
def fake_db(tmp_path):
    """Factory: FAKE_ORACLE settings for a run, and the call log path."""
    log_path = tmp_path / "oracle-calls.jsonl"

    def settings(**kwargs):
        kwargs.setdefault("row", ["APP", "12345", 20, 1])
        return json.dumps({"log": str(log_path), **kwargs})

    settings.log = log_path
    return settings


@pytest.fixture(scope="module", autouse=True)
def fake_program(tmp_path_factory):
    """Write the FakeOracle program once; `run` uses it for fake runs."""
    path = tmp_path_factory.mktemp("fake") / "fake_oracle_run.py"
    path.write_text(fake_oracle_program(SCRIPT))
    FAKE_PROGRAM.append(path)
    yield path
    FAKE_PROGRAM.remove(path)


FAKE_PROGRAM = []


def run(env, *args, fake=None, timeout=60):
    """Run the tool; with `fake` (FAKE_ORACLE settings) under FakeOracle."""
    environment = dict(env)
    if fake is None:
        argv = [sys.executable, str(SCRIPT), *args]
    else:
        environment["FAKE_ORACLE"] = fake
        argv = [sys.executable, str(FAKE_PROGRAM[0]), *args]
    return subprocess.run(
        argv,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def events(stderr):
    """The key=value log lines, as dicts (quoted values unquoted)."""
    parsed = []
    for line in stderr.splitlines():
        if not line.startswith("level="):
            continue
        fields, rest = {}, line
        while rest:
            key, _, rest = rest.partition("=")
            if rest.startswith('"'):
                value, index = "", 1
                while rest[index] != '"':
                    if rest[index] == "\\":
                        index += 1
                    value += rest[index]
                    index += 1
                rest = rest[index + 1 :].lstrip()
            else:
                value, _, rest = rest.partition(" ")
            fields[key] = value
        parsed.append(fields)
    return parsed


def error_event(stderr):
    errors = [e for e in events(stderr) if e.get("event") == "error"]
    assert len(errors) == 1, stderr
    return errors[0]


def with_mail_server(env, controller, ca_file, security="starttls"):
    return {
        **env,
        "SMTP_PORT": str(controller.port),
        "SMTP_SECURITY": security,
        "SMTP_CA_FILE": str(ca_file),
    }


# ----------------------------------------------------------- usage/config


def test_help_documents_every_variable_and_exit_code():
    result = run({"PATH": os.environ["PATH"]}, "--help")

    assert result.returncode == 0
    for name in (
        "DB_USER",
        "DB_PASSWORD",
        "DB_CONN_STRING",
        "TNS_ADMIN",
        "SEQUENCE_NAME",
        "SEQUENCE_OWNER",
        "CONTROL_TABLE",
        "CONTROL_COLUMN",
        "DB_TIMEOUT",
        "SMTP_HOST",
        "SMTP_PORT",
        "SMTP_SECURITY",
        "SMTP_CA_FILE",
        "SMTP_TIMEOUT",
        "EMAIL_USER",
        "EMAIL_PASSWORD",
        "EMAIL_FROM",
        "EMAIL_TO",
        "METRICS_TEXTFILE_DIR",
        "CREDENTIALS_DIRECTORY",
        "X_FILE",
    ):
        assert name in result.stdout, name
    for code in range(5):
        assert f"\n  {code}  " in result.stdout
    assert result.stderr == ""


def test_unknown_option_is_a_usage_error():
    result = run({"PATH": os.environ["PATH"]}, "--send-now")

    assert result.returncode == 2
    assert "unrecognized arguments: --send-now" in result.stderr


def test_check_validates_without_touching_the_network(env, listener):
    database, mail = listener(), listener()
    env["DB_CONN_STRING"] = f"127.0.0.1:{database.port}/ORCLPDB1"
    env["SMTP_PORT"] = str(mail.port)

    result = run(env, "--check")

    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        f"config ok: sequence APP.ORDER_SEQ via {env['DB_CONN_STRING']}\n"
    )
    assert [e["event"] for e in events(result.stderr)] == ["config_ok"]
    time.sleep(0.2)
    assert database.accepted == [] and mail.accepted == []


CONFIG_ERRORS = [
    ({"DB_USER": None}, "DB_USER is required but not set"),
    (
        {"DB_PASSWORD_FILE": None},
        "DB_PASSWORD is required (or DB_PASSWORD_FILE, or a systemd "
        "credential of that name)",
    ),
    (
        {"DB_PASSWORD": "also-set"},
        "set only one of DB_PASSWORD and DB_PASSWORD_FILE",
    ),
    (
        {"DB_PASSWORD_FILE": "/nonexistent/db_password"},
        "DB_PASSWORD_FILE: cannot read the file (No such file or directory)",
    ),
    (
        {"DB_CONN_STRING": "scott/tiger@dbhost:1521/ORCL"},
        "DB_CONN_STRING: holds a user/password before @; set DB_USER "
        "and DB_PASSWORD instead",
    ),
    (
        {"DB_CONN_STRING": "ORCL_ALIAS"},
        "DB_CONN_STRING: an alias needs TNS_ADMIN (DPY-4027)",
    ),
    (
        {"DB_CONN_STRING": "(DESCRIPTION=(ADDRESS="},
        "DB_CONN_STRING: cannot be parsed (DPY-2049)",
    ),
    (
        {"SEQUENCE_NAME": "order_seq; drop table x"},
        "SEQUENCE_NAME: not a valid Oracle identifier ([OWNER.]NAME; "
        'unquoted names are letters, digits, _ $ #; or "Quoted")',
    ),
    (
        {"SEQUENCE_OWNER": None, "SEQUENCE_NAME": "a.b.c"},
        "SEQUENCE_NAME: not a valid Oracle identifier ([OWNER.]NAME; "
        'unquoted names are letters, digits, _ $ #; or "Quoted")',
    ),
    (
        {"SEQUENCE_OWNER": '"APP"."X"'},
        "SEQUENCE_OWNER: not a valid Oracle identifier (NAME; unquoted "
        'names are letters, digits, _ $ #; or "Quoted")',
    ),
    (
        {"SEQUENCE_NAME": "S" * 129},
        "SEQUENCE_NAME: an identifier is longer than 128 bytes",
    ),
    (
        {"CONTROL_TABLE": "APP.CTL", "CONTROL_COLUMN": "ID"},
        "set SEQUENCE_NAME or CONTROL_TABLE/CONTROL_COLUMN, not both",
    ),
    (
        {"SEQUENCE_OWNER": None, "SEQUENCE_NAME": None},
        "SEQUENCE_NAME or CONTROL_TABLE + CONTROL_COLUMN is required",
    ),
    (
        {
            "SEQUENCE_OWNER": None,
            "SEQUENCE_NAME": None,
            "CONTROL_TABLE": "APP.CTL",
        },
        "CONTROL_COLUMN is required with CONTROL_TABLE",
    ),
    (
        {
            "SEQUENCE_OWNER": None,
            "SEQUENCE_NAME": None,
            "CONTROL_TABLE": "APP.CTL",
            "CONTROL_COLUMN": 'ID"',
        },
        "CONTROL_COLUMN: not a valid Oracle identifier (NAME; unquoted "
        'names are letters, digits, _ $ #; or "Quoted")',
    ),
    (
        {"DB_TIMEOUT": "soon"},
        "DB_TIMEOUT: must be seconds, > 0 and <= 86400",
    ),
    ({"SMTP_TIMEOUT": "0"}, "SMTP_TIMEOUT: must be seconds, > 0 and <= 86400"),
    ({"SMTP_PORT": "70000"}, "SMTP_PORT: must be a port number 1-65535"),
    ({"SMTP_SECURITY": "tls"}, "SMTP_SECURITY: must be starttls, ssl or none"),
    (
        {"SMTP_SECURITY": "none"},
        "EMAIL_PASSWORD: refusing to send a password without TLS "
        "(SMTP_SECURITY=none)",
    ),
    (
        {"SMTP_CA_FILE": "/nonexistent/ca.pem"},
        "SMTP_CA_FILE: cannot load (No such file or directory)",
    ),
    (
        {"EMAIL_USER": None},
        "EMAIL_USER is required with EMAIL_PASSWORD",
    ),
    (
        {"EMAIL_USER": "relay-login"},
        "EMAIL_FROM is required (EMAIL_USER is no address)",
    ),
    ({"EMAIL_TO": None}, "EMAIL_TO is required but not set"),
    (
        {"EMAIL_TO": "a@example.com,,b@example.com"},
        "EMAIL_TO: has an empty entry",
    ),
    (
        {"EMAIL_TO": "a@example.com\r\nBcc: x@evil.example"},
        "EMAIL_TO: contains control characters",
    ),
    (
        {"METRICS_TEXTFILE_DIR": "/nonexistent/textfiles"},
        "METRICS_TEXTFILE_DIR: not a writable directory",
    ),
]


@pytest.mark.parametrize(
    ("changes", "message"),
    CONFIG_ERRORS,
    ids=[message.split(":")[0][:40] for _, message in CONFIG_ERRORS],
)
def test_configuration_error_exits_2_naming_the_variable(
    env, changes, message
):
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value

    result = run(env, "--check")

    assert result.returncode == 2
    assert error_event(result.stderr) == {
        "level": "error",
        "event": "error",
        "phase": "config",
        "exit_code": "2",
        "error": message,
    }
    assert result.stdout == "failed: config error (exit 2)\n"
    for value in changes.values():
        if value and len(value) > 3 and value not in message:
            assert value not in result.stderr + result.stdout


def test_group_readable_secret_file_is_warned_about(env):
    Path(env["DB_PASSWORD_FILE"]).chmod(0o640)

    result = run(env, "--check")

    assert result.returncode == 0, result.stderr
    warning = events(result.stderr)[0]
    assert warning == {
        "level": "warning",
        "event": "secret_file_permissions",
        "source": "DB_PASSWORD_FILE",
        "mode": "0640",
        "advice": "chmod 600 (readable by group or others)",
    }


def test_secrets_come_from_the_systemd_credentials_directory(
    env, tmp_path, fake_db
):
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    from_credentials = "from-credentials"
    (credentials / "DB_PASSWORD").write_text(from_credentials + "\n")
    (credentials / "DB_PASSWORD").chmod(0o400)
    del env["DB_PASSWORD_FILE"]
    env["CREDENTIALS_DIRECTORY"] = str(credentials)

    result = run(env, "--dry-run", fake=fake_db())

    assert result.returncode == 0, result.stderr
    connect = calls(fake_db.log)[0]
    assert connect["password"] == from_credentials
    assert from_credentials not in result.stdout + result.stderr


def test_unreadable_credential_is_a_configuration_error(env, tmp_path):
    credentials = tmp_path / "credentials"
    (credentials / "DB_PASSWORD").mkdir(parents=True)
    del env["DB_PASSWORD_FILE"]
    env["CREDENTIALS_DIRECTORY"] = str(credentials)

    result = run(env, "--check")

    assert result.returncode == 2
    assert error_event(result.stderr)["error"] == (
        "credential DB_PASSWORD: cannot read the file (Is a directory)"
    )


# ------------------------------------------------- database, real driver


def test_refused_database_port_is_retried_then_exits_3(env):
    env["DB_TIMEOUT"] = "3"

    result = run(env)

    assert result.returncode == 3
    names = [e["event"] for e in events(result.stderr)]
    assert names == [
        "config_ok",
        "db_connect",
        "retry",
        "db_connect",
        "retry",
        "db_connect",
        "error",
    ]
    error = error_event(result.stderr)
    assert error["phase"] == "db"
    assert error["error"].startswith(
        "database error: DPY-6005: cannot connect to database"
    )
    assert error["error"].endswith("[Errno 111] Connection refused")
    assert result.stdout == "failed: db error (exit 3)\n"


def test_listener_that_never_answers_is_abandoned_at_db_timeout(env, listener):
    silent = listener("silent")
    env["DB_CONN_STRING"] = f"127.0.0.1:{silent.port}/ORCLPDB1"
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), "-v"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        while not silent.accepted and process.poll() is None:
            time.sleep(0.05)
        cmdline = Path(f"/proc/{process.pid}/cmdline").read_bytes()
        # Without the watchdog this waits for >10 minutes; DB_TIMEOUT=2.
        stdout, stderr = process.communicate(timeout=2 + 10)
    finally:
        process.kill()
        process.wait()

    assert process.returncode == 3
    assert silent.accepted, "the driver never reached the listener"
    assert error_event(stderr)["error"] == (
        f"no answer from {env['DB_CONN_STRING']} within DB_TIMEOUT=2s; "
        "gave up (a listener that accepts but never answers, or a "
        "silent network)"
    )
    assert stdout == "failed: db error (exit 3)\n"
    for secret in SECRETS:
        assert secret.encode() not in cmdline
        assert secret not in stdout + stderr


def test_listener_that_sends_garbage_exits_3(env, listener):
    garbage = listener("garbage")
    env["DB_CONN_STRING"] = f"127.0.0.1:{garbage.port}/ORCLPDB1"

    result = run(env)

    assert result.returncode == 3
    error = error_event(result.stderr)["error"]
    assert error.startswith("database error: DPY-6005: ")
    assert "DPY-4011: the database or network closed the connection" in error
    assert "Help: http" not in error
    assert len(garbage.accepted) >= 2, "a reset is transient: retried"


def test_bad_connect_string_is_a_configuration_error(env):
    env["DB_CONN_STRING"] = "dbhost:1521/ORCL extra words"

    result = run(env)

    assert result.returncode == 2
    assert error_event(result.stderr)["error"] == (
        "DB_CONN_STRING: cannot be parsed (DPY-4018)"
    )
    assert [e["event"] for e in events(result.stderr)] == ["error"]


def test_unknown_tns_alias_is_a_configuration_error(env, tmp_path):
    (tmp_path / "tnsnames.ora").write_text(
        "OTHER = (DESCRIPTION=(ADDRESS=(PROTOCOL=tcp)(HOST=h)(PORT=1521))"
        "(CONNECT_DATA=(SERVICE_NAME=S)))\n"
    )
    env["TNS_ADMIN"] = str(tmp_path)
    env["DB_CONN_STRING"] = "ORCL"

    result = run(env, "--check")

    assert result.returncode == 2
    assert error_event(result.stderr)["error"] == (
        "DB_CONN_STRING: alias not found in tnsnames.ora (DPY-4000)"
    )


def test_tns_alias_is_shown_with_its_address(env, tmp_path):
    (tmp_path / "tnsnames.ora").write_text(
        "ORCL = (DESCRIPTION=(ADDRESS=(PROTOCOL=tcp)(HOST=dbhost)"
        "(PORT=1522))(CONNECT_DATA=(SERVICE_NAME=ORCLPDB1)))\n"
    )
    env["TNS_ADMIN"] = str(tmp_path)
    env["DB_CONN_STRING"] = "ORCL"

    result = run(env, "--check")

    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        "config ok: sequence APP.ORDER_SEQ via ORCL (dbhost:1522/ORCLPDB1)\n"
    )


# ----------------------------------------- database, fake at the boundary


# What a run does with its session: one SELECT, then nothing is left
# open (no transaction, no cursor, no connection).
ONE_SELECT_SESSION = [
    "connect",
    "set",
    "cursor",
    "execute",
    "fetchone",
    "cursor.close",
    "rollback",
    "close",
]


def test_sequence_mode_runs_one_select_with_binds_and_ends_the_session(
    env, fake_db
):
    result = run(env, "--dry-run", fake=fake_db())

    assert result.returncode == 0, result.stderr
    log = calls(fake_db.log)
    assert [c["call"] for c in log] == ONE_SELECT_SESSION
    connect = log[0]
    assert connect["user"] == "scott"
    assert connect["password"] == DB_SECRET
    assert connect["dsn"] == env["DB_CONN_STRING"]
    assert 0 < connect["tcp_connect_timeout"] <= 2
    assert connect["retry_count"] == 0
    assert log[1]["name"] == "call_timeout"
    assert 0 < log[1]["value"] <= 2000
    assert log[3]["sql"] == SEQUENCE_SQL
    assert log[3]["binds"] == {"owner": "APP", "name": "ORDER_SEQ"}
    assert log[3]["kw"] == {}


def test_sequence_owner_defaults_to_the_connected_user(env, fake_db):
    del env["SEQUENCE_OWNER"]

    result = run(env, "--dry-run", fake=fake_db(row=["SCOTT", "7", 0, 1]))

    assert result.returncode == 0, result.stderr
    execute = calls(fake_db.log)[3]
    assert execute["binds"] == {"owner": None, "name": "ORDER_SEQ"}
    assert "Subject: [oracle_seq_mail] sequence SCOTT.ORDER_SEQ: 7" in (
        result.stdout
    )
    assert (
        "Meaning:   LAST_NUMBER of a NOCACHE sequence: the next value it "
        "will hand out\n"
    ) in result.stdout


def test_owner_dot_name_in_sequence_name_is_split_into_binds(env, fake_db):
    del env["SEQUENCE_OWNER"]
    env["SEQUENCE_NAME"] = 'app."Order_Seq"'

    result = run(env, "--dry-run", fake=fake_db())

    assert result.returncode == 0, result.stderr
    assert calls(fake_db.log)[3]["binds"] == {
        "owner": "APP",
        "name": "Order_Seq",
    }


def test_control_table_mode_quotes_validated_identifiers(env, fake_db):
    del env["SEQUENCE_OWNER"], env["SEQUENCE_NAME"]
    env["CONTROL_TABLE"] = 'batch."Control Table"'
    env["CONTROL_COLUMN"] = "last_id"

    result = run(env, "--dry-run", fake=fake_db(row=["98765"]))

    assert result.returncode == 0, result.stderr
    log = calls(fake_db.log)
    assert [c["call"] for c in log] == ONE_SELECT_SESSION
    assert log[3]["sql"] == (
        'SELECT TO_CHAR(MAX("LAST_ID")) FROM "BATCH"."Control Table"'
    )
    assert log[3]["binds"] is None
    assert "Value:     98765\n" in result.stdout
    assert "Meaning:   MAX(LAST_ID) of BATCH.Control Table\n" in result.stdout


def test_empty_control_table_is_reported_as_no_value(env, fake_db):
    del env["SEQUENCE_OWNER"], env["SEQUENCE_NAME"]
    env["CONTROL_TABLE"] = "CTL"
    env["CONTROL_COLUMN"] = "ID"

    result = run(env, "--dry-run", fake=fake_db(row=[None]))

    assert result.returncode == 0, result.stderr
    assert calls(fake_db.log)[3]["sql"] == (
        'SELECT TO_CHAR(MAX("ID")) FROM "CTL"'
    )
    assert "Value:     no value\n" in result.stdout
    assert "is NULL: the table has no rows with a value" in result.stdout


def test_missing_sequence_exits_3_and_still_ends_the_session(env, fake_db):
    result = run(env, fake=fake_db(row=None))

    assert result.returncode == 3
    assert error_event(result.stderr)["error"] == (
        "sequence APP.ORDER_SEQ not found, or DB_USER may not see it in "
        "ALL_SEQUENCES"
    )
    assert call_names(fake_db.log)[-2:] == ["rollback", "close"]
    assert "commit" not in call_names(fake_db.log)


def test_failed_select_exits_3_with_a_hint(env, fake_db):
    del env["SEQUENCE_OWNER"], env["SEQUENCE_NAME"]
    env["CONTROL_TABLE"] = "APP.CTL"
    env["CONTROL_COLUMN"] = "ID"
    fake = fake_db(execute_error="ORA-00942: table or view does not exist")

    result = run(env, fake=fake)

    assert result.returncode == 3
    assert error_event(result.stderr)["error"] == (
        "database error: the table does not exist or DB_USER may not read "
        "it (ORA-00942: table or view does not exist)"
    )
    assert call_names(fake_db.log)[-3:] == [
        "cursor.close",
        "rollback",
        "close",
    ]


def test_login_refused_is_not_retried(env, fake_db):
    fake = fake_db(connect_errors=["ORA-01017: invalid username/password"])

    result = run(env, fake=fake)

    assert result.returncode == 3
    assert call_names(fake_db.log) == ["connect"]
    assert error_event(result.stderr)["error"] == (
        "database error: login refused: check DB_USER and DB_PASSWORD "
        "(ORA-01017: invalid username/password)"
    )


def test_listener_without_the_service_yet_is_retried(env, fake_db):
    fake = fake_db(
        connect_errors=[
            "ORA-12514: listener does not currently know of service",
            None,
        ]
    )

    result = run(env, "--dry-run", fake=fake)

    assert result.returncode == 0, result.stderr
    assert call_names(fake_db.log).count("connect") == 2
    retry = [e for e in events(result.stderr) if e["event"] == "retry"]
    assert len(retry) == 1 and retry[0]["phase"] == "db"


def test_dry_run_prints_the_mail_and_never_connects_to_smtp(
    env, fake_db, listener
):
    mail = listener()
    env["SMTP_PORT"] = str(mail.port)

    result = run(env, "--dry-run", fake=fake_db())

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "From: ops@example.com"
    assert lines[1] == "To: dba@example.com, Ops Team <ops@example.com>"
    assert lines[2] == (
        "Subject: [oracle_seq_mail] sequence APP.ORDER_SEQ: 12345 "
        f"({env['DB_CONN_STRING']})"
    )
    assert "Value:     12345" in lines
    assert (
        "Meaning:   LAST_NUMBER is a high-water mark: the sequence caches "
        "20 values, so it can be up to 20 ahead of the last value a "
        "session received"
    ) in lines
    time.sleep(0.2)
    assert mail.accepted == []


# ------------------------------------------------------------------- mail


def test_mail_arrives_intact_over_starttls_with_auth(
    env, fake_db, smtp_server, server_context, ca_file
):
    server = starttls_server(smtp_server, server_context)
    env = with_mail_server(env, server, ca_file)
    env["SEQUENCE_NAME"] = '"Séquence_Ω"'

    result = run(env, fake=fake_db(row=["APP", "12345", 0, 1]))

    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        "sent sequence APP.Séquence_Ω = 12345 to 2 recipient(s)\n"
    )
    assert [e["event"] for e in events(result.stderr)] == [
        "config_ok",
        "db_connect",
        "db_read",
        "smtp_connect",
        "mail_sent",
        "sent",
    ]
    sent = events(result.stderr)[-1]
    assert sent["value"] == "12345" and int(sent["duration_ms"]) >= 0

    assert len(server.auth.attempts) == 1
    _, login, tls = server.auth.attempts[0]
    assert login == b"ops@example.com" and tls is not None
    [envelope] = server.recorder.messages
    assert envelope.mail_from == "ops@example.com"
    assert envelope.rcpt_tos == ["dba@example.com", "ops@example.com"]
    message = email.message_from_bytes(
        envelope.original_content, policy=email.policy.default
    )
    assert message["Subject"] == (
        "[oracle_seq_mail] sequence APP.Séquence_Ω: 12345 "
        f"({env['DB_CONN_STRING']})"
    )
    assert message["From"] == "ops@example.com"
    assert message["To"] == "dba@example.com, Ops Team <ops@example.com>"
    assert parsedate_to_datetime(message["Date"]).tzinfo is not None
    assert re.fullmatch(r"<[\w.]+@example\.com>", message["Message-ID"])
    mail_event = events(result.stderr)[-2]
    assert mail_event["message_id"] == message["Message-ID"]
    assert message.get_content_charset() == "utf-8"
    body = message.get_content().replace("\r\n", "\n")
    assert body.startswith("Last ID of the sequence APP.Séquence_Ω: 12345\n\n")
    assert "Value:     12345\n" in body
    assert f"Database:  {env['DB_CONN_STRING']}\n" in body
    assert f"Host:      {socket.gethostname()}\n" in body
    assert "Read at:   20" in body


def test_smtps_delivers_the_mail(
    env, fake_db, smtp_server, server_context, ca_file
):
    # aiosmtpd cannot tell that implicit TLS is TLS: it would hide AUTH.
    server = smtp_server(ssl_context=server_context, auth_require_tls=False)
    env = with_mail_server(env, server, ca_file, security="ssl")

    result = run(env, fake=fake_db())

    assert result.returncode == 0, result.stderr
    assert len(server.recorder.messages) == 1
    assert len(server.auth.attempts) == 1


def test_plain_relay_without_password_works_with_security_none(
    env, fake_db, smtp_server, ca_file
):
    server = smtp_server(auth_require_tls=False)
    env = with_mail_server(env, server, ca_file, security="none")
    del env["EMAIL_PASSWORD_FILE"]

    result = run(env, fake=fake_db())

    assert result.returncode == 0, result.stderr
    assert len(server.recorder.messages) == 1
    assert server.auth.attempts == []


def test_untrusted_certificate_fails_before_any_credential(
    env, fake_db, smtp_server, server_context, tmp_path
):
    server = starttls_server(smtp_server, server_context)
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    env = with_mail_server(env, server, other_ca)

    result = run(env, fake=fake_db())

    assert result.returncode == 4
    assert error_event(result.stderr)["error"] == (
        "TLS certificate of the SMTP server not trusted: unable to get "
        "local issuer certificate (see SMTP_CA_FILE)"
    )
    assert result.stdout == "failed: mail error (exit 4)\n"
    assert server.auth.attempts == [] and server.recorder.messages == []


def test_certificate_for_another_host_name_fails(
    env, fake_db, smtp_server, server_context, ca_file
):
    server = starttls_server(smtp_server, server_context)
    env = with_mail_server(env, server, ca_file)
    env["SMTP_HOST"] = "localhost"

    result = run(env, fake=fake_db())

    assert result.returncode == 4
    assert error_event(result.stderr)["error"] == (
        "TLS certificate of the SMTP server not trusted: Hostname "
        "mismatch, certificate is not valid for 'localhost'. "
        "(see SMTP_CA_FILE)"
    )
    assert server.auth.attempts == []


def test_server_without_starttls_fails_before_any_credential_is_sent(
    env, fake_db, smtp_server, ca_file
):
    server = smtp_server(auth_require_tls=False)
    env = with_mail_server(env, server, ca_file)

    result = run(env, fake=fake_db())

    assert result.returncode == 4
    assert error_event(result.stderr)["error"] == (
        "the SMTP server does not offer STARTTLS; refusing to continue "
        "without TLS (nothing was sent)"
    )
    assert server.auth.attempts == []
    assert server.recorder.mail_commands == 0


def test_transient_4xx_is_retried_with_backoff(
    env, fake_db, smtp_server, server_context, ca_file
):
    server = starttls_server(
        smtp_server, server_context, handler=RecordingHandler(2)
    )
    env = with_mail_server(env, server, ca_file)

    result = run(env, fake=fake_db())

    assert result.returncode == 0, result.stderr
    retries = [e for e in events(result.stderr) if e["event"] == "retry"]
    assert [(e["phase"], e["delay_s"]) for e in retries] == [
        ("mail", "0.5"),
        ("mail", "1.0"),
    ]
    assert retries[0]["error"] == "451 4.3.0 Try again later"
    assert server.recorder.data_attempts == 3
    assert len(server.recorder.messages) == 1


def test_transient_4xx_gives_up_at_the_smtp_deadline(
    env, fake_db, smtp_server, server_context, ca_file
):
    server = starttls_server(
        smtp_server, server_context, handler=RecordingHandler(99)
    )
    env = with_mail_server(env, server, ca_file)
    # 4 attempts need 0.5 + 1 + 2 s of backoff: more than the deadline.
    env["SMTP_TIMEOUT"] = "2"

    result = run(env, fake=fake_db())

    assert result.returncode == 4
    assert error_event(result.stderr)["error"] == (
        "SMTP server answered 451 4.3.0 Try again later"
    )
    assert 2 <= server.recorder.data_attempts <= 3
    assert server.recorder.messages == []


def test_authentication_failure_is_not_retried(
    env, fake_db, smtp_server, server_context, ca_file
):
    server = starttls_server(
        smtp_server,
        server_context,
        authenticator=Authenticator("ops@example.com", "another password"),
    )
    env = with_mail_server(env, server, ca_file)

    result = run(env, fake=fake_db())

    assert result.returncode == 4
    assert error_event(result.stderr)["error"] == (
        "SMTP authentication failed (535 5.7.8 Authentication credentials "
        "invalid); not retried"
    )
    assert len(server.auth.attempts) == 1
    assert server.recorder.messages == []


# ---------------------------------------------------------------- metrics


def metrics(directory):
    text = (directory / "oracle_seq_mail.prom").read_text()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return text, samples


def test_metrics_file_keeps_the_last_success_after_a_failure(
    env, fake_db, smtp_server, server_context, ca_file, tmp_path
):
    require("promtool")  # before the runs: a missing tool fails first
    textfiles = tmp_path / "textfiles"
    textfiles.mkdir()
    server = starttls_server(smtp_server, server_context)
    env = with_mail_server(env, server, ca_file)
    env["METRICS_TEXTFILE_DIR"] = str(textfiles)

    before = time.time()
    assert run(env, fake=fake_db()).returncode == 0
    text, first = metrics(textfiles)
    success = first["oracle_seq_mail_last_success_timestamp_seconds"]
    assert first["oracle_seq_mail_last_exit_code"] == 0
    assert success >= before
    assert first["oracle_seq_mail_last_value"] == 12345
    assert first['oracle_seq_mail_timeout_seconds{phase="db"}'] == 2
    assert first['oracle_seq_mail_timeout_seconds{phase="mail"}'] == 5
    for phase in ("db", "mail", "total"):
        assert first[f'oracle_seq_mail_duration_seconds{{phase="{phase}"}}']
    assert_promtool_accepts_metrics(text)

    failed = run(env, fake=fake_db(connect_errors=["ORA-01017: denied"]))
    assert failed.returncode == 3
    _, second = metrics(textfiles)
    assert second["oracle_seq_mail_last_exit_code"] == 3
    assert second["oracle_seq_mail_last_success_timestamp_seconds"] == success
    assert (
        second["oracle_seq_mail_last_run_timestamp_seconds"]
        > (first["oracle_seq_mail_last_run_timestamp_seconds"])
    )
    assert "oracle_seq_mail_last_value" not in second

    env["DB_TIMEOUT"] = "never"
    assert run(env).returncode == 2
    _, third = metrics(textfiles)
    assert third["oracle_seq_mail_last_exit_code"] == 2
    assert third["oracle_seq_mail_last_success_timestamp_seconds"] == success
    assert sorted(p.name for p in textfiles.iterdir()) == [
        "oracle_seq_mail.prom"
    ]


# ------------------------------------------------------------------ leaks


def secret_forms():
    forms = []
    for secret in SECRETS:
        forms.append(secret)
        forms.append(base64.b64encode(secret.encode()).decode())
    plain = f"\0ops@example.com\0{MAIL_SECRET}".encode()
    forms.append(base64.b64encode(plain).decode())
    return forms


def assert_no_secret(*texts):
    for text in texts:
        for form in secret_forms():
            assert form not in text


def test_no_failure_path_leaks_a_secret(
    env, fake_db, smtp_server, server_context, ca_file, listener, tmp_path
):
    """Every way this can fail, with -v, through the secrets in env too."""
    env["DB_TIMEOUT"] = "1"
    direct = {**env, "DB_PASSWORD": DB_SECRET, "EMAIL_PASSWORD": MAIL_SECRET}
    del direct["DB_PASSWORD_FILE"], direct["EMAIL_PASSWORD_FILE"]
    good = starttls_server(smtp_server, server_context)
    bad_auth = starttls_server(
        smtp_server,
        server_context,
        authenticator=Authenticator("ops@example.com", "other"),
    )
    plain = smtp_server(auth_require_tls=False)
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    garbage = listener("garbage")
    echo = (
        f"DPY-4018: cannot parse connect string "
        f'"scott/{DB_SECRET}@dbhost/ORCL" password={DB_SECRET}'
    )
    cases = [
        ("config", {"SMTP_SECURITY": "none"}, None, 2),
        ("dsn", {"DB_CONN_STRING": f"scott/{DB_SECRET}@h/s"}, None, 2),
        (
            "both",
            {"DB_PASSWORD": DB_SECRET, "DB_PASSWORD_FILE": "/x"},
            None,
            2,
        ),
        ("refused", {}, None, 3),
        (
            "garbage",
            {"DB_CONN_STRING": f"127.0.0.1:{garbage.port}/S"},
            None,
            3,
        ),
        ("echo", {}, fake_db(connect_errors=[echo]), 3),
        ("select", {}, fake_db(execute_error=echo), 3),
        ("ca", with_mail_server({}, good, other_ca), fake_db(), 4),
        ("auth", with_mail_server({}, bad_auth, ca_file), fake_db(), 4),
        ("plain", with_mail_server({}, plain, ca_file), fake_db(), 4),
        ("sent", with_mail_server({}, good, ca_file), fake_db(), 0),
    ]
    # -v prints everything the quiet run does, plus tracebacks.
    for name, changes, fake, expected in cases:
        for base, verbose in ((env, ()), (direct, ("-v",))):
            result = run({**base, **changes}, *verbose, fake=fake)
            assert result.returncode == expected, (name, result.stderr)
            assert_no_secret(result.stdout, result.stderr)
    for envelope in good.recorder.messages:
        assert_no_secret(envelope.original_content.decode("utf-8"))
    assert len(good.recorder.messages) == 2


def test_verbose_traceback_of_a_driver_error_is_scrubbed(env, fake_db):
    echo = f'DPY-4018: cannot parse connect string "scott/{DB_SECRET}@h/s"'

    result = run(env, "-v", fake=fake_db(connect_errors=[echo]))

    assert result.returncode == 3
    assert "Traceback (most recent call last)" in result.stderr
    assert (
        "oracledb.exceptions.DatabaseError: DPY-4018: cannot parse "
        'connect string "scott/***@h/s"'
    ) in result.stderr
    assert_no_secret(result.stdout, result.stderr)


# ------------------------------------------------------------------ units


def test_service_unit_is_hardened_to_exposure_2_or_lower():
    assert unit_exposure(SERVICE) <= 2.0


def test_units_pass_systemd_analyze_verify():
    analyze = require("systemd-analyze")
    result = subprocess.run(
        [analyze, "verify", str(SERVICE), str(TIMER)],
        capture_output=True,
        text=True,
        check=False,
    )
    findings = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if line.strip()
    ]
    assert findings == [
        "oracle_seq_mail.service: Command /usr/local/bin/oracle_seq_mail.py"
        " is not executable: No such file or directory"
    ]


def test_service_takes_secrets_as_credentials_not_environment():
    text = SERVICE.read_text()
    assert "LoadCredential=DB_PASSWORD:/etc/oracle_seq_mail/db_password" in (
        text
    )
    assert (
        "LoadCredential=EMAIL_PASSWORD:/etc/oracle_seq_mail/email_password"
        in text
    )
    assert "PASSWORD=" not in text.replace("LoadCredential=", "")
    assert "Type=oneshot" in text


# --------------------------------------------------- under a real systemd

SITE_PACKAGES = "/usr/local/lib/python3.11/dist-packages"
TEXTFILES = "/var/lib/prometheus/node-exporter"


class OracleSystemdBox(SystemdContainer):
    """The shared systemd container, named after this module."""

    label = "oracle-seq-mail-systemd-test"
    command_timeout = 180


@pytest.fixture
def systemd_box(systemd_image):
    with booted(OracleSystemdBox(require_docker(), systemd_image)) as box:
        yield box


FAKE_SETTINGS_FROM_ENV = 'json.loads(os.environ["FAKE_ORACLE"])'


def fake_oracle_program(script, settings=FAKE_SETTINGS_FROM_ENV):
    """A stand-alone program: FakeOracle in place, then `script` as main.

    Built from this module's source so that a run does not import the
    test module (pytest, trustme, aiosmtpd): only what the tool needs.
    `settings` is a Python expression for FakeOracle's settings.
    """
    sources = "\n\n".join(
        inspect.getsource(item)
        for item in (FakeOracle, FakeConnection, FakeCursor, calls)
    )
    return (
        "#!/usr/bin/python3\n"
        "import json, os, runpy\n"
        "from pathlib import Path\n"
        "import oracledb\n\n"
        f"{sources}\n\n"
        f"oracledb.connect = FakeOracle({settings}).connect\n"
        f"runpy.run_path({str(script)!r}, run_name='__main__')\n"
    )


def install_as_documented(box, ca_file, smtp_host, smtp_port):
    """The README's steps, with the venv's oracledb."""
    package = Path(oracledb.__file__).parent
    box.copy_in(package, f"{SITE_PACKAGES}/oracledb")
    box.copy_in(
        Path(sys.modules["typing_extensions"].__file__),
        f"{SITE_PACKAGES}/typing_extensions.py",
    )
    script = SCRIPT.read_text().split("\n", 1)[1]
    box.install(
        "/usr/local/bin/oracle_seq_mail.py",
        "#!/usr/bin/python3\n" + script,
        mode="0755",
    )
    box.sh("install -d -m 700 /etc/oracle_seq_mail")
    box.install("/etc/oracle_seq_mail/db_password", DB_SECRET, mode="0600")
    box.install(
        "/etc/oracle_seq_mail/email_password", MAIL_SECRET, mode="0600"
    )
    box.install("/etc/ssl/oracle_seq_mail-ca.pem", Path(ca_file).read_text())
    box.install(
        "/etc/oracle_seq_mail/oracle_seq_mail.env",
        "\n".join(
            [
                "DB_USER=scott",
                "DB_CONN_STRING=127.0.0.1:1/ORCLPDB1",
                "SEQUENCE_OWNER=APP",
                "SEQUENCE_NAME=ORDER_SEQ",
                "DB_TIMEOUT=3",
                f"SMTP_HOST={smtp_host}",
                f"SMTP_PORT={smtp_port}",
                "SMTP_CA_FILE=/etc/ssl/oracle_seq_mail-ca.pem",
                "SMTP_TIMEOUT=20",
                "EMAIL_USER=ops@example.com",
                "EMAIL_TO=dba@example.com",
                f"METRICS_TEXTFILE_DIR={TEXTFILES}",
                "",
            ]
        ),
        mode="0600",
    )
    box.sh(
        f"groupadd --system prometheus && install -d -m 2775 -g prometheus "
        f"{TEXTFILES}"
    )
    box.install(
        "/etc/systemd/system/oracle_seq_mail.service.d/metrics.conf",
        "[Service]\nSupplementaryGroups=prometheus\n",
    )
    if not credentials_reach_the_service(box):
        pass_secrets_as_files(box)
    box.copy_in(SERVICE, "/etc/systemd/system/oracle_seq_mail.service")
    box.copy_in(TIMER, "/etc/systemd/system/oracle_seq_mail.timer")
    box.sh("systemctl daemon-reload")


def credentials_reach_the_service(box):
    """Whether this container's systemd can hand credentials to a user.

    It needs to mount a private file system for them; where it cannot
    (unprivileged Docker here) the directory stays root-only.
    """
    probe = box.sh(
        "systemd-run --quiet --wait --pipe -p DynamicUser=yes "
        "-p LoadCredential=probe:/etc/hostname "
        """/bin/sh -c 'cat "$CREDENTIALS_DIRECTORY/probe"' """
        "&& echo readable",
        check=False,
    )
    return probe.endswith("readable")


def pass_secrets_as_files(box):
    """Fallback drop-in: the same secrets through DB_PASSWORD_FILE etc."""
    box.sh("install -d -m 755 /etc/oracle_seq_mail-test")
    box.install("/etc/oracle_seq_mail-test/db_password", DB_SECRET)
    box.install("/etc/oracle_seq_mail-test/email_password", MAIL_SECRET)
    box.install(
        "/etc/systemd/system/oracle_seq_mail.service.d/no-credentials.conf",
        "[Service]\nLoadCredential=\n"
        "Environment=DB_PASSWORD_FILE=/etc/oracle_seq_mail-test/db_password\n"
        "Environment=EMAIL_PASSWORD_FILE="
        "/etc/oracle_seq_mail-test/email_password\n",
    )


def unit_run(box):
    """Start the oneshot unit, wait for it; (exit status, its journal).

    The journal is read from a cursor taken before the start, until the
    run's result line is in: journald may lag behind the unit's end.
    """
    cursor = box.sh(
        "journalctl --show-cursor -n 0 -q | sed 's/^-- cursor: //'"
    )
    box.sh("systemctl start oracle_seq_mail.service", check=False)
    status = box.sh(
        "systemctl show -p ExecMainStatus --value oracle_seq_mail.service"
    )
    query = (
        "journalctl --no-pager -o cat -u oracle_seq_mail.service "
        f"--after-cursor='{cursor}'"
    )
    give_up = time.monotonic() + 30
    journal = box.sh(query)
    while not re.search(r"event=(sent|error) ", journal):
        assert time.monotonic() < give_up, f"no result line in {journal}"
        time.sleep(0.3)
        journal = box.sh(query)
    return int(status), journal


@pytest.mark.docker
@pytest.mark.systemd
def test_hardened_unit_reads_credentials_and_mails_under_systemd(
    systemd_box, ca, tmp_path
):
    box = systemd_box
    gateway = box.gateway()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(gateway).configure_cert(context)
    handler = RecordingHandler()
    authenticator = Authenticator("ops@example.com", MAIL_SECRET)
    server = PortZeroController(
        handler,
        address=gateway,
        authenticator=authenticator,
        tls_context=context,
        require_starttls=True,
        auth_require_tls=True,
    )
    server.start()
    try:
        ca_file = tmp_path / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        install_as_documented(box, ca_file, gateway, server.port)

        status, journal = unit_run(box)
        assert status == 3, journal
        assert "event=error phase=db exit_code=3" in journal
        assert "Connection refused" in journal
        metrics_text = box.sh(f"cat {TEXTFILES}/oracle_seq_mail.prom")
        assert "oracle_seq_mail_last_exit_code 3.0" in metrics_text

        box.install(
            "/usr/local/bin/oracle_seq_mail_fake.py",
            fake_oracle_program(
                "/usr/local/bin/oracle_seq_mail.py",
                repr(
                    {"log": "/tmp/calls.jsonl", "row": ["APP", "4321", 0, 1]}
                ),
            ),
            mode="0755",
        )
        box.install(
            "/etc/systemd/system/oracle_seq_mail.service.d/fake.conf",
            "[Service]\nExecStart=\n"
            "ExecStart=/usr/local/bin/oracle_seq_mail_fake.py\n",
        )
        box.sh("systemctl daemon-reload")
        status, journal = unit_run(box)
        assert status == 0, journal
        assert "event=sent" in journal and "value=4321" in journal
        metrics_text = box.sh(f"cat {TEXTFILES}/oracle_seq_mail.prom")
        assert "oracle_seq_mail_last_exit_code 0.0" in metrics_text
        assert "oracle_seq_mail_last_success_timestamp_seconds" in (
            metrics_text
        )
        [envelope] = handler.messages
        assert b"4321" in envelope.original_content
        assert [login for _, login, _ in authenticator.attempts] == [
            b"ops@example.com"
        ]

        box.sh("systemctl enable --now oracle_seq_mail.timer")
        assert box.sh(
            "systemctl show -p NextElapseUSecRealtime --value "
            "oracle_seq_mail.timer"
        )
        everything = box.sh("journalctl --no-pager -o cat")
        everything += box.sh("systemctl show oracle_seq_mail.service")
        assert_no_secret(everything)
    finally:
        server.stop()
