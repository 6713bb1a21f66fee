"""The file mover under a real systemd: PID 1 in a Docker container.

Each test boots a fresh container whose PID 1 is Debian's systemd,
installs move_arquivos.sh and its units exactly as shipped (the README's
manual steps, or deploy/install-move-arquivo.sh) and drives the service
through systemctl, kill -9 and a container reboot.

Usage:
    tests/run.sh tests/test_move_arquivo_systemd.py

The image is the one tests/systemd_container.py builds for every
systemd test (session fixture `systemd_image`, about 40 s when cold).
Every container is removed on teardown.

Environment:
    CI=true   a missing docker or mmdebstrap fails instead of skipping

Limitations:
- The container gets SYS_ADMIN, the host's cgroup tree (v1 here) and
  tmpfs on /run, not --privileged. systemd builds the unit's sandbox
  (mount namespace, seccomp, capabilities) inside it. The one setting
  it cannot complete is PrivateNetwork='s loopback device (no
  CAP_NET_ADMIN in the container); systemd logs "Failed to configure
  loopback network device, ignoring" and the service runs. The unit
  forbids every socket family anyway.
- A "reboot" is docker stop + docker start: systemd shuts down and boots
  again in the same root file system; the kernel is not restarted.
"""

import io
import subprocess
import tarfile
import uuid

import pytest
from support import REPO_ROOT, require, require_docker
from systemd_container import SystemdContainer, booted, wait_until

pytestmark = [pytest.mark.docker, pytest.mark.systemd]

SCRIPT = REPO_ROOT / "move_arquivos.sh"
UNIT = REPO_ROOT / "move_arquivo.service"
README = REPO_ROOT / "README.md"
TEMPLATE = REPO_ROOT / "move_arquivo@.service"
INSTALLER = REPO_ROOT / "deploy/install-move-arquivo.sh"

INSTALLED_SCRIPT = "/usr/local/bin/move_arquivos.sh"
INSTALLED_UNIT = "/etc/systemd/system/move_arquivo.service"
INSTALLED_TEMPLATE = "/etc/systemd/system/move_arquivo@.service"
SRC = "/opt/dir_origem"
DEST = "/opt/dir_destino"


class MoverContainer(SystemdContainer):
    """The shared systemd container, named after this module."""

    label = "move-arquivo-systemd-test"


@pytest.fixture
def box(systemd_image):
    with booted(MoverContainer(require_docker(), systemd_image)) as box:
        yield box


# The original challenge's manual steps, word for word as the README
# gives them, run from a checkout.
README_STEPS = f"""
cp move_arquivos.sh /usr/local/bin/
cp move_arquivo.service /etc/systemd/system/
mkdir -p {SRC} {DEST}
systemctl daemon-reload
systemctl enable move_arquivo
systemctl start move_arquivo
"""
CHECKOUT = "/root/listar-arquivos"
INSTALLER_IN_CHECKOUT = f"{CHECKOUT}/{INSTALLER.relative_to(REPO_ROOT)}"


def test_readme_gives_these_manual_steps_word_for_word():
    readme = [line.strip() for line in README.read_text().splitlines()]
    steps = README_STEPS.strip().splitlines()
    starts = [i for i, line in enumerate(readme) if line == steps[0]]
    assert any(readme[i : i + len(steps)] == steps for i in starts)


def checkout_tar():
    """This working tree as a tar: tracked and untracked, not ignored."""
    listed = subprocess.run(
        [require("git"), "ls-files", "-z", "-co", "--exclude-standard"],
        cwd=REPO_ROOT,
        capture_output=True,
        check=True,
    )
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name in sorted(set(listed.stdout.decode().split("\0"))):
            path = REPO_ROOT / name
            if name and path.is_file():
                archive.add(path, arcname=name, recursive=False)
    return buffer.getvalue()


def copy_checkout(box):
    """The checkout, as it is now, at CHECKOUT in the container."""
    box.exec("mkdir", "-p", CHECKOUT)
    box.exec("tar", "-x", "-C", CHECKOUT, stdin=checkout_tar())


def install_by_readme(box):
    copy_checkout(box)
    box.sh(f"set -e; cd {CHECKOUT}; {README_STEPS}")
    box.wait_active("move_arquivo")


def log_fields(line):
    """key=value pairs of one log line (values here contain no spaces)."""
    return dict(word.split("=", 1) for word in line.split() if "=" in word)


