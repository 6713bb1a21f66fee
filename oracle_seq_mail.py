#!/usr/bin/env python3
"""Read the last ID of an Oracle control sequence or table and mail it.

Usage (put secrets in files, never on the command line):

    export DB_USER=app_ro DB_CONN_STRING=dbhost:1521/ORCLPDB1
    export DB_PASSWORD_FILE=/etc/oracle_seq_mail/db_password
    export SEQUENCE_OWNER=APP SEQUENCE_NAME=ORDER_SEQ
    export SMTP_HOST=smtp.example.com EMAIL_USER=ops@example.com
    export EMAIL_PASSWORD_FILE=/etc/oracle_seq_mail/email_password
    export EMAIL_TO=ops@example.com,dba@example.com
    python3 oracle_seq_mail.py --check    # configuration only, no network
    python3 oracle_seq_mail.py --dry-run  # read Oracle, print the mail
    python3 oracle_seq_mail.py            # read Oracle, send the mail

What "last ID" means:
  sequence mode  LAST_NUMBER of the sequence in ALL_SEQUENCES. When the
                 sequence caches values (CACHE n) this is a high-water
                 mark: up to n * INCREMENT_BY ahead of the last value a
                 session received. With NOCACHE it is the next value to
                 be handed out. NEXTVAL is never called: it would consume
                 a value. The mail says which case applies.
  table mode     MAX(CONTROL_COLUMN) over CONTROL_TABLE, as TO_CHAR
                 prints it (dates follow the session's NLS format).

Environment (secrets marked *; each secret X may instead be read from
the file named by X_FILE or from $CREDENTIALS_DIRECTORY/X):
  DB_USER             database user (required)
  DB_PASSWORD *       database password (required)
  DB_CONN_STRING      Easy Connect host:port/service, or a TNS alias
                      resolved through TNS_ADMIN/tnsnames.ora (required);
                      user/password@ inside it is refused
  TNS_ADMIN           directory of tnsnames.ora, for aliases
  SEQUENCE_NAME       sequence to read ([OWNER.]NAME), or else:
  SEQUENCE_OWNER      owner of the sequence (default: the connected user)
  CONTROL_TABLE       table to read ([OWNER.]NAME) with
  CONTROL_COLUMN      the column whose maximum is the last ID
  DB_TIMEOUT          seconds for the whole database step (default 30)
  SMTP_HOST           mail server (required)
  SMTP_PORT           default 587, or 465 when SMTP_SECURITY=ssl
  SMTP_SECURITY       starttls (default), ssl, or none (no password)
  SMTP_CA_FILE        extra PEM CA bundle, trusted with the system's
  SMTP_TIMEOUT        seconds for the whole mail step (default 30)
  EMAIL_USER          SMTP login; without EMAIL_PASSWORD no AUTH is sent
  EMAIL_PASSWORD *    SMTP password
  EMAIL_FROM          sender address (default EMAIL_USER)
  EMAIL_TO            comma-separated recipients (required)
  METRICS_TEXTFILE_DIR  if set, oracle_seq_mail.prom is written there
                      for node_exporter's textfile collector
Identifiers follow Oracle's rules: unquoted names (letter first, then
letters, digits, _ $ #) are upper-cased; "Quoted" names are kept as is.

Exit codes:
  0  mail sent (or --check / --dry-run succeeded)
  1  internal error (a bug; the log says where)
  2  configuration or usage error (the message names the variable)
  3  database error (unreachable, deadline, login, missing object)
  4  mail error (TLS, authentication, refused, deadline)

Output: one key=value line per step on stderr, one result line on
stdout. Secrets never appear in either, nor in the mail.

Limitations:
  - A database connect that hangs is abandoned, not cancelled: its
    thread is left behind and ends with the process.
  - Secrets passed as environment variables are visible in
    /proc/PID/environ to the same user and root; prefer X_FILE or
    systemd credentials.
  - Delivery is at least once: a connection lost after the server
    accepted the message but before it answered is retried.
  - Only Easy Connect strings and TNS aliases are checked by
    --check; whether the service exists is known only on connect.
"""

import argparse
import dataclasses
import logging
import math
import os
import re
import smtplib
import socket
import ssl
import stat
import sys
import tempfile
import threading
import time
from datetime import datetime
from email.message import EmailMessage
from email.utils import formatdate, make_msgid, parseaddr
from pathlib import Path

import oracledb

EXIT_SENT = 0
EXIT_INTERNAL = 1
EXIT_CONFIG = 2
EXIT_DATABASE = 3
EXIT_MAIL = 4

TOOL = "oracle_seq_mail"
METRICS_FILE = "oracle_seq_mail.prom"
SECRET_NAMES = ("DB_PASSWORD", "EMAIL_PASSWORD")
MASK = "***"

log = logging.getLogger(TOOL)


class RunError(Exception):
    """A failure whose message is safe to print; ends the run."""

    exit_code = EXIT_INTERNAL
    phase = "run"


class ConfigError(RunError):
    exit_code = EXIT_CONFIG
    phase = "config"


class DatabaseFailure(RunError):
    exit_code = EXIT_DATABASE
    phase = "db"


