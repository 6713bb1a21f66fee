#!/usr/bin/env bash
# Summary: move every finished file from a watched directory to another
#
# Usage: move_arquivos.sh [--help]
#
# Watches SRC_DIR with inotifywait and moves each file into DEST_DIR once
# it is complete: when its writer closes it, or when it is renamed into
# SRC_DIR. Files already present at start-up are moved too; the watch is
# set up before that first scan, so nothing created meanwhile is missed.
# Runs until stopped; systemd runs it as move_arquivo.service.
#
# Guarantees:
#   - A name that exists in DEST_DIR is never overwritten: the file gets
#     the first free name STEM.N.EXT (N = 1, 2, ...; EXT is what follows
#     the last dot, kept last), e.g. report.pdf -> report.1.pdf, and the
#     log says event=renamed.
#   - No partial file ever has its final name in DEST_DIR. On one mount a
#     move is a rename(2) that refuses to replace (renameat2 with
#     RENAME_NOREPLACE), made by a resident python3 helper when python3
#     and its ctypes are installed, else by mv -n. Across mounts the file
#     is renamed into SRC_DIR/.move_arquivo.ID/ (claimed), copied to
#     DEST_DIR/.move_arquivo.ID/, fsync'd, hard-linked to its final name,
#     and only then removed from both hidden directories. After a crash
#     the next start finishes or undoes what the hidden directories hold,
#     so each file ends in DEST_DIR exactly once.
#   - An inotify queue overflow is logged and answered with a full rescan.
#   - Symbolic links are moved as links. FIFOs, sockets and devices are
#     left in place (never opened) and logged once. Subdirectories are
#     left in place, not watched, and logged once.
#   - A scan (start-up, overflow, settle timer) cannot see whether a
#     writer still holds a file open, so it moves only files whose status
#     changed more than SCAN_SETTLE_SECONDS ago and looks again later.
#
# Environment:
#   SRC_DIR               watched directory (default /opt/dir_origem)
#   DEST_DIR              destination directory (default /opt/dir_destino)
#   IGNORE_GLOB           bash extended glob (extglob), matched
#                         case-insensitively against the bare file name;
#                         matching files are left alone until renamed to
#                         a name that does not match. Empty: ignore
#                         nothing. Default covers rsync's .name.XXXXXX
#                         (so also any hidden name that ends in a dot
#                         and six letters or digits, like .env.sample),
#                         *.part, *.partial, *.tmp, *.temp, *.swp, *.swx,
#                         vim's .name.swo to .name.swa, *.kate-swp, *~,
#                         #name#, emacs's .#name, .~lock.*#, ~$*,
#                         *.crdownload, *.download, *.opdownload,
#                         *.filepart, *.!ut, *.!qB and .goutputstream-*
#   SCAN_SETTLE_SECONDS   quiet time before a scan moves a file (default 5)
#   METRICS_TEXTFILE_DIR  if set, write node_exporter textfile metrics
#                         there (move_arquivo.prom, or
#                         move_arquivo_NAME.prom when MOVER_NAME is set)
#   METRICS_INTERVAL_SECONDS  least time between two writes (default 10)
#   MOVER_NAME            label mover= in the metrics (default "default")
#   MOVE_ARQUIVO_DEBUG=1  trace every command (set -x)
#
# Under systemd, move_arquivo.service reads these from the optional
# /etc/move_arquivo/move_arquivo.env, and move_arquivo@NAME.service from
# /etc/move_arquivo/NAME.env (one KEY=value per line).
#
# Log: one line per event, key=value. stdout: event=started (with
# mode=rename or mode=copy, and renamer=python3 or renamer=mv), moved,
# renamed, skipped, overflow, recovered, stopped. stderr: event=error,
# watcher_message, fatal. A value with bytes other than letters, digits
# and ._/:@+,%~- is written in double quotes; inside, " and \ are
# backslash-escaped and every byte outside printable ASCII is \xHH.
#
# Limitations: a file that appears by link(2) alone (ln, O_TMPFILE) gets
# no close event and waits for the next scan; subdirectories are not
# moved; across mounts, extended attributes and ACLs are not copied.
#
# Exit codes: 0 stopped by SIGTERM/SIGINT/SIGHUP; 1 the watched or the
# destination directory disappeared or became unusable, or inotifywait
# died; 2 usage error; 3 bad configuration at start-up (missing or
# unusable directory, bad number, no inotifywait).
set -euo pipefail
[[ -n "${MOVE_ARQUIVO_DEBUG:-}" ]] && set -x

# Byte semantics for lengths, ranges and messages, whatever the caller's
# locale.
export LC_ALL=C

# rsync's .name.XXXXXX; downloaders' and uploaders' suffixes; editors'
# swap, backup, autosave and lock files; GNOME's atomic-save temporary.
# A glob, not a regex: bash compiles a regex at every match, about half
# a millisecond per name for a list this long; this glob costs ~20 us.
readonly SUFFIX_CHAR='[a-z0-9]'
DEFAULT_IGNORE_GLOB="@(.?*.${SUFFIX_CHAR}${SUFFIX_CHAR}${SUFFIX_CHAR}"
DEFAULT_IGNORE_GLOB+="${SUFFIX_CHAR}${SUFFIX_CHAR}${SUFFIX_CHAR}"
DEFAULT_IGNORE_GLOB+='|*.@(part|partial|crdownload|download|opdownload'
DEFAULT_IGNORE_GLOB+='|filepart|!ut|!qb|tmp|temp|swp|swx|kate-swp)'
DEFAULT_IGNORE_GLOB+='|.?*.sw[a-p]|*~|#*#|.#*|.~lock.*#|~$*'
DEFAULT_IGNORE_GLOB+='|.goutputstream-*)'
readonly DEFAULT_IGNORE_GLOB
readonly OWN_PREFIX=".move_arquivo."
readonly BATCH_MAX=512
readonly NUMBERED_NAME_LIMIT=100000

