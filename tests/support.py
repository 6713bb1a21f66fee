"""Helpers shared by the test modules.

Tools are found with `require`, which skips a test on a developer's
machine that lacks the tool but fails it when CI=true: on CI a missing
tool is a broken setup, never a reason to pass.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
ON_CI = os.environ.get("CI", "").lower() == "true"

# Debian's client matches the engine tests/run.sh installs.
PREFERRED = {"docker": "/usr/bin/docker"}


def require(tool):
    """Return the path of `tool`, or skip (fail on CI) when it is absent."""
    preferred = PREFERRED.get(tool)
    if preferred and os.access(preferred, os.X_OK):
        return preferred
    # Tools installed from PyPI live beside the interpreter running pytest.
    beside = Path(sys.executable).parent / tool
    if os.access(beside, os.X_OK):
        return str(beside)
    path = shutil.which(tool)
    if path:
        return path
    message = f"{tool} is not installed (tests/run.sh installs it)"
    if ON_CI:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def require_root():
    """Skip (fail on CI) a test that needs root."""
    if os.geteuid() == 0:
        return
    if ON_CI:
        pytest.fail("CI must run as root", pytrace=False)
    pytest.skip("needs root")


def require_docker():
    """Return the docker client once an engine answers."""
    docker = require("docker")
    probe = subprocess.run(
        [docker, "info"], capture_output=True, text=True, check=False
    )
    if probe.returncode != 0:
        message = "no Docker engine answers (tests/run.sh starts one)"
        if ON_CI:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return docker


def ensure_base_image(tag="python:3.13-slim", *extra_packages):
    """Make sure `tag` exists locally, building a stand-in if needed.

    There is no registry here: a pull is tried first (it works where a
    registry is reachable), then deploy/build-base-image.sh.
    """
    docker = require_docker()
    present = subprocess.run(
        [docker, "image", "inspect", tag], capture_output=True, check=False
    )
    if present.returncode == 0:
        return tag
    require("mmdebstrap")
    pulled = subprocess.run(
        [docker, "pull", "--quiet", tag],
        capture_output=True,
        timeout=120,
        check=False,
    )
    if pulled.returncode == 0 and not extra_packages:
        return tag
    subprocess.run(
        [str(REPO_ROOT / "deploy/build-base-image.sh"), tag, *extra_packages],
        check=True,
        timeout=900,
    )
    return tag


EXPOSURE_LINE = "Overall exposure level for "


def unit_exposure(unit_path):
    """Exposure score (0.0 safest .. 10.0) of a unit file, offline.

    Parsed from `systemd-analyze security --offline=true`, which rates the
    file as written, without a running systemd.
    """
    analyze = require("systemd-analyze")
    result = subprocess.run(
        [analyze, "security", "--offline=true", str(unit_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    for line in result.stdout.splitlines():
        if EXPOSURE_LINE in line:
            return float(line.split(":", 1)[1].split()[0])
    raise AssertionError(f"no exposure line in:\n{result.stdout}")


def assert_promtool_accepts_metrics(text):
    """Fail unless `promtool check metrics` accepts an exposition text."""
    check = subprocess.run(
        [require("promtool"), "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