class MailFailure(RunError):
    exit_code = EXIT_MAIL
    phase = "mail"


class TransientError(Exception):
    """Wraps a failure that a retry may cure (refused, reset, 4xx)."""


# ---------------------------------------------------------------- output


CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
EMBEDDED_CREDENTIALS = re.compile(r"([^\s/@()\"'=]+)/[^\s@]*@")


def escape_controls(text):
    """Make `text` one printable line: control characters become \\xNN."""
    return CONTROL_CHARACTERS.sub(lambda m: f"\\x{ord(m[0]):02x}", text)


def one_line(text):
    """Join a multi-line message (oracledb's have several) into one.

    The driver's "Help: <url>" lines are dropped: they are noise in a log.
    """
    lines = str(text).strip().split("\n")
    kept = [line for line in lines if not line.startswith("Help: http")]
    return escape_controls(" ".join(kept))


def redact_dsn(dsn):
    """The connect string with any user/password@ part masked."""
    return EMBEDDED_CREDENTIALS.sub(rf"\1/{MASK}@", dsn)


def log_fields(**fields):
    """Render `fields` as stable key=value pairs, quoted when needed."""
    parts = []
    for key, value in fields.items():
        text = escape_controls(str(value))
        if not text or re.search(r'[\s="\\]', text):
            text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
        parts.append(f"{key}={text}")
    return " ".join(parts)


class Redactor:
    """Masks every known secret in text that is about to leave us.

    Used by the log formatter as the last line of defence: messages are
    built from safe parts, and this catches what slipped through
    (an exception from the driver that echoes a connect string, say).
    """

    def __init__(self):
        self.secrets = []

    def add(self, secret):
        if secret and secret not in self.secrets:
            self.secrets.append(secret)
            self.secrets.sort(key=len, reverse=True)

    def scrub(self, text):
        for secret in self.secrets:
            text = text.replace(secret, MASK)
        return redact_dsn(text)


class RedactingFormatter(logging.Formatter):
    """key=value lines on stderr; tracebacks (with -v) are scrubbed too."""

    def __init__(self, redactor):
        super().__init__("level=%(levelname)s %(message)s")
        self.redactor = redactor

    def format(self, record):
        record.levelname = record.levelname.lower()
        return self.redactor.scrub(super().format(record))


def event(name, level=logging.INFO, exc_info=False, **fields):
    """Log one key=value line (and, with exc_info, a scrubbed traceback)."""
    log.log(level, "%s", log_fields(event=name, **fields), exc_info=exc_info)


# ---------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class Secret:
    """A secret value that will not print itself by accident."""

    value: str = dataclasses.field(repr=False)
    source: str

    def __str__(self):
        return MASK


UNQUOTED_IDENTIFIER = r"[A-Za-z][A-Za-z0-9_$#]*"
QUOTED_IDENTIFIER = r'"[^"\x00]+"'
IDENTIFIER = f"(?:{UNQUOTED_IDENTIFIER}|{QUOTED_IDENTIFIER})"
QUALIFIED_NAME = re.compile(f"({IDENTIFIER})(?:\\.({IDENTIFIER}))?")
MAX_IDENTIFIER_BYTES = 128


def normalize_identifier(text, variable):
    """Oracle's name for `text`: unquoted upper-cased, quotes removed."""
    name = text[1:-1] if text.startswith('"') else text.upper()
    if len(name.encode("utf-8")) > MAX_IDENTIFIER_BYTES:
        raise ConfigError(
            f"{variable}: an identifier is longer than "
            f"{MAX_IDENTIFIER_BYTES} bytes"
        )
    return name


def parse_name(text, variable, qualified):
    """Split `[OWNER.]NAME` into (owner or None, name), both normalized."""
    match = QUALIFIED_NAME.fullmatch(text.strip())
    if not match or (match[2] and not qualified):
        shape = "[OWNER.]NAME" if qualified else "NAME"
        raise ConfigError(
            f"{variable}: not a valid Oracle identifier ({shape}; unquoted"
            ' names are letters, digits, _ $ #; or "Quoted")'
        )
    if match[2]:
        return (
            normalize_identifier(match[1], variable),
            normalize_identifier(match[2], variable),
        )
    return None, normalize_identifier(match[1], variable)


def quote_identifier(name):
    """SQL text for a validated identifier: always double-quoted."""
    if '"' in name or "\x00" in name:
        raise ValueError("identifier was not validated")
    return f'"{name}"'


def display_name(owner, name):
    return f"{owner}.{name}" if owner else name


@dataclasses.dataclass(frozen=True)
class Target:
    """What to read: a sequence, or the maximum of a table column."""

    mode: str
    owner: str | None
    name: str
    column: str | None = None

    @property
    def label(self):
        if self.mode == "sequence":
            return f"sequence {display_name(self.owner, self.name)}"
        table = display_name(self.owner, self.name)
        return f"table {table}, column {self.column}"


@dataclasses.dataclass(frozen=True)
class Config:
    db_user: str
    db_password: Secret
    dsn: str
    db_service: str
    target: Target
    db_timeout: float
    smtp_host: str
    smtp_port: int
    smtp_security: str
    smtp_ca_file: str | None
    smtp_timeout: float
    email_user: str | None
    email_password: Secret | None
    email_from: str
    email_to: tuple
    email_to_header: str
    metrics_dir: Path | None