# A resident rename helper spares a lone file the fork and exec of mv,
# most of the time from close() to arrival. It reads "FROM\0TO\0" and
# answers each pair with a line: 0, or the errno of renameat2(2) with
# RENAME_NOREPLACE, the call mv -n makes. Python is only a fast path:
# without python3 (or its ctypes) the same renames go through mv.
readonly RENAME_HELPER_PROGRAM='
import ctypes, os
AT_FDCWD, RENAME_NOREPLACE = -100, 1
renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
os.write(1, b"ready\n")
pending = b""
while chunk := os.read(0, 65536):
    *fields, pending = (pending + chunk).split(b"\0")
    if len(fields) % 2:
        pending = fields.pop() + b"\0" + pending
    replies = []
    for source, target in zip(fields[0::2], fields[1::2]):
        failed = renameat2(AT_FDCWD, source, AT_FDCWD, target,
                           RENAME_NOREPLACE)
        replies.append(b"%d\n" % (ctypes.get_errno() if failed else 0))
    os.write(1, b"".join(replies))
'
readonly RENAME_HELPER_START_SECONDS=10

SRC_DIR="${SRC_DIR:-/opt/dir_origem}"
DEST_DIR="${DEST_DIR:-/opt/dir_destino}"
IGNORE_GLOB="${IGNORE_GLOB-${DEFAULT_IGNORE_GLOB}}"
SCAN_SETTLE_SECONDS="${SCAN_SETTLE_SECONDS:-5}"
METRICS_TEXTFILE_DIR="${METRICS_TEXTFILE_DIR:-}"
METRICS_INTERVAL_SECONDS="${METRICS_INTERVAL_SECONDS:-10}"
MOVER_NAME="${MOVER_NAME:-}"
readonly IGNORE_GLOB SCAN_SETTLE_SECONDS METRICS_TEXTFILE_DIR
readonly METRICS_INTERVAL_SECONDS MOVER_NAME

# Set once by prepare_directories.
same_mount=0
claim_dir=""
staging_dir=""
metrics_file=""
saved_umask=""

watch_fd=""
watch_pid=""
# "python3" once the rename helper answered (coprocess RENAME_HELPER).
renamer="mv"

# Names waiting for the next flush, and the set that keeps them unique.
batch=()
declare -A batch_seen=()
# Subdirectories and special files already logged once.
declare -A reported=()
# Names this process renamed back into SRC_DIR after a failure: their
# moved_to event is its own, not news (1 = one event to swallow).
declare -A own_renames=()

moved_total=0
renamed_total=0
errors_total=0
skipped_total=0
overflows_total=0
last_move_time=0
start_time="${EPOCHSECONDS}"
waiting_files=0

metrics_dirty=1
metrics_due_us=0
settle_due_us=0

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
}

# Sets REPLY to $1 as a log value (see "Log" in the header).
quote_value() {
  local value="$1"
  if [[ -n "${value}" && "${value}" != *[!A-Za-z0-9._/:@+,%~-]* ]]; then
    REPLY="${value}"
    return 0
  fi
  if [[ "${value}" != *[!\ -~]* ]]; then
    value="${value//\\/\\\\}"
    REPLY="\"${value//\"/\\\"}\""
    return 0
  fi
  local out="" char hex i
  for (( i = 0; i < ${#value}; i++ )); do
    char="${value:i:1}"
    case "${char}" in
      '"' | \\) out+="\\${char}" ;;
      [\ -~]) out+="${char}" ;;
      *)
        printf -v hex '\\x%02X' "'${char}"
        out+="${hex}"
        ;;
    esac
  done
  REPLY="\"${out}\""
}

