"""Tests for the monitoring guide: alert rules, real metrics, the hook.

Usage:
    tests/run.sh tests/test_monitoring.py

- monitoring/alerts.yml passes `promtool check rules`, and its unit
  tests (monitoring/alerts_test.yml) pass `promtool test rules`; every
  alert is tested firing and not firing and has a runbook section in
  docs/monitoring.md.
- Every metric the rules read is one the tools really emit (the API's
  /metrics from a real server on port 0, the textfiles of a real mover
  run and a real mailer run, each passing `promtool check metrics`), or
  one of the exporters' metrics listed in docs/monitoring.md. A renamed
  metric fails here.
- deploy/notify-failure.sh runs for real with a private PATH whose
  `sendmail` is a stub that records its arguments and the message: the
  local MTA is the one peer that cannot run here.

Environment:
    CI=true   a missing promtool or inotifywait fails instead of skipping

Limitations:
- The hook's unit is checked offline (exposure, verify); it is not
  started under a real systemd here.
- The mailer's database is faked at the driver boundary (the object
  that oracledb.connect returns), as in its own tests.
"""

import email
import email.policy
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import yaml
from aiosmtpd.controller import Controller
from support import (
    REPO_ROOT,
    assert_promtool_accepts_metrics,
    require,
    unit_exposure,
)

ALERTS = REPO_ROOT / "monitoring/alerts.yml"
ALERT_TESTS = REPO_ROOT / "monitoring/alerts_test.yml"
GUIDE = REPO_ROOT / "docs/monitoring.md"
SERVER = REPO_ROOT / "list_files_server.py"
MOVER = REPO_ROOT / "move_arquivos.sh"
MAILER = REPO_ROOT / "oracle_seq_mail.py"
HOOK = REPO_ROOT / "deploy/notify-failure.sh"
HOOK_UNIT = REPO_ROOT / "systemd/notify-failure@.service"

# Metrics the rules read that come from Prometheus itself or from the
# exporters, not from the tools; docs/monitoring.md lists each.
EXTERNAL_METRICS = {
    "up",
    "container_memory_working_set_bytes",
    "container_spec_memory_limit_bytes",
    "node_filesystem_avail_bytes",
    "node_filesystem_files",
    "node_filesystem_files_free",
    "node_filesystem_readonly",
    "node_filesystem_size_bytes",
    "node_systemd_unit_state",
    "node_textfile_scrape_error",
}
PROMQL_WORDS = {
    "and",
    "or",
    "unless",
    "by",
    "on",
    "without",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
}

DEADLINE = 30


def wait_until(predicate, what, deadline=DEADLINE):
    give_up = time.monotonic() + deadline
    while time.monotonic() < give_up:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"gave up after {deadline} s waiting for {what}")


def promtool(*args, stdin=None, cwd=None):
    return subprocess.run(
        [require("promtool"), *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
        check=False,
    )


def sample_names(text):
    """Names of the samples in an exposition text."""
    names = set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            names.add(re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line)[0])
    return names