class Settings:
    """Reads variables from an environment mapping, naming any bad one."""

    def __init__(self, environ, redactor):
        self.environ = environ
        self.redactor = redactor

    def get(self, name, default=None):
        value = self.environ.get(name, "").strip()
        return value or default

    def require(self, name):
        value = self.get(name)
        if value is None:
            raise ConfigError(f"{name} is required but not set")
        return value

    def seconds(self, name, default):
        text = self.get(name)
        if text is None:
            return default
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (0 < value <= 86400):
            raise ConfigError(f"{name}: must be seconds, > 0 and <= 86400")
        return value

    def port(self, name, default):
        text = self.get(name)
        if text is None:
            return default
        if not text.isdigit() or not 0 < int(text) < 65536:
            raise ConfigError(f"{name}: must be a port number 1-65535")
        return int(text)

    def secret(self, name, required):
        """The secret `name` from the environment, X_FILE or credentials.

        Setting both X and X_FILE is an error; the systemd credential is
        used only when neither is set.
        """
        file_variable = f"{name}_FILE"
        direct = self.environ.get(name, "")
        path = self.get(file_variable)
        if direct and path:
            raise ConfigError(f"set only one of {name} and {file_variable}")
        if direct:
            self.redactor.add(direct)
            return Secret(direct, name)
        credentials = self.get("CREDENTIALS_DIRECTORY")
        if path is None and credentials:
            candidate = Path(credentials, name)
            if not is_missing(candidate):
                return self.secret_file(candidate, f"credential {name}")
        if path is not None:
            return self.secret_file(Path(path), file_variable)
        if required:
            raise ConfigError(
                f"{name} is required (or {file_variable}, or a systemd "
                "credential of that name)"
            )
        return None

    def secret_file(self, path, source):
        try:
            mode = path.stat().st_mode
            raw = path.read_text(encoding="utf-8")
        except (OSError, UnicodeError) as error:
            reason = getattr(error, "strerror", None) or "not UTF-8 text"
            raise ConfigError(
                f"{source}: cannot read the file ({reason})"
            ) from None
        if mode & (stat.S_IRGRP | stat.S_IROTH):
            event(
                "secret_file_permissions",
                logging.WARNING,
                source=source,
                mode=f"{stat.S_IMODE(mode):04o}",
                advice="chmod 600 (readable by group or others)",
            )
        value = raw.removesuffix("\n").removesuffix("\r")
        if not value:
            raise ConfigError(f"{source}: the file is empty")
        self.redactor.add(value)
        return Secret(value, source)


def is_missing(path):
    """True only if `path` does not exist (unreadable is not missing)."""
    try:
        path.lstat()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return False


def parse_dsn(dsn):
    """A printable 'service' for the mail, or ConfigError (offline)."""
    if EMBEDDED_CREDENTIALS.match(dsn):
        raise ConfigError(
            "DB_CONN_STRING: holds a user/password before @; set DB_USER "
            "and DB_PASSWORD instead"
        )
    params = oracledb.ConnectParams()
    try:
        params.parse_connect_string(dsn)
    except (oracledb.Error, OSError) as error:
        code = error_codes(error)
        hint = {
            "DPY-4026": "TNS_ADMIN has no readable tnsnames.ora",
            "DPY-4027": "an alias needs TNS_ADMIN",
            "DPY-4000": "alias not found in tnsnames.ora",
        }.get(code[0] if code else "", "cannot be parsed")
        suffix = f" ({', '.join(code)})" if code else ""
        raise ConfigError(f"DB_CONN_STRING: {hint}{suffix}") from None
    if dsn.startswith("("):
        return f"{params.host}:{params.port}/{params.service_name or ''}"
    if "/" not in dsn and ":" not in dsn:
        return f"{dsn} ({params.host}:{params.port}/{params.service_name})"
    return dsn


def parse_target(settings):
    sequence = settings.get("SEQUENCE_NAME")
    owner = settings.get("SEQUENCE_OWNER")
    table = settings.get("CONTROL_TABLE")
    column = settings.get("CONTROL_COLUMN")
    if sequence and (table or column):
        raise ConfigError(
            "set SEQUENCE_NAME or CONTROL_TABLE/CONTROL_COLUMN, not both"
        )
    if sequence:
        seq_owner, name = parse_name(sequence, "SEQUENCE_NAME", True)
        if owner:
            if seq_owner:
                raise ConfigError(
                    "SEQUENCE_OWNER: also given inside SEQUENCE_NAME"
                )
            seq_owner = parse_name(owner, "SEQUENCE_OWNER", False)[1]
        return Target("sequence", seq_owner, name)
    if owner:
        raise ConfigError("SEQUENCE_OWNER: set without SEQUENCE_NAME")
    if not table and not column:
        raise ConfigError(
            "SEQUENCE_NAME or CONTROL_TABLE + CONTROL_COLUMN is required"
        )
    if not table:
        raise ConfigError("CONTROL_TABLE is required with CONTROL_COLUMN")
    if not column:
        raise ConfigError("CONTROL_COLUMN is required with CONTROL_TABLE")
    table_owner, table_name = parse_name(table, "CONTROL_TABLE", True)
    column_name = parse_name(column, "CONTROL_COLUMN", False)[1]
    return Target("table", table_owner, table_name, column_name)


