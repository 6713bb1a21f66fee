#!/usr/bin/env bash
# Summary: build a stand-in for an official Python base image from Debian
#
# Usage: build-base-image.sh [--force] [TAG [EXTRA_PACKAGE...]]
#
# Builds a Debian root file system with mmdebstrap from this host's own apt
# sources, imports it into the local Docker engine as TAG (default
# python:3.13-slim) and exits. Use it where no container registry can be
# reached (air-gapped hosts, CI runners behind a package mirror): the
# project's own Dockerfile then builds unchanged on top of the stand-in.
#
# The stand-in carries Debian's python3 (3.11 on bookworm), not the
# version in TAG; it offers `python` and `python3` on PATH and the
# label org.opencontainers.image.description says what it is. EXTRA_PACKAGE
# names are installed as well (the systemd test image uses this).
#
# An image that already exists under TAG is kept unless --force is given.
#
# Environment:
#   BASE_SUITE     Debian suite to build (default: this host's codename)
#   BUILD_BASE_DEBUG=1  trace every command (set -x)
#
# Exit codes: 0 built or already present, 1 build failed, 2 usage error.
set -euo pipefail
[[ -n "${BUILD_BASE_DEBUG:-}" ]] && set -x

readonly DEFAULT_TAG="python:3.13-slim"
readonly HOST_SOURCES="/etc/apt/sources.list.d/debian.sources"

err() {
  printf 'build-base-image: %s\n' "$*" >&2
}

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
}

host_suite() {
  local codename=""
  # shellcheck source=/dev/null
  codename="$(. /etc/os-release && printf '%s' "${VERSION_CODENAME:-}")"
  [[ -n "${codename}" ]] || codename="bookworm"
  printf '%s\n' "${codename}"
}

# Only Debian's own archives: third-party repositories configured on the
# host have no place in a base image.
mirror_args() {
  if [[ -r "${HOST_SOURCES}" ]]; then
    printf '%s\n' "${HOST_SOURCES}"
  fi
}

main() {
  local force=0
  case "${1:-}" in
    -h|--help) usage; return 0 ;;
    --force) force=1; shift ;;
    -*) err "unknown option: $1"; usage >&2; return 2 ;;
  esac

  local tag="${1:-${DEFAULT_TAG}}"
  (( $# > 0 )) && shift
  local -a extra=("$@")

  command -v mmdebstrap >/dev/null \
    || { err "mmdebstrap is missing: apt-get install mmdebstrap"; return 1; }
  docker info >/dev/null 2>&1 \
    || { err "no Docker engine answers: start dockerd first"; return 1; }

  if (( force == 0 )) && docker image inspect "${tag}" >/dev/null 2>&1; then
    printf 'build-base-image: %s already present\n' "${tag}"
    return 0
  fi

  local suite="${BASE_SUITE:-$(host_suite)}"
  local packages="python3,python-is-python3,ca-certificates,tzdata"
  local pkg
  for pkg in "${extra[@]}"; do
    packages+=",${pkg}"
  done

  local -a mirrors=()
  mapfile -t mirrors < <(mirror_args)

  printf 'build-base-image: building %s from Debian %s\n' "${tag}" "${suite}"
  # Documentation, man pages and locales are what the official slim images
  # leave out as well; they are half the size of a minimal root.
  mmdebstrap --variant=minbase --quiet \
    --include="${packages}" \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --format=tar \
    "${suite}" - "${mirrors[@]}" \
    | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["python3"]' \
        --change "LABEL org.opencontainers.image.description=\"stand-in for ${tag} built from Debian ${suite} packages\"" \
        - "${tag}" >/dev/null \
    || { err "building ${tag} failed"; return 1; }

  printf 'build-base-image: %s ready\n' "${tag}"
}

main "$@"
