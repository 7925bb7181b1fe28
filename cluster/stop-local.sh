#!/usr/bin/env bash
# Stop the Ray processes that cluster/start-local.sh started (and only those): every process whose
# command line names the recorded temp dir or GCS address, and all their descendants.
set -euo pipefail
STATE="${UNIONCAM_RAY_STATE:-.ray-local}"
[[ -f "$STATE/temp_dir" ]] || { echo "nothing recorded in $STATE" >&2; exit 0; }
temp="$(cat "$STATE/temp_dir")"
port="$(cut -d: -f2 "$STATE/address")"

ours() {
  # pid → parent pid for every process (from /proc/<pid>/stat: the field after "<comm>) <state>")
  declare -A parent=()
  local roots=() pid stat rest
  for dir in /proc/[0-9]*; do
    pid="${dir#/proc/}"
    [[ "$pid" == "$$" || "$pid" == "$BASHPID" ]] && continue
    stat="$(cat "$dir/stat" 2>/dev/null)" || continue
    rest="${stat##*) }"
    read -r _ ppid _ <<< "$rest"
    parent[$pid]="$ppid"
    if tr '\0' '\n' < "$dir/cmdline" 2>/dev/null | grep -q -e "$temp" -e ":$port\$"; then
      roots+=("$pid")
    fi
  done
  declare -A found=()
  for pid in "${roots[@]}"; do found[$pid]=1; done
  local grew=1
  while ((grew)); do
    grew=0
    for pid in "${!parent[@]}"; do
      if [[ -z "${found[$pid]:-}" && -n "${found[${parent[$pid]}]:-}" ]]; then found[$pid]=1; grew=1; fi
    done
  done
  printf '%s\n' "${!found[@]}"
}

for signal in TERM KILL; do
  pids="$(ours)"
  [[ -z "$pids" ]] && break
  # shellcheck disable=SC2086
  kill -s "$signal" $pids 2>/dev/null || true
  sleep 5
done
rm -rf "$temp" "$STATE/temp_dir" "$STATE/address" "$STATE/dashboard" "$STATE/env"
echo "unioncam: stopped the Ray cluster recorded in $STATE"
