#!/usr/bin/env bash
# Stop the Ray processes that cluster/start-local.sh started (and only those): every process whose
# command line names the recorded temp dir or GCS address, and all their descendants.
set -euo pipefail
STATE="${UNIONCAM_RAY_STATE:-.ray-local}"
[[ -f "$STATE/temp_dir" ]] || { echo "nothing recorded in $STATE" >&2; exit 0; }
temp="$(cat "$STATE/temp_dir")"
port="$(cut -d: -f2 "$STATE/address")"

ours() {
  local roots=() pid
  for pid in $(ls /proc | grep -E '^[0-9]+$'); do
    [[ "$pid" == "$$" || "$pid" == "$BASHPID" ]] && continue
    if tr '\0' '\n' < "/proc/$pid/cmdline" 2>/dev/null | grep -q -e "$temp" -e ":$port\$"; then
      roots+=("$pid")
    fi
  done
  local all=("${roots[@]}") frontier=("${roots[@]}") next child
  while ((${#frontier[@]})); do
    next=()
    for pid in "${frontier[@]}"; do
      for child in $(pgrep -P "$pid" 2>/dev/null || true); do all+=("$child"); next+=("$child"); done
    done
    frontier=("${next[@]}")
  done
  printf '%s\n' "${all[@]}" | sort -u
}

for signal in TERM KILL; do
  pids="$(ours)"
  [[ -z "$pids" ]] && break
  # shellcheck disable=SC2086
  kill -s "$signal" $pids 2>/dev/null || true
  sleep 5
done
rm -rf "$temp" "$STATE/temp_dir" "$STATE/address" "$STATE/dashboard"
echo "unioncam: stopped the Ray cluster recorded in $STATE"