def parse_address(text, variable):
    if CONTROL_CHARACTERS.search(text):
        raise ConfigError(f"{variable}: contains control characters")
    _, address = parseaddr(text)
    local, at, domain = address.rpartition("@")
    if not (at and local and ("." in domain or domain == "localhost")):
        raise ConfigError(f"{variable}: not an e-mail address")
    return address


def parse_recipients(settings):
    """(envelope addresses, To header) from EMAIL_TO."""
    text = settings.require("EMAIL_TO")
    recipients = [part.strip() for part in text.split(",")]
    if not all(recipients):
        raise ConfigError("EMAIL_TO: has an empty entry")
    addresses = tuple(parse_address(part, "EMAIL_TO") for part in recipients)
    return addresses, ", ".join(recipients)


def load_config(environ, redactor):
    """Validate every variable without touching the network."""
    settings = Settings(environ, redactor)
    db_password = settings.secret("DB_PASSWORD", required=True)
    email_password = settings.secret("EMAIL_PASSWORD", required=False)

    db_user = settings.require("DB_USER")
    dsn = settings.require("DB_CONN_STRING")
    db_service = parse_dsn(dsn)
    target = parse_target(settings)
    db_timeout = settings.seconds("DB_TIMEOUT", 30.0)

    smtp_host = settings.require("SMTP_HOST")
    security = settings.get("SMTP_SECURITY", "starttls").lower()
    if security not in ("starttls", "ssl", "none"):
        raise ConfigError("SMTP_SECURITY: must be starttls, ssl or none")
    default_port = 465 if security == "ssl" else 587
    smtp_port = settings.port("SMTP_PORT", default_port)
    smtp_timeout = settings.seconds("SMTP_TIMEOUT", 30.0)
    ca_file = settings.get("SMTP_CA_FILE")
    if ca_file:
        tls_context(ca_file)

    email_user = settings.get("EMAIL_USER")
    if email_password and security == "none":
        raise ConfigError(
            "EMAIL_PASSWORD: refusing to send a password without TLS "
            "(SMTP_SECURITY=none)"
        )
    if email_password and not email_user:
        raise ConfigError("EMAIL_USER is required with EMAIL_PASSWORD")
    sender = settings.get("EMAIL_FROM")
    if sender:
        email_from = parse_address(sender, "EMAIL_FROM")
    elif email_user and "@" in email_user:
        email_from = parse_address(email_user, "EMAIL_USER")
    else:
        raise ConfigError("EMAIL_FROM is required (EMAIL_USER is no address)")
    email_to, email_to_header = parse_recipients(settings)

    metrics = settings.get("METRICS_TEXTFILE_DIR")
    metrics_dir = Path(metrics) if metrics else None
    if metrics_dir and not (
        metrics_dir.is_dir() and os.access(metrics_dir, os.W_OK | os.X_OK)
    ):
        raise ConfigError("METRICS_TEXTFILE_DIR: not a writable directory")

    return Config(
        db_user=db_user,
        db_password=db_password,
        dsn=dsn,
        db_service=db_service,
        target=target,
        db_timeout=db_timeout,
        smtp_host=smtp_host,
        smtp_port=smtp_port,
        smtp_security=security,
        smtp_ca_file=ca_file,
        smtp_timeout=smtp_timeout,
        email_user=email_user,
        email_password=email_password,
        email_from=email_from,
        email_to=email_to,
        email_to_header=email_to_header,
        metrics_dir=metrics_dir,
    )


def tls_context(ca_file):
    """System trust store plus `ca_file`; certificate and name checked."""
    context = ssl.create_default_context()
    if ca_file:
        try:
            context.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as error:
            reason = getattr(error, "strerror", None) or "not a PEM bundle"
            raise ConfigError(
                f"SMTP_CA_FILE: cannot load ({reason})"
            ) from None
    return context


# -------------------------------------------------------------- deadlines


class Deadline:
    """A point in monotonic time that a phase must finish by."""

    def __init__(self, seconds):
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def remaining(self):
        return max(0.0, self.end - time.monotonic())


class RetryPolicy:
    """Backoff between attempts; no sleep may cross the deadline."""

    attempts = 4
    first_delay = 0.5
    factor = 2.0

    def run(self, phase, attempt_once, deadline):
        delay = self.first_delay
        for attempt in range(1, self.attempts + 1):
            try:
                return attempt_once(attempt)
            except TransientError as error:
                last = error
                if attempt == self.attempts:
                    break
                if deadline.remaining() <= delay:
                    break
                event(
                    "retry",
                    logging.WARNING,
                    phase=phase,
                    attempt=attempt,
                    delay_s=delay,
                    error=one_line(error),
                )
                time.sleep(delay)
                delay *= self.factor
        raise last.__cause__ or last


