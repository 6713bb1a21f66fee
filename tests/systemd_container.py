"""A Docker container whose PID 1 is systemd, shared by the test modules.

One image serves every module that needs a real systemd: its package
list is the union of what they install, and its tag carries a hash of
that list, so changing the list builds a new image (about 40 s, with
deploy/build-base-image.sh) instead of reusing a stale one.

Usage:
    image = ensure_systemd_image()
    with booted(SystemdContainer(require_docker(), image)) as box:
        box.sh("systemctl is-system-running")

tests/conftest.py offers the image as the session fixture
`systemd_image`.

Environment:
    CI=true   a missing docker or mmdebstrap fails instead of skipping

Limitations:
- The container gets SYS_ADMIN, the host's cgroup tree and tmpfs on
  /run, not --privileged; settings that need CAP_NET_ADMIN (such as
  PrivateNetwork='s loopback device) are skipped by systemd with a log
  line, and credentials cannot be mounted for a service's user.
- A "reboot" (stop, then start) restarts systemd in the same root file
  system; the kernel is not restarted.
"""

import contextlib
import hashlib
import shlex
import subprocess
import time
import uuid

from support import ensure_base_image, require_docker

SYSTEMD_IMAGE_PACKAGES = (
    "systemd",
    "systemd-sysv",
    "inotify-tools",
    "python3-cryptography",
)
SYSTEMD_IMAGE_TAG = (
    "tests-systemd:"
    + hashlib.sha256(" ".join(SYSTEMD_IMAGE_PACKAGES).encode()).hexdigest()[
        :12
    ]
)

# Generous: the host is shared and its CPU is noisy. These are deadlines
# for waiting, never measurements.
BOOT_DEADLINE = 120
STATE_DEADLINE = 60


def ensure_systemd_image():
    """The tag of the shared systemd image, built first if it is missing."""
    require_docker()
    return ensure_base_image(SYSTEMD_IMAGE_TAG, *SYSTEMD_IMAGE_PACKAGES)


def wait_until(probe, what, deadline=STATE_DEADLINE):
    """Call `probe` until it returns a true value; return that value."""
    give_up = time.monotonic() + deadline
    while time.monotonic() < give_up:
        last = probe()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"gave up after {deadline} s waiting for {what}")


@contextlib.contextmanager
def booted(container):
    """Boot `container`, yield it, and remove it whatever happens."""
    try:
        container.boot()
        yield container
    finally:
        container.remove()


class SystemdContainer:
    """A container whose PID 1 is systemd; the caller removes it.

    `label` names and labels the container (so a leftover one is easy
    to find); `command_timeout` bounds every docker command, in seconds.
    """

    label = "systemd-test"
    command_timeout = 120

    def __init__(self, docker, image):
        self.docker = docker
        self.image = image
        self.name = f"{self.label}-{uuid.uuid4().hex[:12]}"

    def docker_cmd(self, *args, check=True, stdin=None):
        """Run `docker ARGS`; fail unless it exits 0 (when `check`)."""
        result = subprocess.run(
            [self.docker, *args],
            input=stdin,
            capture_output=True,
            timeout=self.command_timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"docker {shlex.join(args)} exited {result.returncode}: "
                f"{result.stderr.decode(errors='replace')}"
            )
        return result

    def boot(self):
        """Start the container with systemd as PID 1; wait for the boot."""
        self.docker_cmd(
            "run",
            "--detach",
            "--name",
            self.name,
            "--label",
            self.label,
            "--cap-add",
            "SYS_ADMIN",
            "--cgroupns=host",
            "--volume",
            "/sys/fs/cgroup:/sys/fs/cgroup:rw",
            "--tmpfs",
            "/run",
            "--tmpfs",
            "/run/lock",
            "--stop-signal",
            "SIGRTMIN+3",
            self.image,
            "/sbin/init",
        )
        self.wait_booted()

    def wait_booted(self):
        """Wait for the boot to finish; it must end with no failed unit."""

        def finished():
            state = self.sh("systemctl is-system-running", check=False)
            return state if state in {"running", "degraded"} else None

        state = wait_until(finished, "systemd to boot", BOOT_DEADLINE)
        failed = self.sh("systemctl --failed --no-legend", check=False)
        assert state == "running", f"boot ended {state}: {failed}"

    def remove(self):
        self.docker_cmd("rm", "--force", "--volumes", self.name, check=False)

    def exec(self, *argv, check=True, stdin=None):
        """Run argv in the container; return the completed process."""
        args = ["exec"] + (["--interactive"] if stdin is not None else [])
        return self.docker_cmd(
            *args, self.name, *argv, check=check, stdin=stdin
        )

    def sh(self, script, check=True, stdin=None):
        """Run a bash script in the container; return its stdout, stripped."""
        result = self.exec("bash", "-c", script, check=check, stdin=stdin)
        return result.stdout.decode(errors="replace").strip()

    def copy_in(self, host_path, container_path):
        self.docker_cmd("cp", str(host_path), f"{self.name}:{container_path}")

    def write(self, path, content):
        """Write `content` to `path` in place, as `cat > path` would."""
        self.exec("bash", "-c", 'cat > "$1"', "-", path, stdin=content)

    def install(self, path, content, mode="0644"):
        """Install `content` (str or bytes) at `path` with `mode`.

        Missing parent directories are created.
        """
        data = content.encode() if isinstance(content, str) else content
        self.sh(f"install -D -m {mode} /dev/stdin {path}", stdin=data)

    def read(self, path):
        return self.exec("cat", path).stdout

    def exists(self, path):
        return self.exec("test", "-e", path, check=False).returncode == 0

    def show(self, unit, *properties):
        """`systemctl show -p` of `unit` as a dict."""
        text = self.sh(
            f"systemctl show {shlex.quote(unit)} "
            + " ".join(f"-p {p}" for p in properties)
        )
        return dict(line.split("=", 1) for line in text.splitlines())

    def stop(self):
        """Stop the container, letting systemd shut down; return exit code."""
        self.docker_cmd("stop", "--time", "60", self.name)
        code = self.docker_cmd(
            "inspect", "--format", "{{.State.ExitCode}}", self.name
        )
        return int(code.stdout)

    def start(self):
        self.docker_cmd("start", self.name)
        self.wait_booted()

    def journal(self, unit):
        return self.sh(f"journalctl --no-pager -o cat -u {shlex.quote(unit)}")

    def wait_active(self, unit):
        def active():
            state = self.show(unit, "ActiveState", "SubState")
            return state if state["ActiveState"] == "active" else None

        return wait_until(active, f"{unit} to be active")

    def files_in(self, directory):
        """Sorted paths of everything but directories below `directory`."""
        quoted = shlex.quote(directory)
        listing = self.sh(
            f"find {quoted} -mindepth 1 ! -type d -printf '%P\\n'"
        )
        return sorted(listing.splitlines())

    def wait_moved(self, src, dest):
        """Wait until `src` is gone and `dest` exists."""
        wait_until(
            lambda: self.exists(dest) and not self.exists(src),
            f"{src} to be moved to {dest}",
        )

    def gateway(self):
        """The host as the container sees it: its default gateway."""
        result = self.docker_cmd(
            "inspect", "--format", "{{.NetworkSettings.Gateway}}", self.name
        )
        address = result.stdout.decode().strip()
        assert address, "the container has no gateway"
        return address
