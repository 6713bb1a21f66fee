#!/usr/bin/env bash
# Summary: install the file mover and its systemd unit, enable and start it
#
# Usage: install-move-arquivo.sh [--root DIR] [--instance NAME]
#                                [--src DIR] [--dest DIR] [--no-start]
#
# Does the README's manual steps in one go; safe to run again at any time
# (it converges to the same files):
#   1. copies move_arquivos.sh to /usr/local/bin (mode 0755) and both unit
#      files to /etc/systemd/system (mode 0644), with the OnFailure= hook
#      they name (notify-failure.sh, notify-failure@.service);
#   2. with --src or --dest, writes the environment file and a drop-in
#      that makes those two directories writable for the unit;
#   3. creates the two directories if missing;
#   4. systemctl daemon-reload, enable, and start (restart if it was
#      running, so that a new script takes effect).
#
# Without --instance: move_arquivo.service, directories /opt/dir_origem
# and /opt/dir_destino, environment file /etc/move_arquivo/move_arquivo.env,
# drop-in /etc/systemd/system/move_arquivo.service.d/directories.conf.
# With --instance NAME: move_arquivo@NAME.service, directories
# /opt/move_arquivo/NAME/origem and /opt/move_arquivo/NAME/destino,
# environment file /etc/move_arquivo/NAME.env, drop-in in
# /etc/systemd/system/move_arquivo@NAME.service.d/.
# An existing environment file is kept unless --src or --dest is given.
#
# Options:
#   --root DIR       install below DIR instead of / (images, tests); the
#                    unit is enabled with `systemctl --root`, not started
#   --instance NAME  letters, digits and _ . - only
#   --src DIR        watched directory (absolute; no spaces, quotes,
#   --dest DIR       backslashes or %); destination directory (same rules)
#   --no-start       install and enable, do not start
#   -h, --help       print this text
#
# Environment:
#   INSTALL_MOVE_ARQUIVO_DEBUG=1  trace every command (set -x)
#
# Exit codes: 0 installed; 1 a step failed (inotifywait missing, systemctl
# failed, ...); 2 usage error.
set -euo pipefail
[[ -n "${INSTALL_MOVE_ARQUIVO_DEBUG:-}" ]] && set -x

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO
readonly SCRIPT=move_arquivos.sh
readonly UNITS=(move_arquivo.service "move_arquivo@.service")
readonly HOOK_SCRIPT=deploy/notify-failure.sh
readonly HOOK_UNIT="systemd/notify-failure@.service"

err() {
  printf 'install-move-arquivo: %s\n' "$*" >&2
}

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
}

usage_error() {
  err "$1 (try --help)"
  exit 2
}

# A path systemd takes literally in both KEY=value and ReadWritePaths=.
check_path() {
  [[ "$2" == /* && "$2" != *[[:space:]\"\'\\%]* ]] \
    || usage_error \
      "$1 must be an absolute path without spaces, quotes, \\ or %"
}

# Prints the value of KEY in environment file FILE, if any.
env_file_value() {
  local key="$1" file="$2" line
  [[ -f "${file}" ]] || return 0
  while IFS= read -r line; do
    [[ "${line}" == "${key}="* ]] && printf '%s\n' "${line#*=}"
  done <"${file}"
}

write_file() {
  local path="$1" mode="$2" content="$3"
  mkdir -p -- "$(dirname -- "${path}")"
  printf '%s' "${content}" >"${path}.new"
  chmod "${mode}" -- "${path}.new"
  mv -f -- "${path}.new" "${path}"
}

main() {
  local root="" instance="" src="" dest="" start=1
  while (( $# > 0 )); do
    case "$1" in
      -h | --help) usage; return 0 ;;
      --root) [[ $# -ge 2 ]] || usage_error "--root needs a value"
        root="${2%/}"; shift ;;
      --instance) [[ $# -ge 2 ]] || usage_error "--instance needs a value"
        instance="$2"; shift ;;
      --src) [[ $# -ge 2 ]] || usage_error "--src needs a value"
        check_path --src "$2"; src="$2"; shift ;;
      --dest) [[ $# -ge 2 ]] || usage_error "--dest needs a value"
        check_path --dest "$2"; dest="$2"; shift ;;
      --no-start) start=0 ;;
      *) usage_error "unknown argument: $1" ;;
    esac
    shift
  done
  if [[ -n "${instance}" && ! "${instance}" =~ ^[A-Za-z0-9_.-]+$ ]]; then
    usage_error "--instance may hold only letters, digits and _ . -"
  fi

  if [[ -z "${root}" ]] && ! command -v inotifywait >/dev/null; then
    err "inotifywait not found: apt-get install inotify-tools"
    return 1
  fi

  local unit=move_arquivo.service env_name=move_arquivo
  local default_src=/opt/dir_origem default_dest=/opt/dir_destino
  if [[ -n "${instance}" ]]; then
    unit="move_arquivo@${instance}.service"
    env_name="${instance}"
    default_src="/opt/move_arquivo/${instance}/origem"
    default_dest="/opt/move_arquivo/${instance}/destino"
  fi
  local env_file="${root}/etc/move_arquivo/${env_name}.env"
  local drop_in="${root}/etc/systemd/system/${unit}.d/directories.conf"

  install -D -m 0755 -- "${REPO}/${SCRIPT}" "${root}/usr/local/bin/${SCRIPT}"
  install -D -m 0755 -- "${REPO}/${HOOK_SCRIPT}" \
    "${root}/usr/local/bin/${HOOK_SCRIPT##*/}"
  local file
  for file in "${UNITS[@]}" "${HOOK_UNIT}"; do
    install -D -m 0644 -- "${REPO}/${file}" \
      "${root}/etc/systemd/system/${file##*/}"
  done

  if [[ -n "${src}" || -n "${dest}" ]]; then
    src="${src:-${default_src}}"
    dest="${dest:-${default_dest}}"
    write_file "${env_file}" 0644 "$(printf '%s\n' \
      "# Written by install-move-arquivo.sh; see move_arquivo.env.example." \
      "SRC_DIR=${src}" "DEST_DIR=${dest}")
"
    write_file "${drop_in}" 0644 "$(printf '%s\n' \
      "# Written by install-move-arquivo.sh: the directories of" \
      "# ${env_file#"${root}"}." \
      "[Service]" "ReadWritePaths=${src} ${dest}")
"
  else
    src="$(env_file_value SRC_DIR "${env_file}")"
    dest="$(env_file_value DEST_DIR "${env_file}")"
    src="${src:-${default_src}}"
    dest="${dest:-${default_dest}}"
  fi
  mkdir -p -- "${root}${src}" "${root}${dest}"

  if [[ -n "${root}" ]]; then
    systemctl --root="${root}" --quiet enable "${unit}"
    printf 'installed %s below %s (enabled, not started)\n' "${unit}" "${root}"
    return 0
  fi
  if [[ ! -d /run/systemd/system ]]; then
    systemctl --quiet enable "${unit}"
    printf 'installed %s (enabled; systemd is not running here)\n' "${unit}"
    return 0
  fi
  systemctl daemon-reload
  systemctl --quiet enable "${unit}"
  if (( start )); then
    systemctl restart "${unit}"
    printf 'installed %s (enabled, started)\n' "${unit}"
  else
    printf 'installed %s (enabled, not started)\n' "${unit}"
  fi
}

main "$@"