def call_with_deadline(function, deadline, description):
    """Run `function` in a daemon thread; give up when `deadline` passes.

    A blocked driver call cannot be interrupted from outside, so the
    thread is abandoned; being a daemon it dies with the process.
    """
    outcome = {}

    def target():
        try:
            outcome["value"] = function()
        except BaseException as error:
            outcome["error"] = error

    worker = threading.Thread(target=target, name=description, daemon=True)
    worker.start()
    worker.join(deadline.remaining() + GRACE_SECONDS)
    if worker.is_alive():
        raise TimeoutError(description)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


# Inner socket timeouts end most phases on their own; this lets them.
GRACE_SECONDS = 0.25


# --------------------------------------------------------------- database


SEQUENCE_SQL = (
    "SELECT sequence_owner, TO_CHAR(last_number), cache_size, increment_by"
    " FROM all_sequences"
    " WHERE sequence_owner = NVL(:owner, USER)"
    " AND sequence_name = :name"
)


def table_sql(target):
    table = quote_identifier(target.name)
    if target.owner:
        table = f"{quote_identifier(target.owner)}.{table}"
    column = quote_identifier(target.column)
    # Identifiers cannot be bind variables; these are validated and quoted.
    return f"SELECT TO_CHAR(MAX({column})) FROM {table}"  # noqa: S608


ERROR_CODE = re.compile(r"\b(?:DPY|ORA|TNS)-\d{4,5}\b")

# Worth another attempt: the listener or instance may be back shortly.
TRANSIENT_DB_CODES = {
    "DPY-4011",
    "DPY-6005",
    "ORA-01033",
    "ORA-01034",
    "ORA-03113",
    "ORA-03114",
    "ORA-03135",
    "ORA-12514",
    "ORA-12516",
    "ORA-12519",
    "ORA-12520",
    "ORA-12528",
    "ORA-12537",
    "ORA-12541",
}
DB_HINTS = {
    "ORA-01017": "login refused: check DB_USER and DB_PASSWORD",
    "ORA-28000": "the database account is locked",
    "ORA-28001": "the database password has expired",
    "ORA-00942": "the table does not exist or DB_USER may not read it",
    "ORA-00904": "CONTROL_COLUMN does not exist in CONTROL_TABLE",
    "ORA-01031": "DB_USER lacks the privilege to read it",
}


def error_codes(error):
    return ERROR_CODE.findall(str(error))


@dataclasses.dataclass(frozen=True)
class Reading:
    """The value read and what it means, for the mail and the log."""

    target: Target
    value: str | None
    meaning: str
    read_at: datetime


class OracleReader:
    """Connects with python-oracledb (thin), runs one SELECT, hangs up.

    `read` is called by `main` in a watchdog thread; every blocking
    step also carries its own timeout from the same deadline.
    """

    retry = RetryPolicy()

    def __init__(self, config):
        self.config = config

    def read(self, deadline):
        connection = self.retry.run(
            "db", lambda attempt: self.connect(attempt, deadline), deadline
        )
        try:
            return self.query(connection, deadline)
        finally:
            self.hang_up(connection)

    def connect(self, attempt, deadline):
        event(
            "db_connect",
            dsn=self.config.db_service,
            user=self.config.db_user,
            attempt=attempt,
            timeout_s=round(deadline.remaining(), 1),
        )
        try:
            return oracledb.connect(
                user=self.config.db_user,
                password=self.config.db_password.value,
                dsn=self.config.dsn,
                tcp_connect_timeout=max(0.1, deadline.remaining()),
                retry_count=0,
            )
        except oracledb.Error as error:
            if set(error_codes(error)) & TRANSIENT_DB_CODES:
                raise TransientError(one_line(error)) from error
            raise
        except (ConnectionRefusedError, ConnectionResetError) as error:
            raise TransientError(one_line(error)) from error

    def query(self, connection, deadline):
        target = self.config.target
        connection.call_timeout = max(1, int(deadline.remaining() * 1000))
        cursor = connection.cursor()
        try:
            if target.mode == "sequence":
                binds = {"owner": target.owner, "name": target.name}
                cursor.execute(SEQUENCE_SQL, binds)
            else:
                cursor.execute(table_sql(target))
            row = cursor.fetchone()
        finally:
            cursor.close()
        read_at = datetime.now().astimezone()
        if target.mode == "sequence":
            return self.sequence_reading(target, row, read_at)
        value = row[0] if row else None
        table = display_name(target.owner, target.name)
        meaning = f"MAX({target.column}) of {table}"
        if value is None:
            meaning += " is NULL: the table has no rows with a value"
        return Reading(target, value, meaning, read_at)

    def sequence_reading(self, target, row, read_at):
        if row is None:
            owner = target.owner or f"{self.config.db_user.upper()} (USER)"
            raise DatabaseFailure(
                f"sequence {display_name(owner, target.name)} not found, "
                "or DB_USER may not see it in ALL_SEQUENCES"
            )
        owner, value, cache_size, increment = row
        resolved = Target("sequence", owner, target.name)
        if cache_size:
            meaning = (
                f"LAST_NUMBER is a high-water mark: the sequence caches "
                f"{cache_size} values, so it can be up to "
                f"{cache_size * increment} ahead of the last value a "
                "session received"
            )
        else:
            meaning = (
                "LAST_NUMBER of a NOCACHE sequence: the next value it "
                "will hand out"
            )
        return Reading(resolved, value, meaning, read_at)

    def hang_up(self, connection):
        """End the (read-only) transaction and the session.

        The value is already read: a failure here is only logged.
        """
        for step in (connection.rollback, connection.close):
            try:
                step()
            except (oracledb.Error, OSError) as error:
                event(
                    "db_hang_up_failed",
                    logging.WARNING,
                    step=step.__name__,
                    error=one_line(error),
                )


