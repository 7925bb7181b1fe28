#!/usr/bin/env bash
# Start a Ray head on loopback (127.0.0.1), or join one more node to it, for unioncam jobs.
#
#   cluster/start-local.sh [RAY START ARGS...]          # head: prints the dashboard address
#   cluster/start-local.sh --join [RAY START ARGS...]   # another node on this machine
#   cluster/stop-local.sh                               # stops exactly what these started
#
# State (addresses, the Ray temp dir) lives in $UNIONCAM_RAY_STATE (default .ray-local/). Every
# port is picked free, so this never collides with another Ray on the machine. Token auth is on
# (RAY_AUTH_MODE=token): drivers and `ray job` on this machine read the token from ~/.ray/auth_token
# but need RAY_AUTH_MODE=token in their environment too.
set -euo pipefail
STATE="${UNIONCAM_RAY_STATE:-.ray-local}"
RAY="${RAY:-ray}"
PYTHON="${PYTHON:-python}"
export RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=0
mkdir -p "$STATE"

free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
node_ports() {
  for name in dashboard-agent-listen-port dashboard-agent-grpc-port runtime-env-agent-port \
              metrics-export-port node-manager-port object-manager-port; do
    printf -- "--%s=%s " "$name" "$(free_port)"
  done
}

if [[ "${1:-}" == "--join" ]]; then
  shift
  [[ -f "$STATE/address" ]] || { echo "no head recorded in $STATE: run cluster/start-local.sh first" >&2; exit 2; }
  # shellcheck disable=SC2046
  "$RAY" start --address="$(cat "$STATE/address")" --node-ip-address=127.0.0.1 --disable-usage-stats \
    $(node_ports) "$@"
  exit 0
fi

if [[ -f "$STATE/address" ]]; then
  echo "a head is already recorded in $STATE ($(cat "$STATE/address")): run cluster/stop-local.sh first" >&2
  exit 2
fi
temp="$(mktemp -d /tmp/unioncam-ray-XXXXXX)"  # short: Ray's socket paths must stay under 107 bytes
gcs="$(free_port)"; dashboard="$(free_port)"
# shellcheck disable=SC2046
"$RAY" start --head --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1 --port="$gcs" \
  --dashboard-port="$dashboard" --ray-client-server-port="$(free_port)" --temp-dir="$temp" \
  --include-dashboard=true --disable-usage-stats $(node_ports) "$@"
echo "$temp" > "$STATE/temp_dir"
echo "127.0.0.1:$gcs" > "$STATE/address"
echo "http://127.0.0.1:$dashboard" > "$STATE/dashboard"
echo "unioncam: Ray head on 127.0.0.1:$gcs; submit jobs with:"
echo "  RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:$dashboard --working-dir . -- python jobs/eval_imagenet.py ..."
