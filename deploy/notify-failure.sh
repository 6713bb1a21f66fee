#!/usr/bin/env bash
# Summary: tell a human that a systemd unit failed, in the journal and by mail
#
# Usage: notify-failure.sh UNIT
#        notify-failure.sh --help
#
# Runs as notify-failure@UNIT.service, which a unit starts through
#   OnFailure=notify-failure@%n.service
# It first writes one line at priority crit (event=unit_failed) to
# stderr, which the journal keeps; then it mails NOTIFY_EMAIL the unit's
# name, `systemctl status` and its last journal lines through the local
# MTA's sendmail (found on PATH, usually /usr/sbin/sendmail).
#
# Environment (the unit reads /etc/notify-failure.env, if present):
#   NOTIFY_EMAIL          recipients, comma-separated (default root)
#   NOTIFY_FROM           From: address (default root)
#   NOTIFY_JOURNAL_LINES  journal lines quoted in the mail (default 50)
#   NOTIFY_FAILURE_DEBUG=1  trace every command (set -x)
# None of them is a secret.
#
# UNIT is cut down to the characters systemd allows in unit names
# (letters, digits and :_.@\-); any other byte becomes "_" before the
# name reaches a mail header, a command or the log, so a crafted name
# cannot add a header or forge a log line.
#
# Log: key=value lines on stderr. Under systemd (JOURNAL_STREAM set) each
# carries a <N> prefix that the journal turns into its priority:
# event=unit_failed (crit), mail_sent (info), mail_failed (err).
#
# Exit codes: 0 mail handed to sendmail; 1 sendmail missing or failed;
# 2 usage or configuration error. The crit line comes first, whatever
# happens after it.
set -euo pipefail
[[ -n "${NOTIFY_FAILURE_DEBUG:-}" ]] && set -x

export LC_ALL=C

readonly NOTIFY_EMAIL="${NOTIFY_EMAIL:-root}"
readonly NOTIFY_FROM="${NOTIFY_FROM:-root}"
readonly NOTIFY_JOURNAL_LINES="${NOTIFY_JOURNAL_LINES:-50}"
readonly ADDRESS_PATTERN='^[A-Za-z0-9._%+=-]+(@[A-Za-z0-9.-]+)?$'

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
}

# log PRIORITY NAME KEY=VALUE...: one line on stderr.
log() {
  local priority="$1" name="$2" prefix=""
  shift 2
  declare -A levels=([crit]=2 [err]=3 [info]=6)
  [[ -z "${JOURNAL_STREAM:-}" ]] || prefix="<${levels[${priority}]}>"
  printf '%spriority=%s event=%s %s\n' "${prefix}" "${priority}" \
    "${name}" "$*" >&2
}

err() {
  printf 'notify-failure.sh: %s\n' "$*" >&2
}

# safe_name TEXT: TEXT with every byte outside a unit name's alphabet
# replaced by "_", in REPLY.
safe_name() {
  REPLY="${1//[!A-Za-z0-9:_.@\\-]/_}"
}

# Sets the array RECIPIENTS from NOTIFY_EMAIL, or fails.
parse_recipients() {
  local address
  local -a addresses
  RECIPIENTS=()
  [[ "${NOTIFY_EMAIL}" != *[$'\r\n']* ]] || return 1
  IFS=, read -r -a addresses <<<"${NOTIFY_EMAIL}"
  for address in "${addresses[@]}"; do
    address="${address#"${address%%[! ]*}"}"
    address="${address%"${address##*[! ]}"}"
    [[ "${address}" =~ ${ADDRESS_PATTERN} ]] || return 1
    RECIPIENTS+=("${address}")
  done
  (( ${#RECIPIENTS[@]} > 0 ))
}

# compose_mail UNIT HOST: the message on stdout.
compose_mail() {
  local unit="$1" host="$2" status journal to
  local -a status_cmd journal_cmd
  status_cmd=(systemctl status --full --no-pager -- "${unit}")
  journal_cmd=(journalctl --no-pager "--lines=${NOTIFY_JOURNAL_LINES}"
    "--unit=${unit}")
  # Both exit non-zero for a failed or unknown unit; their words are
  # what the reader needs either way.
  status="$("${status_cmd[@]}" 2>&1)" || true
  journal="$("${journal_cmd[@]}" 2>&1)" || true
  printf -v to '%s, ' "${RECIPIENTS[@]}"
  printf '%s\n' \
    "From: ${NOTIFY_FROM}" \
    "To: ${to%, }" \
    "Subject: [${host}] ${unit} failed" \
    "Date: $(date -R)" \
    "Auto-Submitted: auto-generated" \
    "MIME-Version: 1.0" \
    "Content-Type: text/plain; charset=UTF-8" \
    "Content-Transfer-Encoding: 8bit" \
    "" \
    "${unit} failed on ${host} at $(date -u +%Y-%m-%dT%H:%M:%SZ)." \
    "" \
    "\$ ${status_cmd[*]}" \
    "${status}" \
    "" \
    "\$ ${journal_cmd[*]}" \
    "${journal}"
}

main() {
  case "${1:-}" in
    -h | --help)
      usage
      return 0
      ;;
  esac
  if (( $# != 1 )) || [[ -z "$1" ]]; then
    usage >&2
    return 2
  fi

  local unit host
  safe_name "$1"
  unit="${REPLY}"
  safe_name "${HOSTNAME:-localhost}"
  host="${REPLY}"
  log crit unit_failed "unit=${unit} host=${host}"

  if ! [[ "${NOTIFY_JOURNAL_LINES}" =~ ^[0-9]+$ ]]; then
    err "NOTIFY_JOURNAL_LINES must be a number of lines"
    return 2
  fi
  if ! parse_recipients || ! [[ "${NOTIFY_FROM}" =~ ${ADDRESS_PATTERN} ]]
  then
    err "NOTIFY_EMAIL and NOTIFY_FROM take addresses like ops@example.com"
    return 2
  fi
  if ! command -v sendmail >/dev/null; then
    log err mail_failed "unit=${unit} reason=no_sendmail"
    return 1
  fi

  local status=0
  compose_mail "${unit}" "${host}" \
    | sendmail -oi -- "${RECIPIENTS[@]}" || status=$?
  if (( status != 0 )); then
    log err mail_failed "unit=${unit} reason=sendmail status=${status}"
    return 1
  fi
  log info mail_sent "unit=${unit} to=${#RECIPIENTS[@]}"
}

main "$@"