def describe_database_failure(error, config):
    """A DatabaseFailure with a safe, specific message for `error`."""
    if isinstance(error, DatabaseFailure):
        return error
    if isinstance(error, TimeoutError):
        return DatabaseFailure(
            f"no answer from {config.db_service} within DB_TIMEOUT="
            f"{config.db_timeout:g}s; gave up (a listener that accepts "
            "but never answers, or a silent network)"
        )
    if isinstance(error, socket.gaierror):
        return DatabaseFailure(
            f"cannot resolve the database host of {config.db_service}: "
            f"{one_line(error.strerror)}"
        )
    codes = error_codes(error)
    hint = next((DB_HINTS[c] for c in codes if c in DB_HINTS), None)
    detail = one_line(error)
    if hint:
        detail = f"{hint} ({detail})"
    return DatabaseFailure(f"database error: {detail}")


# ------------------------------------------------------------------- mail


def build_message(config, reading, hostname):
    target = reading.target
    value = "no value" if reading.value is None else reading.value
    when = reading.read_at.isoformat(timespec="seconds")
    message = EmailMessage()
    message["Subject"] = (
        f"[{TOOL}] {target.label}: {value} ({config.db_service})"
    )
    message["From"] = config.email_from
    message["To"] = config.email_to_header
    message["Date"] = formatdate(localtime=True)
    domain = config.email_from.rpartition("@")[2]
    message["Message-ID"] = make_msgid(domain=domain)
    message.set_content(
        "\n".join(
            [
                f"Last ID of the {target.label}: {value}",
                "",
                f"Object:    {target.label}",
                f"Value:     {value}",
                f"Meaning:   {reading.meaning}",
                f"Database:  {config.db_service}",
                f"Read at:   {when}",
                f"Host:      {hostname}",
                "",
                f"Sent by {TOOL} on {hostname}.",
            ]
        )
        + "\n",
        charset="utf-8",
    )
    return message


AUTH_MECHANISMS = ("CRAM-MD5", "PLAIN", "LOGIN")
TRANSIENT_SOCKET_ERRORS = (
    ConnectionRefusedError,
    ConnectionResetError,
    smtplib.SMTPServerDisconnected,
)


class MailSender:
    """Delivers one message over verified TLS; called by `main`.

    Credentials are sent only after TLS is up. A server that does not
    offer STARTTLS is a failure, never a reason to fall back.
    """

    retry = RetryPolicy()

    def __init__(self, config):
        self.config = config
        self.context = tls_context(config.smtp_ca_file)

    def send(self, message, deadline):
        return self.retry.run(
            "mail",
            lambda attempt: self.attempt(message, attempt, deadline),
            deadline,
        )

    def attempt(self, message, attempt, deadline):
        config = self.config
        event(
            "smtp_connect",
            host=config.smtp_host,
            port=config.smtp_port,
            security=config.smtp_security,
            attempt=attempt,
        )
        try:
            with self.open(deadline) as client:
                self.secure(client)
                self.login(client)
                refused = client.send_message(
                    message, config.email_from, list(config.email_to)
                )
        except smtplib.SMTPAuthenticationError as error:
            raise MailFailure(
                f"SMTP authentication failed ({error.smtp_code} "
                f"{decode_reply(error.smtp_error)}); not retried"
            ) from None
        except smtplib.SMTPRecipientsRefused as error:
            codes = [code for code, _ in error.recipients.values()]
            if all(400 <= code < 500 for code in codes):
                raise TransientError(f"recipients refused {codes}") from error
            raise
        except smtplib.SMTPResponseException as error:
            if 400 <= error.smtp_code < 500:
                raise TransientError(
                    f"{error.smtp_code} {decode_reply(error.smtp_error)}"
                ) from error
            raise
        except TRANSIENT_SOCKET_ERRORS as error:
            raise TransientError(one_line(error)) from error
        if refused:
            raise MailFailure(
                "some recipients were refused and not retried "
                f"(the others got the mail): {', '.join(sorted(refused))}"
            )

    def open(self, deadline):
        config = self.config
        timeout = max(0.1, deadline.remaining())
        if config.smtp_security == "ssl":
            return smtplib.SMTP_SSL(
                config.smtp_host,
                config.smtp_port,
                timeout=timeout,
                context=self.context,
            )
        return smtplib.SMTP(
            config.smtp_host, config.smtp_port, timeout=timeout
        )

    def secure(self, client):
        if self.config.smtp_security != "starttls":
            return
        client.ehlo()
        if not client.has_extn("starttls"):
            raise MailFailure(
                "the SMTP server does not offer STARTTLS; refusing to "
                "continue without TLS (nothing was sent)"
            )
        client.starttls(context=self.context)
        client.ehlo()

    def login(self, client):
        """Authenticate once, with the best mechanism the server offers.

        smtplib's own login() tries every mechanism in turn: with a
        wrong password that is several failed logins, which can lock
        the account. One attempt, then stop.
        """
        if self.config.email_password is None:
            return
        client.ehlo_or_helo_if_needed()
        offered = client.esmtp_features.get("auth", "").upper().split()
        mechanism = next((m for m in AUTH_MECHANISMS if m in offered), None)
        if mechanism is None:
            raise MailFailure(
                "the SMTP server offers no AUTH mechanism this tool speaks "
                f"({' '.join(AUTH_MECHANISMS)}) after TLS"
            )
        client.user = self.config.email_user
        client.password = self.config.email_password.value
        method = getattr(client, "auth_" + mechanism.lower().replace("-", "_"))
        client.auth(mechanism, method)