def alert_rules():
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def metric_names(expr):
    """Metric names a PromQL expression reads."""
    text = re.sub(r"\{[^}]*\}", " ", expr)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(
        r"\b(by|on|without|ignoring|group_left|group_right)\s*\([^)]*\)",
        " ",
        text,
    )
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*(?=\s*(\()?)", text):
        if match[1] or match[0] in PROMQL_WORDS:
            continue
        names.add(match[0])
    return names


def referenced_metrics():
    names = set()
    for rule in alert_rules():
        names |= metric_names(rule["expr"])
    return names


# ------------------------------------------------------------ the rules


def test_alert_rules_pass_promtool_check():
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    count = len(alert_rules())
    assert f"SUCCESS: {count} rules found" in result.stdout


def test_alert_unit_tests_pass():
    result = promtool("test", "rules", ALERT_TESTS.name, cwd=ALERTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.endswith("  SUCCESS\n\n")


def test_every_alert_is_tested_firing_and_silent():
    evaluations = {}
    for case in yaml.safe_load(ALERT_TESTS.read_text())["tests"]:
        for check in case["alert_rule_test"]:
            evaluations.setdefault(check["alertname"], []).append(
                bool(check.get("exp_alerts"))
            )
    for rule in alert_rules():
        seen = evaluations.get(rule["alert"], [])
        assert True in seen, f"{rule['alert']} is never tested firing"
        assert False in seen, f"{rule['alert']} is never tested silent"


def guide_anchors():
    anchors = set()
    for line in GUIDE.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            title = re.sub(r"[^\w\- ]", "", title).replace(" ", "-")
            anchors.add(title)
    return anchors


def test_every_alert_has_severity_annotations_and_a_runbook_section():
    anchors = guide_anchors()
    for rule in alert_rules():
        name = rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        annotations = rule["annotations"]
        assert set(annotations) == {"summary", "description", "runbook_url"}
        assert annotations["runbook_url"] == (
            f"docs/monitoring.md#{name.lower()}"
        )
        assert name.lower() in anchors, f"no section {name} in the guide"


def test_external_metrics_are_listed_in_the_guide():
    guide = GUIDE.read_text()
    for name in EXTERNAL_METRICS:
        assert f"`{name}`" in guide, name


# -------------------------------------------------- what the tools emit


@pytest.fixture(scope="module")
def api_metrics(tmp_path_factory):
    """/metrics of a real server that served a listing and a 404."""
    root = tmp_path_factory.mktemp("listed")
    (root / "a.txt").write_bytes(b"a")
    server = subprocess.Popen(
        [
            sys.executable,
            str(SERVER),
            "--dir",
            str(root),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={"PATH": os.environ["PATH"], "PYTHONUNBUFFERED": "1"},
    )
    try:
        port = None
        for line in server.stderr:
            found = re.search(r"listening on \S+ port (\d+)", line)
            if found:
                port = int(found[1])
                break
        assert port, "the server did not say where it listens"
        threading.Thread(target=server.stderr.read, daemon=True).start()
        bodies = {}
        for path in ("/files", "/nope", "/readyz", "/metrics"):
            connection = socket.create_connection(("127.0.0.1", port), 10)
            with connection:
                connection.sendall(
                    f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode()
                )
                response = b""
                while chunk := connection.recv(65536):
                    response += chunk
            head, _, body = response.partition(b"\r\n\r\n")
            bodies[path] = (head.split(b" ", 2)[1], body)
        assert [status for status, _ in bodies.values()] == [
            b"200",
            b"404",
            b"200",
            b"200",
        ]
        return bodies["/metrics"][1].decode()
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(10) == 0


@pytest.fixture(scope="module")
def mover_metrics(tmp_path_factory):
    """The textfile of a real mover that moved one file."""
    require("inotifywait")
    base = tmp_path_factory.mktemp("mover")
    src, dest, textfiles = base / "src", base / "dest", base / "textfiles"
    for directory in (src, dest, textfiles):
        directory.mkdir()
    env = {
        "PATH": os.environ["PATH"],
        "SRC_DIR": str(src),
        "DEST_DIR": str(dest),
        "METRICS_TEXTFILE_DIR": str(textfiles),
        "METRICS_INTERVAL_SECONDS": "1",
        "MOVER_NAME": "pair1",
    }
    mover = subprocess.Popen(
        ["bash", str(MOVER)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    prom = textfiles / "move_arquivo_pair1.prom"
    try:
        wait_until(prom.exists, "the mover's first metrics file")
        (src / "report.pdf").write_bytes(b"x")
        moved = 'move_arquivo_moved_files_total{mover="pair1"} 1\n'
        wait_until(
            lambda: moved in prom.read_text(), "the move in the metrics"
        )
    finally:
        mover.send_signal(signal.SIGTERM)
        _, stderr = mover.communicate(timeout=10)
    assert mover.returncode == 0, stderr
    assert (dest / "report.pdf").read_bytes() == b"x"
    return prom.read_text()


class PortZeroSMTP(Controller):
    """aiosmtpd on a socket this process bound to 127.0.0.1 port 0."""

    def __init__(self, handler):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        port = self.listener.getsockname()[1]
        super().__init__(handler, hostname="127.0.0.1", port=port)

    def _create_server(self):
        return self.loop.create_server(
            self._factory_invoker, sock=self.listener
        )


class MailRecorder:
    def __init__(self):
        self.envelopes = []

    async def handle_DATA(self, server, session, envelope):
        self.envelopes.append(envelope)
        return "250 2.0.0 Queued"


# The real mailer as __main__, with oracledb.connect answering one row.
FAKE_DRIVER_RUN = f"""
import runpy, sys
import oracledb

class Cursor:
    def execute(self, statement, parameters=None, **keywords):
        pass
    def fetchone(self):
        return ("APP", "12345", 20, 1)
    def close(self):
        pass

class Connection:
    call_timeout = 0
    def cursor(self):
        return Cursor()
    def rollback(self):
        pass
    def close(self):
        pass

oracledb.connect = lambda *args, **kwargs: Connection()
sys.argv[0] = {str(MAILER)!r}
runpy.run_path({str(MAILER)!r}, run_name="__main__")
"""


@pytest.fixture(scope="module")
def mailer_metrics(tmp_path_factory):
    """The textfile after a real run that sent its mail."""
    textfiles = tmp_path_factory.mktemp("mailer-textfiles")
    recorder = MailRecorder()
    smtp = PortZeroSMTP(recorder)
    smtp.start()
    try:
        env = {
            "PATH": os.environ["PATH"],
            "HOME": str(textfiles),
            "LANG": "C.UTF-8",
            "DB_USER": "scott",
            "DB_PASSWORD": "monitoring-test-only",
            "DB_CONN_STRING": "127.0.0.1:1521/ORCLPDB1",
            "SEQUENCE_NAME": "APP.ORDER_SEQ",
            "SMTP_HOST": "127.0.0.1",
            "SMTP_PORT": str(smtp.port),
            "SMTP_SECURITY": "none",
            "EMAIL_FROM": "ops@example.com",
            "EMAIL_TO": "dba@example.com",
            "METRICS_TEXTFILE_DIR": str(textfiles),
        }
        result = subprocess.run(
            [sys.executable, "-c", FAKE_DRIVER_RUN],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        smtp.stop()
    assert result.returncode == 0, result.stderr
    assert len(recorder.envelopes) == 1
    return (textfiles / "oracle_seq_mail.prom").read_text()


def test_api_metrics_carry_every_api_metric_the_rules_read(api_metrics):
    emitted = sample_names(api_metrics)
    wanted = {
        name
        for name in referenced_metrics()
        if name.startswith(("list_files_", "process_"))
    }
    assert wanted, "the rules read no API metric"
    assert wanted - emitted == set()


def test_mover_textfile_passes_promtool_and_carries_the_rules_metrics(
    mover_metrics,
):
    assert_promtool_accepts_metrics(mover_metrics)
    emitted = sample_names(mover_metrics)
    wanted = {n for n in referenced_metrics() if n.startswith("move_arquivo_")}
    assert wanted, "the rules read no mover metric"
    assert wanted - emitted == set()


def test_mailer_textfile_passes_promtool_and_carries_the_rules_metrics(
    mailer_metrics,
):
    assert_promtool_accepts_metrics(mailer_metrics)
    emitted = sample_names(mailer_metrics)
    wanted = {
        n for n in referenced_metrics() if n.startswith("oracle_seq_mail_")
    }
    assert wanted, "the rules read no mailer metric"
    assert wanted - emitted == set()


def test_every_metric_the_rules_read_is_emitted_or_an_exporters(
    api_metrics, mover_metrics, mailer_metrics
):
    emitted = (
        sample_names(api_metrics)
        | sample_names(mover_metrics)
        | sample_names(mailer_metrics)
    )
    unknown = referenced_metrics() - emitted - EXTERNAL_METRICS
    assert unknown == set()


def test_metric_name_extraction_sees_through_promql():
    expr = (
        'sum by (job, le) (rate(a_total{route=~"/x|/y"}[5m])) '
        "/ on (job) b_seconds > 0.5 and c unless absent(d) or time() - e"
    )
    assert metric_names(expr) == {"a_total", "b_seconds", "c", "d", "e"}


# --------------------------------------------------------- the OnFailure hook


@pytest.fixture
def hook_path(tmp_path):
    """A private PATH: the few real tools the hook runs, and a sendmail
    stub that records its arguments and the message it is given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "cat", "date", "sed", "systemctl", "journalctl"):
        found = require(tool)
        (bin_dir / tool).symlink_to(found)
    record = tmp_path / "sendmail"
    stub = bin_dir / "sendmail"
    stub.write_text(
        "#!/bin/sh\n"
        f"printf '%s\\n' \"$@\" > '{record}.args'\n"
        f"cat > '{record}.mail'\n"
        'exit "${SENDMAIL_STATUS:-0}"\n'
    )
    stub.chmod(0o755)
    return bin_dir, record


def run_hook(hook_path, *args, **env):
    bin_dir, _ = hook_path
    return subprocess.run(
        [str(HOOK), *args],
        env={"PATH": str(bin_dir), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def host_name():
    return re.sub(r"[^A-Za-z0-9:_.@\\-]", "_", socket.gethostname())


def real_output(hook_path, *argv):
    """What a command the hook quotes prints here, as the hook runs it."""
    bin_dir, _ = hook_path
    result = subprocess.run(
        argv,
        env={"PATH": str(bin_dir), "LC_ALL": "C"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        check=False,
    )
    return result.stdout.rstrip("\n")


def read_mail(record):
    raw = (record.parent / (record.name + ".mail")).read_bytes()
    return email.message_from_bytes(raw, policy=email.policy.default)


def sendmail_args(record):
    path = record.parent / (record.name + ".args")
    return path.read_text().splitlines()


def test_hook_mails_the_unit_its_status_and_journal(hook_path):
    _, record = hook_path
    host = host_name()

    result = run_hook(
        hook_path,
        "move_arquivo.service",
        NOTIFY_EMAIL="ops@example.com, root",
        NOTIFY_JOURNAL_LINES="20",
    )

    assert result.returncode == 0
    assert result.stdout == ""
    assert result.stderr == (
        "priority=crit event=unit_failed unit=move_arquivo.service "
        f"host={host}\n"
        "priority=info event=mail_sent unit=move_arquivo.service to=2\n"
    )
    assert sendmail_args(record) == ["-oi", "--", "ops@example.com", "root"]
    mail = read_mail(record)
    assert mail.keys() == [
        "From",
        "To",
        "Subject",
        "Date",
        "Auto-Submitted",
        "MIME-Version",
        "Content-Type",
        "Content-Transfer-Encoding",
    ]
    assert mail["From"] == "root"
    assert mail["To"] == "ops@example.com, root"
    assert mail["Subject"] == f"[{host}] move_arquivo.service failed"
    assert mail["Auto-Submitted"] == "auto-generated"
    assert abs(mail["Date"].datetime.timestamp() - time.time()) < 300
    status_cmd = ("systemctl", "status", "--full", "--no-pager", "--")
    journal_cmd = ("journalctl", "--no-pager", "--lines=20")
    body = mail.get_content()
    first, rest = body.split("\n", 1)
    assert re.fullmatch(
        rf"move_arquivo\.service failed on {re.escape(host)} at "
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\.",
        first,
    )
    status = real_output(hook_path, *status_cmd, "move_arquivo.service")
    journal = real_output(
        hook_path, *journal_cmd, "--unit=move_arquivo.service"
    )
    assert rest == (
        "\n"
        f"$ {' '.join(status_cmd)} move_arquivo.service\n"
        f"{status}\n"
        "\n"
        f"$ {' '.join(journal_cmd)} --unit=move_arquivo.service\n"
        f"{journal}\n"
    )


def test_a_crafted_unit_name_cannot_add_headers_or_log_lines(hook_path):
    _, record = hook_path
    host = host_name()
    crafted = "x.service\r\nBcc: victim@example.com\nX-Evil: 1"
    safe = "x.service__Bcc:_victim@example.com_X-Evil:_1"

    result = run_hook(hook_path, crafted)

    assert result.returncode == 0
    assert result.stderr == (
        f"priority=crit event=unit_failed unit={safe} host={host}\n"
        f"priority=info event=mail_sent unit={safe} to=1\n"
    )
    assert sendmail_args(record) == ["-oi", "--", "root"]
    mail = read_mail(record)
    assert "Bcc" not in mail
    assert "X-Evil" not in mail
    assert mail["Subject"] == f"[{host}] {safe} failed"
    assert "victim@example.com\n" not in mail.get_content()


def test_hook_lines_carry_the_journal_priority_under_systemd(hook_path):
    result = run_hook(
        hook_path, "oracle_seq_mail.service", JOURNAL_STREAM="8:12345"
    )

    assert result.returncode == 0
    lines = result.stderr.splitlines()
    assert lines[0].startswith("<2>priority=crit event=unit_failed ")
    assert lines[1] == (
        "<6>priority=info event=mail_sent unit=oracle_seq_mail.service to=1"
    )


def test_a_failing_sendmail_exits_1_after_the_crit_line(hook_path):
    result = run_hook(hook_path, "move_arquivo.service", SENDMAIL_STATUS="75")

    assert result.returncode == 1
    assert result.stderr == (
        "priority=crit event=unit_failed unit=move_arquivo.service "
        f"host={host_name()}\n"
        "priority=err event=mail_failed unit=move_arquivo.service "
        "reason=sendmail status=75\n"
    )


def test_no_sendmail_exits_1_after_the_crit_line(hook_path):
    bin_dir, _ = hook_path
    (bin_dir / "sendmail").unlink()

    result = run_hook(hook_path, "move_arquivo.service")

    assert result.returncode == 1
    assert result.stderr.splitlines()[1:] == [
        "priority=err event=mail_failed unit=move_arquivo.service "
        "reason=no_sendmail"
    ]


def test_a_recipient_with_a_header_in_it_is_refused(hook_path):
    _, record = hook_path

    result = run_hook(
        hook_path,
        "move_arquivo.service",
        NOTIFY_EMAIL="ops@example.com\nBcc: victim@example.com",
    )

    assert result.returncode == 2
    assert result.stderr.splitlines()[1:] == [
        "notify-failure.sh: NOTIFY_EMAIL and NOTIFY_FROM take addresses "
        "like ops@example.com"
    ]
    assert not (record.parent / "sendmail.mail").exists()


def test_hook_usage(hook_path):
    help_result = run_hook(hook_path, "--help")
    assert help_result.returncode == 0
    assert help_result.stdout.startswith(
        "Summary: tell a human that a systemd unit failed"
    )
    for name in ("NOTIFY_EMAIL", "NOTIFY_FROM", "NOTIFY_JOURNAL_LINES"):
        assert name in help_result.stdout

    bare = run_hook(hook_path)
    assert bare.returncode == 2
    assert bare.stderr == help_result.stdout


def test_hook_unit_is_hardened_to_exposure_2_or_lower():
    assert unit_exposure(HOOK_UNIT) <= 2.0


def test_hook_unit_runs_the_installed_script_for_the_failed_unit():
    settings = {}
    for line in HOOK_UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    assert settings["ExecStart"] == ["/usr/local/bin/notify-failure.sh %i"]
    assert settings["Type"] == ["oneshot"]
    assert settings["EnvironmentFile"] == ["-/etc/notify-failure.env"]
    assert "OnFailure=notify-failure@%n.service" in GUIDE.read_text()