def moved_lines(box, unit):
    return [
        log_fields(line)
        for line in box.journal(unit).splitlines()
        if line.startswith("event=moved")
    ]


def assert_moves_a_file(box, name, src=SRC, dest=DEST, unit="move_arquivo"):
    content = f"{name}\n".encode() + uuid.uuid4().bytes * 4096
    box.write(f"{src}/{name}", content)
    box.wait_moved(f"{src}/{name}", f"{dest}/{name}")
    assert box.read(f"{dest}/{name}") == content

    expected = {"src": f"{src}/{name}", "dest": f"{dest}/{name}"}

    def logged():
        lines = moved_lines(box, unit)
        return [f for f in lines if f.get("src") == expected["src"]]

    (fields,) = wait_until(logged, f"the log line for {name}")
    assert {k: fields.get(k) for k in expected} == expected


def test_readme_steps_leave_service_enabled_active_and_moving(box):
    install_by_readme(box)

    assert box.sh("systemctl is-enabled move_arquivo") == "enabled"
    assert box.sh("systemctl is-active move_arquivo") == "active"
    shown = box.show("move_arquivo", "WantedBy", "After", "Restart")
    assert "multi-user.target" in shown["WantedBy"].split()
    assert "local-fs.target" in shown["After"].split()
    assert shown["Restart"] in {"on-failure", "always"}
    assert_moves_a_file(box, "relatorio.csv")
    assert box.files_in(SRC) == []
    assert box.sh("systemctl is-system-running") == "running"


def test_unit_runs_as_shipped_inside_its_sandbox(box):
    install_by_readme(box)
    shown = box.show(
        "move_arquivo",
        "FragmentPath",
        "DropInPaths",
        "MainPID",
        "NoNewPrivileges",
        "PrivateTmp",
        "ProtectSystem",
        "ReadWritePaths",
        "SystemCallFilter",
    )
    pid = shown["MainPID"]

    assert shown["FragmentPath"] == INSTALLED_UNIT
    assert shown["DropInPaths"] == ""
    assert box.read(INSTALLED_UNIT) == UNIT.read_bytes()
    assert shown["ProtectSystem"] == "strict"
    writable = {path.lstrip("-") for path in shown["ReadWritePaths"].split()}
    assert writable >= {SRC, DEST}

    own_ns = box.sh("readlink /proc/1/ns/mnt")
    assert box.sh(f"readlink /proc/{pid}/ns/mnt") != own_ns
    in_sandbox = f"nsenter --target {pid} --mount --"
    # Writable: the two directories, nothing else (not even a private
    # /tmp, nor /run or /dev/shm, which ProtectSystem=strict leaves).
    unwritable = ("/usr/local/bin", "/etc", "/var/lib", "/opt", "/dev")
    unwritable += ("/dev/shm", "/run", "/run/lock", "/tmp", "/var/tmp")
    for path in unwritable:
        probe = box.exec(
            "bash", "-c", f"{in_sandbox} touch {path}/.probe", check=False
        )
        assert probe.returncode == 1, path
        assert b"Read-only file system" in probe.stderr, probe.stderr
    box.sh(f"{in_sandbox} touch {DEST}/.probe && rm {DEST}/.probe")
    box.sh(f"{in_sandbox} mkdir {SRC}/.probe && rmdir {SRC}/.probe")

    status = box.sh(f"grep -E '^(NoNewPrivs|Seccomp):' /proc/{pid}/status")
    if shown["NoNewPrivileges"] == "yes":
        assert "NoNewPrivs:\t1" in status
    if shown["SystemCallFilter"]:
        assert "Seccomp:\t2" in status
    if shown["PrivateTmp"] == "yes":
        box.sh("touch /tmp/host-marker")
        assert "host-marker" not in box.sh(f"{in_sandbox} ls -A /tmp")

    exposure = box.sh(
        "systemd-analyze security --no-pager move_arquivo.service | tail -n 1"
    )
    assert exposure.startswith("→ Overall exposure level"), exposure
    assert float(exposure.split(":")[1].split()[0]) <= 2.0, exposure

    assert_moves_a_file(box, "dentro-do-sandbox.txt")


