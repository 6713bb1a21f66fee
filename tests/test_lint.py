"""Lint gates: ruff, shellcheck, hadolint and systemd-analyze verify.

Each gate runs the real tool on the files of the checkout and fails on
any finding, so a planted defect of each kind turns the suite red.
"""

import re
import subprocess

import pytest
from support import REPO_ROOT, require


def project_files():
    """Files of the checkout: tracked, plus untracked but not ignored.

    Asking git keeps generated trees (.venv, bench/data with a million
    files) out of the walk.
    """
    listing = subprocess.run(
        [
            "git",
            "ls-files",
            "-z",
            "--cached",
            "--others",
            "--exclude-standard",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        check=True,
    )
    for name in sorted(set(listing.stdout.decode().split("\0")) - {""}):
        path = REPO_ROOT / name
        if path.is_file():
            yield path


def is_shell_script(path):
    if path.suffix in {".sh", ".bash"}:
        return True
    try:
        with path.open("rb") as stream:
            first = stream.readline(200)
    except OSError:
        return False
    return re.match(rb"#!\s*/\S*(/env\s+)?(ba)?sh\b", first) is not None


PROJECT_FILES = list(project_files())
SHELL_FILES = [p for p in PROJECT_FILES if is_shell_script(p)]
DOCKERFILES = [
    p
    for p in PROJECT_FILES
    if p.name == "Dockerfile" or p.name.endswith(".Dockerfile")
]
UNIT_FILES = [
    p
    for p in PROJECT_FILES
    if p.suffix in {".service", ".timer", ".socket", ".path"}
]


def ids(paths):
    return [str(p.relative_to(REPO_ROOT)) for p in paths]


def run(argv):
    return subprocess.run(
        argv, cwd=REPO_ROOT, capture_output=True, text=True, check=False
    )


def test_ruff_check():
    result = run([require("ruff"), "check", "--no-cache", "."])
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format():
    result = run([require("ruff"), "format", "--check", "--no-cache", "."])
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_gates_have_files_to_check():
    assert REPO_ROOT / "tests/run.sh" in SHELL_FILES
    assert REPO_ROOT / ".ci/run" in SHELL_FILES


@pytest.mark.parametrize("script", SHELL_FILES, ids=ids(SHELL_FILES))
def test_shellcheck(script):
    result = run([require("shellcheck"), "--external-sources", str(script)])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=ids(DOCKERFILES))
def test_hadolint(dockerfile):
    result = run([require("hadolint"), str(dockerfile)])
    assert result.returncode == 0, result.stdout + result.stderr


# The unit files name their scripts where the installers put them
# (/usr/local/bin/...); on the test host that path does not exist yet,
# and that one finding is the only one a verify run may report.
NOT_INSTALLED = re.compile(
    r"Command (?P<path>/\S+) is not executable: No such file or directory"
)


def unexpected_findings(output):
    shipped = {p.name for p in PROJECT_FILES}
    for line in output.splitlines():
        missing = NOT_INSTALLED.search(line)
        if missing and missing["path"].rsplit("/", 1)[-1] in shipped:
            continue
        if line.strip():
            yield line


@pytest.mark.parametrize("unit", UNIT_FILES, ids=ids(UNIT_FILES))
def test_systemd_analyze_verify(unit):
    result = run([require("systemd-analyze"), "verify", str(unit)])
    findings = list(unexpected_findings(result.stdout + result.stderr))
    assert findings == []