def decode_reply(reply):
    if isinstance(reply, bytes):
        reply = reply.decode("utf-8", "replace")
    return one_line(reply)


def describe_mail_failure(error, config):
    if isinstance(error, MailFailure):
        return error
    if isinstance(error, TimeoutError):
        return MailFailure(
            f"no answer from {config.smtp_host}:{config.smtp_port} within "
            f"SMTP_TIMEOUT={config.smtp_timeout:g}s"
        )
    if isinstance(error, ssl.SSLCertVerificationError):
        return MailFailure(
            "TLS certificate of the SMTP server not trusted: "
            f"{one_line(error.verify_message)} (see SMTP_CA_FILE)"
        )
    if isinstance(error, ssl.SSLError):
        return MailFailure(
            f"TLS error with the SMTP server: {one_line(error)}"
        )
    if isinstance(error, smtplib.SMTPResponseException):
        return MailFailure(
            f"SMTP server answered {error.smtp_code} "
            f"{decode_reply(error.smtp_error)}"
        )
    if isinstance(error, smtplib.SMTPRecipientsRefused):
        refused = ", ".join(sorted(error.recipients))
        return MailFailure(f"SMTP server refused the recipients: {refused}")
    return MailFailure(
        f"mail error: {type(error).__name__}: {one_line(error)}"
    )


# ---------------------------------------------------------------- metrics


class MetricsFile:
    """node_exporter textfile metrics, replaced atomically on each run.

    The last success timestamp is carried over from the previous file,
    so a failed run does not erase it.
    """

    success_metric = f"{TOOL}_last_success_timestamp_seconds"

    def __init__(self, directory):
        self.path = directory / METRICS_FILE

    def previous_success(self):
        try:
            text = self.path.read_text(encoding="utf-8")
        except OSError:
            return None
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name == self.success_metric:
                try:
                    return float(value)
                except ValueError:
                    return None
        return None

    def write(self, exit_code, started, durations, timeouts, value):
        success = time.time() if exit_code == EXIT_SENT else None
        success = success or self.previous_success()
        lines = []

        def gauge(name, help_text, samples):
            if not samples:
                return
            lines.append(f"# HELP {TOOL}_{name} {help_text}")
            lines.append(f"# TYPE {TOOL}_{name} gauge")
            for labels, sample in samples:
                lines.append(f"{TOOL}_{name}{labels} {float(sample)!r}")

        gauge(
            "last_run_timestamp_seconds",
            "Start of the last run (Unix time).",
            [("", started)],
        )
        if success is not None:
            gauge(
                "last_success_timestamp_seconds",
                "End of the last run that sent the mail (Unix time).",
                [("", success)],
            )
        gauge(
            "last_exit_code",
            "Exit code of the last run (0 sent, 2 config, 3 db, 4 mail).",
            [("", exit_code)],
        )
        gauge(
            "duration_seconds",
            "Duration of the last run, by phase.",
            [(f'{{phase="{p}"}}', s) for p, s in durations.items()],
        )
        gauge(
            "timeout_seconds",
            "Deadline of each phase (DB_TIMEOUT, SMTP_TIMEOUT).",
            [(f'{{phase="{p}"}}', s) for p, s in timeouts.items()],
        )
        if value is not None:
            gauge(
                "last_value",
                "Last ID read by the last successful run.",
                [("", value)],
            )
        text = "\n".join(lines) + "\n"
        handle, temporary = tempfile.mkstemp(
            prefix=f".{METRICS_FILE}.", dir=self.path.parent
        )
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as stream:
                stream.write(text)
            os.chmod(temporary, 0o644)
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise


def numeric(value):
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


# ------------------------------------------------------------------- main


def parse_arguments(argv):
    parser = argparse.ArgumentParser(
        prog="oracle_seq_mail.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument(
        "--check",
        action="store_true",
        help="validate the configuration; no network access",
    )
    modes.add_argument(
        "--dry-run",
        action="store_true",
        help="read the database and print the mail instead of sending",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="debug log lines and (scrubbed) tracebacks",
    )
    return parser.parse_args(argv)


def configure_logging(verbose, redactor):
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter(redactor))
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.DEBUG if verbose else logging.INFO)


def forget_secret_variables(environ):
    """Keep secrets out of anything this process might start."""
    for name in SECRET_NAMES:
        environ.pop(name, None)