def test_plain_unit_reads_its_environment_file(box):
    install_by_readme(box)
    box.install(
        "/etc/move_arquivo/move_arquivo.env",
        "IGNORE_GLOB=*.hold\nMOVER_NAME=principal\n",
    )
    box.exec("systemctl", "restart", "move_arquivo")
    box.wait_active("move_arquivo")

    box.write(f"{SRC}/espera.hold", b"held\n")
    assert_moves_a_file(box, "depois-do-env.txt")
    assert box.files_in(SRC) == ["espera.hold"]


def test_a_crash_loop_stops_at_the_start_limit(box):
    """The shipped StartLimitBurst= and StartLimitIntervalSec=, with a
    shorter RestartSec= (a drop-in) so that the loop runs in seconds."""
    install_by_readme(box)
    box.install(
        "/etc/systemd/system/move_arquivo.service.d/fast-restart.conf",
        "[Service]\nRestartSec=100ms\n",
    )
    box.exec("systemctl", "daemon-reload")
    box.exec("mv", SRC, f"{SRC}.fora")

    def failed():
        shown = box.show("move_arquivo", "ActiveState", "Result")
        return shown if shown["ActiveState"] == "failed" else None

    wait_until(failed, "the start limit")
    journal = box.journal("move_arquivo")
    assert "Start request repeated too quickly." in journal
    # Every failed start says why, in the mover's own words.
    missing = f'event=fatal reason=config msg="SRC_DIR {SRC} does not exist"'
    restarts = int(box.show("move_arquivo", "NRestarts")["NRestarts"])
    assert journal.count(missing) == restarts - 1
    assert "status=226/NAMESPACE" not in journal

    # Once the directory is back, one reset-failed brings it up again.
    box.exec("mv", f"{SRC}.fora", SRC)
    box.exec("systemctl", "reset-failed", "move_arquivo")
    box.exec("systemctl", "start", "move_arquivo")
    box.wait_active("move_arquivo")
    assert_moves_a_file(box, "depois-do-loop.txt")


def test_service_comes_back_after_reboot_without_being_started(box):
    install_by_readme(box)
    assert_moves_a_file(box, "antes.txt")
    first = box.show("move_arquivo", "InvocationID")
    box.exec("touch", "/run/before-reboot")

    assert box.stop() == 0, "systemd did not shut down cleanly"
    # A file left while the machine is off is moved once it is up again.
    box.copy_in(UNIT, f"{SRC}/deixado-desligado.txt")
    box.start()

    assert not box.exists("/run/before-reboot"), "/run survived: no boot"
    box.wait_active("move_arquivo")
    assert box.show("move_arquivo", "InvocationID") != first
    assert box.sh("systemctl is-enabled move_arquivo") == "enabled"
    box.wait_moved(
        f"{SRC}/deixado-desligado.txt", f"{DEST}/deixado-desligado.txt"
    )
    assert box.read(f"{DEST}/deixado-desligado.txt") == UNIT.read_bytes()
    assert_moves_a_file(box, "depois.txt")


def test_kill_9_of_main_process_is_restarted_and_backlog_moved(box):
    install_by_readme(box)
    before = box.show("move_arquivo", "MainPID", "NRestarts")
    assert before["NRestarts"] == "0"

    # The files are created in the same shell, right after the kill, while
    # systemd waits RestartSec= before starting the service again.
    state_after_writing = box.sh(
        f"kill -9 {before['MainPID']}; "
        f"for i in $(seq 1 200); do echo $i > {SRC}/caido-$i; done; "
        "systemctl show -p SubState --value move_arquivo"
    )
    # KillMode=mixed: systemd first kills what is left of the service
    # (stop-sigkill), then waits RestartSec= (auto-restart). Either way,
    # nothing was watching while the files were written.
    assert state_after_writing in {"stop-sigkill", "auto-restart"}

    def restarted():
        return box.show("move_arquivo", "NRestarts")["NRestarts"] == "1"

    wait_until(restarted, "NRestarts=1")
    box.wait_active("move_arquivo")
    after = box.show("move_arquivo", "MainPID", "NRestarts")
    assert after["NRestarts"] == "1"
    assert after["MainPID"] not in {"0", before["MainPID"]}
    assert "status=9/KILL" in box.journal("move_arquivo")

    wait_until(lambda: box.files_in(SRC) == [], f"{SRC} to be empty")
    assert box.files_in(DEST) == sorted(f"caido-{i}" for i in range(1, 201))
    wrong = box.sh(
        "for i in $(seq 1 200); do "
        f'[ "$(cat {DEST}/caido-$i)" = "$i" ] || echo "caido-$i"; done'
    )
    assert wrong == ""
    assert_moves_a_file(box, "depois-do-kill.txt")