# log_event STREAM EVENT [KEY VALUE]...: one key=value line.
log_event() {
  local stream="$1" line="event=$2"
  shift 2
  while (( $# >= 2 )); do
    quote_value "$2"
    line+=" $1=${REPLY}"
    shift 2
  done
  if [[ "${stream}" == out ]]; then
    printf '%s\n' "${line}"
  else
    printf '%s\n' "${line}" >&2
  fi
}

# die STATUS REASON MESSAGE: log event=fatal and exit.
die() {
  log_event err fatal reason "$2" msg "$3"
  exit "$1"
}

log_error() {
  errors_total=$(( errors_total + 1 ))
  metrics_dirty=1
  log_event err error "$@"
}

is_uint() {
  [[ "$1" =~ ^[0-9]+$ ]]
}

check_configuration() {
  local name value
  for name in SCAN_SETTLE_SECONDS METRICS_INTERVAL_SECONDS; do
    value="${!name}"
    is_uint "${value}" || die 3 config "${name} must be a whole number"
  done
  (( METRICS_INTERVAL_SECONDS > 0 )) \
    || die 3 config "METRICS_INTERVAL_SECONDS must be at least 1"

  command -v inotifywait >/dev/null \
    || die 3 config "inotifywait not found (install inotify-tools)"

  check_directory 3 SRC_DIR "${SRC_DIR}"
  check_directory 3 DEST_DIR "${DEST_DIR}"
  [[ ! "${SRC_DIR}" -ef "${DEST_DIR}" ]] \
    || die 3 config "SRC_DIR and DEST_DIR are the same directory"
  if [[ -n "${METRICS_TEXTFILE_DIR}" ]]; then
    check_directory 3 METRICS_TEXTFILE_DIR "${METRICS_TEXTFILE_DIR}"
  fi
}

# check_directory STATUS VARIABLE PATH: exit with STATUS unless PATH is
# a directory this process may list, enter and change.
check_directory() {
  local status="$1" variable="$2" path="$3" reason=config
  (( status == 3 )) || reason=directory_unusable
  [[ -e "${path}" ]] \
    || die "${status}" "${reason}" "${variable} ${path} does not exist"
  [[ -d "${path}" ]] \
    || die "${status}" "${reason}" "${variable} ${path} is not a directory"
  [[ -r "${path}" && -w "${path}" && -x "${path}" ]] \
    || die "${status}" "${reason}" \
      "${variable} ${path} is not readable and writable by this process"
}

# Reads the mount id of directory $1 from /proc; prints nothing if the
# kernel does not say.
mount_id() {
  local fd key value
  exec {fd}<"$1"
  while read -r key value; do
    if [[ "${key}" == mnt_id: ]]; then
      printf '%s\n' "${value}"
      break
    fi
  done <"/proc/self/fdinfo/${fd}"
  exec {fd}<&-
}

trim_trailing_slashes() {
  local path="$1"
  while [[ "${path}" == ?*/ ]]; do
    path="${path%/}"
  done
  REPLY="${path}"
}

prepare_directories() {
  trim_trailing_slashes "${SRC_DIR}"
  SRC_DIR="${REPLY}"
  trim_trailing_slashes "${DEST_DIR}"
  DEST_DIR="${REPLY}"
  # find and inotifywait would read a leading - or @ as an option.
  [[ "${SRC_DIR}" == /* ]] || SRC_DIR="./${SRC_DIR}"
  [[ "${DEST_DIR}" == /* ]] || DEST_DIR="./${DEST_DIR}"
  readonly SRC_DIR DEST_DIR

  local src_mount dest_mount identity
  src_mount="$(mount_id "${SRC_DIR}")"
  dest_mount="$(mount_id "${DEST_DIR}")"
  if [[ -n "${src_mount}" && "${src_mount}" == "${dest_mount}" ]]; then
    same_mount=1
  fi

  # Named after the source directory, so that movers sharing a
  # destination never touch each other's unfinished copies.
  identity="$(stat -L -c '%d-%i' -- "${SRC_DIR}")"
  claim_dir="${SRC_DIR}/${OWN_PREFIX}${identity}"
  staging_dir="${DEST_DIR}/${OWN_PREFIX}${identity}"

  if [[ -n "${METRICS_TEXTFILE_DIR}" ]]; then
    local safe_name="${MOVER_NAME//[!A-Za-z0-9_.-]/_}"
    metrics_file="${METRICS_TEXTFILE_DIR}/move_arquivo${safe_name:+_}"
    metrics_file+="${safe_name}.prom"
  fi
}

ensure_hidden_directories() {
  local dir
  for dir in "${claim_dir}" "${staging_dir}"; do
    [[ -d "${dir}" ]] || mkdir -m 0700 -- "${dir}"
  done
}

# relay_watcher_messages: inotifywait's stderr. Turns its "Watches
# established." into the READY record of the event stream and logs
# everything else.
relay_watcher_messages() {
  local line
  while IFS= read -r line; do
    case "${line}" in
      'Watches established.') printf 'READY \0' ;;
      'Setting up watches.') ;;
      *) log_event err watcher_message msg "${line}" ;;
    esac
  done
}

start_watcher() {
  exec {watch_fd}< <(
    exec inotifywait --monitor --format '%e %f%0' --no-newline \
      -e close_write -e moved_to -e create -e attrib \
      -e delete_self -e move_self -e unmount -e q_overflow \
      -- "${SRC_DIR}" 2> >(relay_watcher_messages)
  )
  watch_pid="$!"
}

stop_watcher() {
  [[ -n "${watch_pid}" ]] || return 0
  kill "${watch_pid}" 2>/dev/null || true
  watch_pid=""
}

is_ignored() {
  [[ "$1" == "${OWN_PREFIX}"* ]] && return 0
  # shellcheck disable=SC2053  # the right side is the glob
  [[ -n "${IGNORE_GLOB}" && "$1" == ${IGNORE_GLOB} ]]
}

add_to_batch() {
  [[ -n "${batch_seen[$1]+x}" ]] && return 0
  batch_seen[$1]=1
  batch+=("$1")
}

# report_once KIND NAME: log a file left in place, once per run.
report_once() {
  local key="$1/$2"
  [[ -n "${reported[${key}]+x}" ]] && return 0
  reported[${key}]=1
  skipped_total=$(( skipped_total + 1 ))
  metrics_dirty=1
  log_event out skipped src "${SRC_DIR}/$2" reason "$1"
}

# Classifies the batch and moves what can be moved.
flush_batch() {
  (( ${#batch[@]} > 0 )) || return 0
  local name path
  local -a movable=()
  for name in "${batch[@]}"; do
    path="${SRC_DIR}/${name}"
    if is_ignored "${name}"; then
      continue
    elif [[ -L "${path}" || -f "${path}" ]]; then
      movable+=("${name}")
    elif [[ -d "${path}" ]]; then
      report_once directory "${name}"
    elif [[ -p "${path}" ]]; then
      report_once fifo "${name}"
    elif [[ -S "${path}" ]]; then
      report_once socket "${name}"
    elif [[ -e "${path}" ]]; then
      report_once device "${name}"
    fi
  done
  batch=()
  batch_seen=()
  (( ${#movable[@]} > 0 )) || return 0

  if (( same_mount )); then
    rename_files "${SRC_DIR}" "${movable[@]}"
  else
    copy_files "${SRC_DIR}" "${movable[@]}"
  fi
}

exists() {
  [[ -e "$1" || -L "$1" ]]
}

# numbered_name NAME N: sets REPLY to STEM.N.EXT, cut to 255 bytes.
numbered_name() {
  local name="$1" number="$2" stem="$1" ext="" excess
  if [[ "${name}" == ?*.* ]]; then
    stem="${name%.*}"
    ext=".${name##*.}"
  fi
  REPLY="${stem}.${number}${ext}"
  excess=$(( ${#REPLY} - 255 ))
  (( excess > 0 )) || return 0
  if (( ${#stem} > excess )); then
    stem="${stem:0:${#stem}-excess}"
  else
    stem="${name:0:255-${#number}-1}"
    ext=""
  fi
  REPLY="${stem}.${number}${ext}"
}

# record_move EVENT SRC DEST: count and log one delivery; EVENT is
# "moved" or "renamed".
record_move() {
  moved_total=$(( moved_total + 1 ))
  last_move_time="${EPOCHSECONDS}"
  metrics_dirty=1
  if [[ "$1" == renamed ]]; then
    renamed_total=$(( renamed_total + 1 ))
    log_event out renamed src "$2" dest "$3" reason exists
  elif [[ "$2$3" != *[!A-Za-z0-9._/:@+,%~-]* ]]; then
    printf 'event=moved src=%s dest=%s\n' "$2" "$3"
  else
    log_event out moved src "$2" dest "$3"
  fi
}

check_destination() {
  check_directory 1 DEST_DIR "${DEST_DIR}"
}

# place_numbered TOOL FROM NAME: put FROM (a file named NAME in SRC_DIR)
# at the first free numbered name. TOOL is "mv" (rename, removes FROM)
# or "ln" (hard link, keeps FROM). Returns 1 after logging an error.
place_numbered() {
  local tool="$1" from="$2" name="$3" number output dest
  for (( number = 1; number <= NUMBERED_NAME_LIMIT; number++ )); do
    numbered_name "${name}" "${number}"
    dest="${DEST_DIR}/${REPLY}"
    exists "${dest}" && continue
    if [[ "${tool}" == mv ]]; then
      output="$(mv -n -T -- "${from}" "${dest}" 2>&1)" || true
      exists "${from}" || break
    elif output="$(ln -P -T -- "${from}" "${dest}" 2>&1)"; then
      break
    fi
    # Lost a race for this name: try the next one.
    exists "${dest}" && continue
    log_error op place src "${SRC_DIR}/${name}" msg "${output:-failed}"
    return 1
  done
  if (( number > NUMBERED_NAME_LIMIT )); then
    log_error op place src "${SRC_DIR}/${name}" msg "no free numbered name"
    return 1
  fi
  record_move renamed "${SRC_DIR}/${name}" "${dest}"
}

# place_failed TOOL FROM NAME: FROM could not be placed as DEST_DIR/NAME.
place_failed() {
  local tool="$1" from="$2" name="$3" dest="${DEST_DIR}/$3" output
  if exists "${dest}"; then
    place_numbered "${tool}" "${from}" "${name}"
    return
  fi
  check_destination
  if [[ "${tool}" == mv ]]; then
    output="$(mv -n -T -- "${from}" "${dest}" 2>&1)" || true
    if ! exists "${from}"; then
      record_move moved "${SRC_DIR}/${name}" "${dest}"
      return 0
    fi
  elif output="$(ln -P -T -- "${from}" "${dest}" 2>&1)"; then
    record_move moved "${SRC_DIR}/${name}" "${dest}"
    return 0
  fi
  if exists "${dest}"; then
    place_numbered "${tool}" "${from}" "${name}"
    return
  fi
  log_error op place src "${SRC_DIR}/${name}" msg "${output:-failed}"
  return 1
}

# rename_files DIR NAME...: same mount; one rename(2) per file that
# refuses to replace, done by the rename helper or else by mv.
rename_files() {
  local from_dir="$1" name index=0
  shift
  local -a answers=()
  helper_rename "${from_dir}" "$@" || mv_rename "${from_dir}" "$@"

  for name; do
    if [[ "${answers[index]}" == 0 ]]; then
      record_move moved "${SRC_DIR}/${name}" "${DEST_DIR}/${name}"
    elif exists "${from_dir}/${name}"; then
      place_failed mv "${from_dir}/${name}" "${name}" || true
    fi
    index=$(( index + 1 ))
  done
}

# helper_rename DIR NAME...: each DIR/NAME to DEST_DIR/NAME by the
# rename helper; sets "answers" to its errno per name (0: moved).
# Returns 1 if no helper runs, or it quit (then it is not used again).
helper_rename() {
  [[ "${renamer}" == python3 ]] || return 1
  local from_dir="$1" name
  local request_fd="${RENAME_HELPER[1]:-}" answer_fd="${RENAME_HELPER[0]:-}"
  shift
  local -a pairs=()
  for name; do
    pairs+=("${from_dir}/${name}" "${DEST_DIR}/${name}")
  done
  if [[ -n "${request_fd}" ]] \
    && printf '%s\0%s\0' "${pairs[@]}" 2>/dev/null 1>&"${request_fd}" \
    && mapfile -t -n "$#" -u "${answer_fd}" answers \
    && (( ${#answers[@]} == $# )); then
    return 0
  fi
  stop_rename_helper
  log_error op rename_helper msg "the rename helper quit; using mv"
  return 1
}

# mv_rename DIR NAME...: the same with one mv -n (RENAME_NOREPLACE) for
# all names. mv does not say which failed, so "answers" is read off the
# directories: a name free in DEST_DIR before and taken after was moved
# (even if a new file has taken its place in DIR meanwhile); a file
# still in DIR was not (1); one in neither place is gone (2).
mv_rename() {
  local from_dir="$1" name index=0
  shift
  local -a paths=() taken=()
  for name; do
    paths+=("${from_dir}/${name}")
    if exists "${DEST_DIR}/${name}"; then taken+=(1); else taken+=(0); fi
  done
  mv -n -t "${DEST_DIR}" -- "${paths[@]}" 2>/dev/null || true

  answers=()
  for name; do
    if (( taken[index] == 0 )) && exists "${DEST_DIR}/${name}"; then
      answers+=(0)
    elif exists "${from_dir}/${name}"; then
      answers+=(1)
    else
      answers+=(2)
    fi
    index=$(( index + 1 ))
  done
}

# claim_files NAME...: rename each file from SRC_DIR into claim_dir, so
# that nothing else can replace it while it is copied. Prints nothing;
# sets the array "claimed" to the names that were claimed.
claim_files() {
  local name
  local -a paths=()
  claimed=()
  ensure_hidden_directories
  for name; do
    paths+=("${SRC_DIR}/${name}")
  done
  mv -n -t "${claim_dir}" -- "${paths[@]}" 2>/dev/null || true
  for name; do
    if exists "${claim_dir}/${name}"; then
      claimed+=("${name}")
    elif exists "${SRC_DIR}/${name}"; then
      log_error op claim src "${SRC_DIR}/${name}" \
        msg "cannot rename into ${claim_dir}"
    fi
  done
}

# stage_files NAME...: copy claimed files into staging_dir; sets the
# array "staged" to the names whose copy is complete and on disk.
stage_files() {
  local name output
  local -a paths=() regular=()
  staged=()
  for name; do
    paths+=("${claim_dir}/${name}")
  done
  if cp -P --preserve=mode,ownership,timestamps --remove-destination \
    -t "${staging_dir}" -- "${paths[@]}" 2>/dev/null; then
    staged=("$@")
  else
    # Something failed: redo one by one to know which, and why.
    check_destination
    for name; do
      if output="$(cp -P --preserve=mode,ownership,timestamps \
        --remove-destination -T -- "${claim_dir}/${name}" \
        "${staging_dir}/${name}" 2>&1)"; then
        staged+=("${name}")
      else
        rm -f -- "${staging_dir}/${name}"
        log_error op copy src "${SRC_DIR}/${name}" msg "${output}"
      fi
    done
  fi

  for name in "${staged[@]}"; do
    [[ -L "${staging_dir}/${name}" ]] || regular+=("${staging_dir}/${name}")
  done
  (( ${#regular[@]} == 0 )) && return 0
  if ! output="$(sync -d -- "${regular[@]}" 2>&1)"; then
    log_error op fsync dest "${staging_dir}" msg "${output}"
    staged=()
  fi
}

# copy_files DIR NAME...: different mounts. DIR is SRC_DIR (claim first)
# or claim_dir (recovery). Claim, copy, fsync, link into place, fsync
# the destination directory, then remove the claimed and staged names.
copy_files() {
  local from_dir="$1" name staged_path output
  shift
  local -a claimed=() staged=() placed=() done_paths=()
  local -A placed_set=()
  if [[ "${from_dir}" == "${SRC_DIR}" ]]; then
    claim_files "$@"
  else
    claimed=("$@")
  fi
  (( ${#claimed[@]} > 0 )) || return 0
  stage_files "${claimed[@]}"

  # One ln for the regular files; -ef follows symbolic links, so those
  # are linked one by one and judged by ln's status.
  for name in "${staged[@]}"; do
    [[ -L "${staging_dir}/${name}" ]] || placed+=("${staging_dir}/${name}")
  done
  if (( ${#placed[@]} > 0 )); then
    ln -P -t "${DEST_DIR}" -- "${placed[@]}" 2>/dev/null || true
  fi
  placed=()
  for name in "${staged[@]}"; do
    staged_path="${staging_dir}/${name}"
    if [[ ! -L "${staged_path}" \
      && "${staged_path}" -ef "${DEST_DIR}/${name}" ]]; then
      record_move moved "${SRC_DIR}/${name}" "${DEST_DIR}/${name}"
    elif ! place_failed ln "${staged_path}" "${name}"; then
      continue
    fi
    placed+=("${name}")
    placed_set[${name}]=1
  done
  for name in "${claimed[@]}"; do
    [[ -n "${placed_set[${name}]+x}" ]] || unclaim "${name}"
  done
  (( ${#placed[@]} > 0 )) || return 0

  if ! output="$(sync -- "${DEST_DIR}" 2>&1)"; then
    log_error op fsync dest "${DEST_DIR}" msg "${output}"
  fi
  for name in "${placed[@]}"; do
    done_paths+=("${claim_dir}/${name}" "${staging_dir}/${name}")
  done
  if ! output="$(rm -f -- "${done_paths[@]}" 2>&1)"; then
    log_error op remove src "${claim_dir}" msg "${output}"
  fi
}

# unclaim NAME: a claimed file that could not be delivered goes back to
# SRC_DIR (unless that name was taken meanwhile) and its copy is dropped.
# It is tried again on its next event from a writer, scan or start.
unclaim() {
  rm -f -- "${staging_dir}/$1"
  mv -n -T -- "${claim_dir}/$1" "${SRC_DIR}/$1" 2>/dev/null || true
  if exists "${claim_dir}/$1"; then
    log_error op unclaim src "${SRC_DIR}/$1" \
      msg "left in ${claim_dir}; retried at next start"
  else
    own_renames[$1]=1
  fi
}

# Finishes what a killed run left in the hidden directories: a staged
# copy with a second link is already in place (only the claimed original
# is left to remove); anything else is delivered again from the claim.
recover_interrupted_moves() {
  [[ -d "${claim_dir}" || -d "${staging_dir}" ]] || return 0
  ensure_hidden_directories
  local name dest
  local -a pending=()
  declare -A linked=()
  while IFS= read -r -d '' name; do
    linked[${name}]=1
  done < <(find -H "${staging_dir}" -mindepth 1 -maxdepth 1 -links +1 \
    -printf '%f\0')

  while IFS= read -r -d '' name; do
    if [[ -n "${linked[${name}]+x}" ]]; then
      dest="$(find -H "${DEST_DIR}" -mindepth 1 -maxdepth 1 \
        -samefile "${staging_dir}/${name}" -print -quit)"
      log_event out recovered src "${SRC_DIR}/${name}" dest "${dest}"
      rm -f -- "${claim_dir}/${name}"
    else
      pending+=("${name}")
    fi
  done < <(find -H "${claim_dir}" -mindepth 1 -maxdepth 1 \
    -printf '%f\0')

  find -H "${staging_dir}" -mindepth 1 -maxdepth 1 -delete
  (( ${#pending[@]} > 0 )) || return 0
  if (( same_mount )); then
    rename_files "${claim_dir}" "${pending[@]}"
  else
    copy_files "${claim_dir}" "${pending[@]}"
  fi
}

# scan_source: queue every settled file in SRC_DIR; arm the settle
# timer if some were too fresh to trust.
scan_source() {
  local record kind changed name deferred=0 settle_before
  settle_before=$(( EPOCHSECONDS - SCAN_SETTLE_SECONDS ))
  while IFS= read -r -d '' record; do
    kind="${record%% *}"
    record="${record#* }"
    changed="${record%% *}"
    name="${record#* }"
    if [[ "${kind}" == f ]] && (( ${changed%.*} > settle_before )); then
      is_ignored "${name}" || deferred=1
      continue
    fi
    add_to_batch "${name}"
    (( ${#batch[@]} < BATCH_MAX )) || flush_batch
  done < <(find -H "${SRC_DIR}" -mindepth 1 -maxdepth 1 \
    -printf '%y %C@ %f\0' 2>/dev/null)
  # find also fails when a file vanishes under it; only an unusable
  # directory is fatal.
  wait "$!" || check_source
  flush_batch

  settle_due_us=0
  if (( deferred )); then
    settle_due_us=$(( ${EPOCHREALTIME/./} + SCAN_SETTLE_SECONDS * 1000000
      + 1000000 ))
  fi
}

# Keeps the waiting count and the age of the oldest waiting file.
count_waiting() {
  local changed oldest=""
  waiting_files=0
  while IFS= read -r -d '' changed; do
    waiting_files=$(( waiting_files + 1 ))
    changed="${changed%.*}"
    if [[ -z "${oldest}" ]] || (( changed < oldest )); then
      oldest="${changed}"
    fi
  done < <(find -H "${SRC_DIR}" -mindepth 1 -maxdepth 1 ! -type d \
    -printf '%T@\0' 2>/dev/null)
  REPLY=0
  [[ -z "${oldest}" ]] || REPLY=$(( EPOCHSECONDS - oldest ))
  (( REPLY >= 0 )) || REPLY=0
}

write_metrics() {
  [[ -n "${metrics_file}" ]] || return 0
  local label="${MOVER_NAME//[!A-Za-z0-9_.@-]/_}" oldest_age text
  label="mover=\"${label:-default}\""
  count_waiting
  oldest_age="${REPLY}"
  printf -v text '%s\n' \
    "# HELP move_arquivo_moved_files_total Files moved into DEST_DIR." \
    "# TYPE move_arquivo_moved_files_total counter" \
    "move_arquivo_moved_files_total{${label}} ${moved_total}" \
    "# HELP move_arquivo_renamed_files_total Moves to a numbered name." \
    "# TYPE move_arquivo_renamed_files_total counter" \
    "move_arquivo_renamed_files_total{${label}} ${renamed_total}" \
    "# HELP move_arquivo_errors_total Failed operations (event=error)." \
    "# TYPE move_arquivo_errors_total counter" \
    "move_arquivo_errors_total{${label}} ${errors_total}" \
    "# HELP move_arquivo_skipped_files_total Entries left in place." \
    "# TYPE move_arquivo_skipped_files_total counter" \
    "move_arquivo_skipped_files_total{${label}} ${skipped_total}" \
    "# HELP move_arquivo_overflows_total Inotify queue overflows." \
    "# TYPE move_arquivo_overflows_total counter" \
    "move_arquivo_overflows_total{${label}} ${overflows_total}" \
    "# HELP move_arquivo_waiting_files Non-directories in SRC_DIR." \
    "# TYPE move_arquivo_waiting_files gauge" \
    "move_arquivo_waiting_files{${label}} ${waiting_files}" \
    "# HELP move_arquivo_oldest_waiting_file_age_seconds Age of oldest." \
    "# TYPE move_arquivo_oldest_waiting_file_age_seconds gauge" \
    "move_arquivo_oldest_waiting_file_age_seconds{${label}} ${oldest_age}" \
    "# HELP move_arquivo_last_move_timestamp_seconds Time of last move." \
    "# TYPE move_arquivo_last_move_timestamp_seconds gauge" \
    "move_arquivo_last_move_timestamp_seconds{${label}} ${last_move_time}" \
    "# HELP move_arquivo_start_timestamp_seconds Time this run started." \
    "# TYPE move_arquivo_start_timestamp_seconds gauge" \
    "move_arquivo_start_timestamp_seconds{${label}} ${start_time}" \
    "# HELP move_arquivo_metrics_timestamp_seconds Time of this write." \
    "# TYPE move_arquivo_metrics_timestamp_seconds gauge" \
    "move_arquivo_metrics_timestamp_seconds{${label}} ${EPOCHSECONDS}"

  local temporary="${metrics_file}.$$.tmp"
  umask 022
  if printf '%s' "${text}" >"${temporary}" \
    && mv -f -- "${temporary}" "${metrics_file}"; then
    :
  else
    rm -f -- "${temporary}"
    log_error op metrics dest "${metrics_file}" msg "cannot write"
  fi
  umask "${saved_umask}"
  # The age of a waiting file grows without events: keep refreshing.
  metrics_dirty=0
  (( waiting_files == 0 )) || metrics_dirty=1
}

maybe_write_metrics() {
  [[ -n "${metrics_file}" ]] && (( metrics_dirty )) || return 0
  local now="${EPOCHREALTIME/./}"
  (( now >= metrics_due_us )) || return 0
  write_metrics
  metrics_due_us=$(( now + METRICS_INTERVAL_SECONDS * 1000000 ))
}

# Sets REPLY to the read timeout in seconds until the next timer, or
# to "" when nothing is due: then the loop sleeps in read(2).
next_timeout() {
  local due=0 left
  if [[ -n "${metrics_file}" ]] && (( metrics_dirty )); then
    due="${metrics_due_us}"
  fi
  if (( settle_due_us > 0 )) && (( due == 0 || settle_due_us < due )); then
    due="${settle_due_us}"
  fi
  REPLY=""
  (( due > 0 )) || return 0
  left=$(( due - ${EPOCHREALTIME/./} ))
  (( left > 1000 )) || left=1000
  printf -v REPLY '%d.%06d' $(( left / 1000000 )) $(( left % 1000000 ))
}

run_due_timers() {
  if (( settle_due_us > 0 )) && (( ${EPOCHREALTIME/./} >= settle_due_us ))
  then
    scan_source
  fi
}

on_overflow() {
  overflows_total=$(( overflows_total + 1 ))
  metrics_dirty=1
  log_event out overflow action rescan
  flush_batch
  scan_source
}

# start_rename_helper: on one mount, run RENAME_HELPER_PROGRAM as a
# coprocess; keep mv if it does not say "ready" in time.
start_rename_helper() {
  (( same_mount )) && command -v python3 >/dev/null || return 0
  local greeting=""
  # Not exec'd: this subshell, its stderr discarded, absorbs a death of
  # the helper by a signal, which bash reports on stderr (the log).
  coproc RENAME_HELPER {
    exec {watch_fd}<&- 2>/dev/null
    python3 -I -S -c "${RENAME_HELPER_PROGRAM}"
  }
  if read -r -t "${RENAME_HELPER_START_SECONDS}" \
    -u "${RENAME_HELPER[0]}" greeting && [[ "${greeting}" == ready ]]; then
    renamer="python3"
  else
    stop_rename_helper
  fi
}

# Bash closes the coprocess's pipes and unsets RENAME_HELPER when it
# reaps the helper.
stop_rename_helper() {
  renamer="mv"
  local pid="${RENAME_HELPER_PID:-}"
  [[ -z "${pid}" ]] || kill "${pid}" 2>/dev/null || true
}

# move_lone_file NAME: the common case, a file closed after writing
# with nothing else pending, skips the batch; what it cannot rename
# alone goes through the batch.
move_lone_file() {
  local path="${SRC_DIR}/$1"
  if (( same_mount )) && [[ ! -L "${path}" && -f "${path}" ]] \
    && ! is_ignored "$1"; then
    rename_files "${SRC_DIR}" "$1"
  else
    add_to_batch "$1"
  fi
}

# handle_record RECORD: one "EVENTS NAME" record from inotifywait other
# than a file's CREATE and CLOSE_WRITE (see watch_events).
handle_record() {
  local events="${1%% *}" name="${1#* }"
  case "${events}" in
    MOVED_TO)
      # A failed file put back must wait for news, or it would loop.
      if [[ "${own_renames[${name}]:-0}" == 1 ]]; then
        own_renames[${name}]=0
      else
        add_to_batch "${name}"
      fi
      ;;
    READY)
      if (( same_mount )); then
        log_event out started src_dir "${SRC_DIR}" dest_dir "${DEST_DIR}" \
          mode rename renamer "${renamer}"
      else
        log_event out started src_dir "${SRC_DIR}" dest_dir "${DEST_DIR}" \
          mode copy
      fi
      recover_interrupted_moves
      scan_source
      ;;
    *Q_OVERFLOW*) on_overflow ;;
    *DELETE_SELF* | *MOVE_SELF* | *UNMOUNT*) source_gone ;;
    *ATTRIB*)
      # Only the directory's own changes matter (mode, owner, removal).
      [[ -n "${name}" ]] || check_source
      ;;
    *) [[ -z "${name}" ]] || add_to_batch "${name}" ;;
  esac
}

# The watch ends for the directory itself: it was deleted, renamed or
# unmounted; the inotify events do not always arrive in that order.
source_gone() {
  die 1 source_gone \
    "SRC_DIR ${SRC_DIR} is gone (deleted, moved away or unmounted)"
}

check_source() {
  [[ -e "${SRC_DIR}" ]] || source_gone
  check_directory 1 SRC_DIR "${SRC_DIR}"
}

watcher_ended() {
  local status=0
  wait "${watch_pid}" || status=$?
  watch_pid=""
  check_source
  die 1 watcher_exited "inotifywait exited with status ${status}"
}

watch_events() {
  local record partial="" status path
  while true; do
    next_timeout
    status=0
    if [[ -n "${REPLY}" ]]; then
      IFS= read -r -d '' -t "${REPLY}" -u "${watch_fd}" record || status=$?
    else
      IFS= read -r -d '' -u "${watch_fd}" record || status=$?
    fi

    if (( status == 0 )); then
      record="${partial}${record}"
      partial=""
      # Every file brings two records: they are handled here, in line.
      while true; do
        case "${record}" in
          'CLOSE_WRITE,CLOSE '*)
            if (( ${#batch[@]} == 0 )) && ! read -r -t 0 -u "${watch_fd}"
            then
              move_lone_file "${record#* }"
              break
            fi
            add_to_batch "${record#* }"
            ;;
          'CREATE '*)
            # A regular file is moved when closed; links and special
            # files never get a close event.
            path="${SRC_DIR}/${record#* }"
            [[ ! -L "${path}" && -f "${path}" ]] \
              || add_to_batch "${record#* }"
            ;;
          *) handle_record "${record}" ;;
        esac
        if (( ${#batch[@]} >= BATCH_MAX )) \
          || ! read -r -t 0 -u "${watch_fd}"; then
          break
        fi
        IFS= read -r -d '' -u "${watch_fd}" record || break
      done
      flush_batch
    elif (( status > 128 )); then
      partial+="${record}"
      run_due_timers
    else
      watcher_ended
    fi
    maybe_write_metrics
  done
}

on_exit() {
  local status=$?
  set +e
  stop_watcher
  stop_rename_helper
  metrics_dirty=1
  [[ -z "${metrics_file}" || -z "${saved_umask}" ]] || write_metrics
  exit "${status}"
}

on_signal() {
  log_event out stopped signal "$1"
  exit 0
}

main() {
  case "${1:-}" in
    -h | --help)
      usage
      return 0
      ;;
    "") ;;
    *)
      printf 'move_arquivos.sh: unknown argument (try --help)\n' >&2
      return 2
      ;;
  esac

  shopt -s extglob nocasematch
  check_configuration
  prepare_directories
  saved_umask="$(umask)"
  trap on_exit EXIT
  trap 'on_signal TERM' TERM
  trap 'on_signal INT' INT
  trap 'on_signal HUP' HUP
  # A write to a rename helper that has just died fails (and mv takes
  # over) instead of killing the shell. Children keep the default.
  trap : PIPE

  start_watcher
  # After the watcher, so that none of its processes holds the helper's
  # pipe: the helper sees end-of-file and exits when this shell dies.
  start_rename_helper
  maybe_write_metrics
  watch_events
}

main "$@"
