#!/usr/bin/env bash
# Summary: install everything the tests need, then run the whole suite
#
# Usage: tests/run.sh [PYTEST_ARG...]
#
# Runs from any directory; works on the checkout it belongs to. In order:
#   1. Debian packages listed in tests/apt-packages.txt: installed with
#      apt-get when running as root on Debian/Ubuntu; otherwise the exact
#      apt-get line is printed and the run fails.
#   2. A virtualenv in .venv with requirements-dev.txt (re-used while the
#      requirement files are unchanged).
#   3. A Docker engine: started in the background (log in
#      /var/log/dockerd-tests.log) when none answers and this is root.
#   4. pytest over tests/: unit, socket, container and systemd tests and
#      the lint gates (ruff, shellcheck, hadolint, systemd-analyze).
# Arguments are passed to pytest, e.g. `tests/run.sh -k lint -x`.
#
# Environment:
#   CI=true          a missing tool fails its test instead of skipping it
#   RUN_TESTS_DEBUG=1  trace every command (set -x)
#
# Exit codes: pytest's (0 all passed, 1 failures, ...); 1 when the
# prerequisites cannot be installed.
set -euo pipefail
[[ -n "${RUN_TESTS_DEBUG:-}" ]] && set -x

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly ROOT
readonly VENV="${ROOT}/.venv"
readonly DOCKERD_LOG="/var/log/dockerd-tests.log"

err() {
  printf 'tests/run.sh: %s\n' "$*" >&2
}

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
}

wanted_packages() {
  local line
  while IFS= read -r line; do
    line="${line%%#*}"
    line="${line//[[:space:]]/}"
    [[ -n "${line}" ]] && printf '%s\n' "${line}"
  done < "${ROOT}/tests/apt-packages.txt"
}

missing_packages() {
  local pkg status
  while IFS= read -r pkg; do
    status="$(dpkg-query -W -f='${db:Status-Status}' "${pkg}" 2>/dev/null)" \
      || status=""
    [[ "${status}" == "installed" ]] || printf '%s\n' "${pkg}"
  done < <(wanted_packages)
}

install_system_packages() {
  if ! command -v dpkg-query >/dev/null; then
    err "not a Debian/Ubuntu system; install the equivalent of:"
    err "  $(wanted_packages | tr '\n' ' ')"
    return 1
  fi

  local -a missing=()
  mapfile -t missing < <(missing_packages)
  (( ${#missing[@]} == 0 )) && return 0

  local line="apt-get install -y --no-install-recommends ${missing[*]}"
  if (( EUID != 0 )); then
    err "missing Debian packages; as root run:"
    err "  apt-get update && ${line}"
    return 1
  fi
  printf 'tests/run.sh: installing %s\n' "${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  # shellcheck disable=SC2086  # word splitting of the package list is wanted
  DEBIAN_FRONTEND=noninteractive ${line} -qq >/dev/null
}

install_virtualenv() {
  local stamp="${VENV}/.requirements.sha256"
  local want
  want="$(cat "${ROOT}/requirements.txt" "${ROOT}/requirements-dev.txt" \
    | sha256sum)"
  if [[ -f "${stamp}" && "$(cat "${stamp}")" == "${want}" ]]; then
    return 0
  fi
  printf 'tests/run.sh: preparing %s\n' "${VENV}"
  python3 -m venv "${VENV}"
  "${VENV}/bin/python" -m pip install --quiet --disable-pip-version-check \
    -r "${ROOT}/requirements-dev.txt"
  printf '%s\n' "${want}" > "${stamp}"
}

start_docker_engine() {
  docker info >/dev/null 2>&1 && return 0
  if (( EUID != 0 )); then
    err "no Docker engine answers and only root may start one here"
    return 0
  fi
  printf 'tests/run.sh: starting dockerd (log: %s)\n' "${DOCKERD_LOG}"
  nohup dockerd >>"${DOCKERD_LOG}" 2>&1 &
  local i
  for (( i = 0; i < 60; i++ )); do
    docker info >/dev/null 2>&1 && return 0
    sleep 1
  done
  err "dockerd did not answer within 60 s; see ${DOCKERD_LOG}"
  return 1
}

main() {
  case "${1:-}" in
    -h|--help) usage; return 0 ;;
  esac

  cd "${ROOT}"
  install_system_packages
  install_virtualenv
  # Debian's docker client first: it matches the engine it installs.
  export PATH="${VENV}/bin:/usr/bin:${PATH}"
  start_docker_engine
  exec "${VENV}/bin/python" -m pytest "$@"
}

main "$@"