def test_template_runs_two_directory_pairs_from_their_env_files(box):
    copy_checkout(box)
    box.sh(
        f"set -e; cd {CHECKOUT}; cp move_arquivos.sh /usr/local/bin/; "
        "cp move_arquivo@.service /etc/systemd/system/"
    )
    # Inside each instance's ReadWritePaths=, /opt/move_arquivo/NAME, but
    # not the unit's own defaults: only the environment file names them.
    pairs = {
        name: (
            f"/opt/move_arquivo/{name}/entrada",
            f"/opt/move_arquivo/{name}/saida",
        )
        for name in ("alfa", "bravo")
    }
    box.exec("mkdir", "-p", "/etc/move_arquivo")
    for name, (src, dest) in pairs.items():
        box.exec("mkdir", "-p", src, dest)
        box.write(
            f"/etc/move_arquivo/{name}.env",
            f"SRC_DIR={src}\nDEST_DIR={dest}\n".encode(),
        )
    box.exec("systemctl", "daemon-reload")
    box.exec(
        "systemctl",
        "enable",
        "--now",
        "move_arquivo@alfa",
        "move_arquivo@bravo",
    )

    for name, (src, dest) in pairs.items():
        unit = f"move_arquivo@{name}"
        box.wait_active(unit)
        assert box.sh(f"systemctl is-enabled {unit}") == "enabled"
        # One mount below the instance's ReadWritePaths=: renames, by the
        # python3 helper even inside the sandbox (seccomp, W^X memory).
        started = wait_until(
            lambda u=unit: [
                log_fields(line)
                for line in box.journal(u).splitlines()
                if line.startswith("event=started")
            ],
            f"{unit} to log event=started",
        )
        assert started[-1]["mode"] == "rename"
        assert started[-1]["renamer"] == "python3"
        assert_moves_a_file(box, f"para-{name}.txt", src, dest, unit)
    for name, (_, dest) in pairs.items():
        assert box.files_in(dest) == [f"para-{name}.txt"]

    assert box.stop() == 0
    box.start()
    for name in pairs:
        box.wait_active(f"move_arquivo@{name}")
    assert_moves_a_file(
        box, "apos-reboot.txt", *pairs["bravo"], "move_arquivo@bravo"
    )


def test_installer_sets_up_everything_in_one_command(box):
    """Default pair, a second run, then an instance with its own paths."""
    copy_checkout(box)

    box.exec(INSTALLER_IN_CHECKOUT)

    box.wait_active("move_arquivo")
    assert box.sh("systemctl is-enabled move_arquivo") == "enabled"
    assert box.read(INSTALLED_SCRIPT) == SCRIPT.read_bytes()
    assert box.read(INSTALLED_UNIT) == UNIT.read_bytes()
    assert box.read(INSTALLED_TEMPLATE) == TEMPLATE.read_bytes()
    assert box.sh(f"stat -c %a {INSTALLED_SCRIPT}") == "755"
    assert_moves_a_file(box, "instalado.txt")

    # A second run changes nothing and leaves the service running.
    box.exec(INSTALLER_IN_CHECKOUT)
    box.wait_active("move_arquivo")
    assert box.show("move_arquivo", "NRestarts")["NRestarts"] == "0"
    assert_moves_a_file(box, "reinstalado.txt")

    # An instance whose directories the installer makes writable.
    box.exec(
        INSTALLER_IN_CHECKOUT,
        "--instance",
        "cliente",
        "--src",
        "/srv/entrada",
        "--dest",
        "/srv/saida",
    )

    unit = "move_arquivo@cliente"
    box.wait_active(unit)
    assert box.sh(f"systemctl is-enabled {unit}") == "enabled"
    shown = box.show(unit, "ProtectSystem", "ReadWritePaths")
    assert shown["ProtectSystem"] == "strict"
    assert {"/srv/entrada", "/srv/saida"} <= set(
        shown["ReadWritePaths"].split()
    )
    assert_moves_a_file(
        box, "do-cliente.txt", "/srv/entrada", "/srv/saida", unit
    )
    assert box.files_in("/srv/entrada") == []
