#!/usr/bin/env bash
# Start a Ray head on loopback (127.0.0.1), or join one more node to it, for unioncam jobs.
#
#   cluster/start-local.sh [RAY START ARGS...]          # head: prints the dashboard address
#   cluster/start-local.sh --join [RAY START ARGS...]   # another node on this machine
#   cluster/stop-local.sh                               # stops exactly what these started
#
# State (addresses, the Ray temp dir, env) lives in $UNIONCAM_RAY_STATE (default .ray-local/). Every
# port is picked free, so this never collides with another Ray on the machine.
#
# Token auth is on (RAY_AUTH_MODE=token). The token is Ray's usual one: $RAY_AUTH_TOKEN, else the
# file $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token, which the head creates (mode 0600, with Ray's own
# `ray get-auth-token --generate`) when none exists. Nodes joined here read the same file.
#
# Loopback only: Ray 2.60 replaces `--node-ip-address=127.0.0.1` by the host's address, and then
# binds the GCS, raylets, agents and workers to all interfaces, unless
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (its single-machine mode). With it, every Ray server listens on
# 127.0.0.1 only (tests/service/test_ray.py checks the sockets). Drivers on this machine need both settings
# too: `. .ray-local/env` exports them (no secret in it).
set -euo pipefail
STATE="${UNIONCAM_RAY_STATE:-.ray-local}"
RAY="${RAY:-ray}"
PYTHON="${PYTHON:-python}"
export RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=0 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
mkdir -p "$STATE"

free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
node_ports() {
  for name in dashboard-agent-listen-port dashboard-agent-grpc-port runtime-env-agent-port \
              metrics-export-port node-manager-port object-manager-port; do
    printf -- "--%s=%s " "$name" "$(free_port)"
  done
}

# The token this Ray will use exists (never printed). Only the head may create one: a joining node
# with another token could not talk to the head.
ensure_token() {
  [[ -n "${RAY_AUTH_TOKEN:-}" ]] && return 0
  if [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
    [[ -s "$RAY_AUTH_TOKEN_PATH" ]] && return 0
    echo "RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH is missing or empty" >&2
    exit 2
  fi
  local token="${HOME:?HOME must be set: the token lives in ~/.ray/auth_token}/.ray/auth_token" out
  [[ -s "$token" ]] && return 0
  if [[ "$1" != head ]]; then
    echo "no Ray auth token in $token: start the head with the same HOME first" >&2
    exit 2
  fi
  # Ray's generator (a 256-bit hex token) prints the token on stdout: discarded. umask: owner only.
  if ! out="$( (umask 077 && "$RAY" get-auth-token --generate 2>&1 >/dev/null) )"; then
    echo "$out" >&2
    exit 1
  fi
  chmod 600 "$token"
  echo "unioncam: created the Ray auth token $token (mode 0600)"
}

if [[ "${1:-}" == "--join" ]]; then
  shift
  [[ -f "$STATE/address" ]] || { echo "no head recorded in $STATE: run cluster/start-local.sh first" >&2; exit 2; }
  ensure_token join
  # `ray start --address` refuses to run in Ray's single-machine mode, and outside it turns
  # 127.0.0.1 into the host's address (which the loopback-only head does not listen on). So run the
  # same CLI with the refusal lifted for this one process and the address kept as given; the node's
  # processes still get RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 from the environment (loopback binds).
  # shellcheck disable=SC2046
  "$PYTHON" -c '
import sys

from ray._private import ray_constants, services

ray_constants.ENABLE_RAY_CLUSTER = True  # let this process join a node
services.resolve_ip_for_localhost = lambda host: host  # keep 127.0.0.1
from ray.scripts.scripts import main

sys.argv[0] = "ray"
sys.exit(main())' start --address="$(cat "$STATE/address")" --node-ip-address=127.0.0.1 \
    --disable-usage-stats $(node_ports) "$@"
  exit 0
fi

if [[ -f "$STATE/address" ]]; then
  echo "a head is already recorded in $STATE ($(cat "$STATE/address")): run cluster/stop-local.sh first" >&2
  exit 2
fi
ensure_token head
temp="$(mktemp -d /tmp/unioncam-ray-XXXXXX)"  # short: Ray's socket paths must stay under 107 bytes
gcs="$(free_port)"; dashboard="$(free_port)"
# The autoscaler's and the dashboard's metrics servers have fixed default ports (44217, 44227): pick free ones.
# shellcheck disable=SC2046
AUTOSCALER_METRIC_PORT="$(free_port)" DASHBOARD_METRIC_PORT="$(free_port)" \
"$RAY" start --head --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1 --port="$gcs" \
  --dashboard-port="$dashboard" --ray-client-server-port="$(free_port)" --temp-dir="$temp" \
  --include-dashboard=true --disable-usage-stats $(node_ports) "$@"
echo "$temp" > "$STATE/temp_dir"
echo "127.0.0.1:$gcs" > "$STATE/address"
echo "http://127.0.0.1:$dashboard" > "$STATE/dashboard"
echo "export RAY_AUTH_MODE=token RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0" > "$STATE/env"
echo "unioncam: Ray head on 127.0.0.1:$gcs (every Ray port on loopback); submit jobs with:"
echo "  . $STATE/env"
echo "  ray job submit --address http://127.0.0.1:$dashboard --working-dir . -- python jobs/eval_imagenet.py ..."