class Run:
    """One run of the tool: phases, timings, result and metrics."""

    def __init__(self, config, arguments):
        self.config = config
        self.arguments = arguments
        self.started = time.time()
        self.durations = {}
        self.value = None

    def timed(self, phase, function):
        begin = time.monotonic()
        try:
            return function()
        finally:
            self.durations[phase] = time.monotonic() - begin

    def read_database(self):
        config = self.config
        deadline = Deadline(config.db_timeout)
        reader = OracleReader(config)
        try:
            reading = self.timed(
                "db",
                lambda: call_with_deadline(
                    lambda: reader.read(deadline), deadline, "oracle"
                ),
            )
        except Exception as error:
            event("traceback", logging.DEBUG, phase="db", exc_info=True)
            raise describe_database_failure(error, config) from None
        event(
            "db_read",
            target=reading.target.label,
            value=reading.value,
            duration_ms=round(self.durations["db"] * 1000),
        )
        return reading

    def send_mail(self, message):
        config = self.config
        deadline = Deadline(config.smtp_timeout)
        sender = MailSender(config)
        try:
            self.timed(
                "mail",
                lambda: call_with_deadline(
                    lambda: sender.send(message, deadline), deadline, "smtp"
                ),
            )
        except Exception as error:
            event("traceback", logging.DEBUG, phase="mail", exc_info=True)
            raise describe_mail_failure(error, config) from None
        event(
            "mail_sent",
            to=len(config.email_to),
            message_id=message["Message-ID"],
            duration_ms=round(self.durations["mail"] * 1000),
        )

    def execute(self):
        reading = self.read_database()
        self.value = reading.value
        message = build_message(self.config, reading, socket.gethostname())
        if self.arguments.dry_run:
            print_message(message)
            return EXIT_SENT
        self.send_mail(message)
        total = time.time() - self.started
        event(
            "sent",
            target=reading.target.label,
            value=reading.value,
            duration_ms=round(total * 1000),
        )
        print(
            f"sent {reading.target.label} = {reading.value} to "
            f"{len(self.config.email_to)} recipient(s)"
        )
        return EXIT_SENT

    def record(self, exit_code):
        """Write the metrics file, if configured; never fails the run."""
        if self.arguments.dry_run or self.config.metrics_dir is None:
            return
        self.durations["total"] = time.time() - self.started
        timeouts = {
            "db": self.config.db_timeout,
            "mail": self.config.smtp_timeout,
        }
        value = numeric(self.value) if exit_code == EXIT_SENT else None
        try:
            MetricsFile(self.config.metrics_dir).write(
                exit_code, self.started, self.durations, timeouts, value
            )
        except OSError as error:
            event(
                "metrics_error",
                logging.WARNING,
                error=one_line(error.strerror or error),
            )


def record_config_failure(started, exit_code):
    """Let monitoring see a broken configuration, when it can."""
    directory = os.environ.get("METRICS_TEXTFILE_DIR", "").strip()
    if not directory or not os.path.isdir(directory):
        return
    durations = {"total": time.time() - started}
    try:
        MetricsFile(Path(directory)).write(
            exit_code, started, durations, {}, None
        )
    except OSError as error:
        event(
            "metrics_error",
            logging.WARNING,
            error=one_line(error.strerror or error),
        )


def print_message(message):
    """The mail as a reader would see it, decoded, on stdout."""
    for header in ("From", "To", "Subject", "Date", "Message-ID"):
        print(f"{header}: {message[header]}")
    print()
    print(message.get_content(), end="")


def report_failure(error):
    event(
        "error",
        logging.ERROR,
        phase=error.phase,
        exit_code=error.exit_code,
        error=str(error),
    )
    print(f"failed: {error.phase} error (exit {error.exit_code})")
    return error.exit_code


def main(argv=None):
    arguments = parse_arguments(argv)
    redactor = Redactor()
    configure_logging(arguments.verbose, redactor)

    started = time.time()
    try:
        config = load_config(os.environ, redactor)
    except RunError as error:
        exit_code = report_failure(error)
        if not (arguments.check or arguments.dry_run):
            record_config_failure(started, exit_code)
        return exit_code
    except Exception as error:
        event("traceback", logging.DEBUG, phase="config", exc_info=True)
        return report_failure(
            RunError(f"internal error: {type(error).__name__} (use -v)")
        )
    finally:
        forget_secret_variables(os.environ)

    event(
        "config_ok",
        mode=config.target.mode,
        target=config.target.label,
        dsn=config.db_service,
        smtp=f"{config.smtp_host}:{config.smtp_port}",
        security=config.smtp_security,
        recipients=len(config.email_to),
    )
    if arguments.check:
        print(f"config ok: {config.target.label} via {config.db_service}")
        return EXIT_SENT

    run = Run(config, arguments)
    try:
        exit_code = run.execute()
    except RunError as error:
        exit_code = report_failure(error)
    except Exception as error:
        event("traceback", logging.DEBUG, phase="run", exc_info=True)
        exit_code = report_failure(
            RunError(f"internal error: {type(error).__name__} (use -v)")
        )
    run.record(exit_code)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
