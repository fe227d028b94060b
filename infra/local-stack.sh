#!/usr/bin/env bash
# The fleet's services on this machine, on 127.0.0.1 only: a Prefect server, a Ray head with its
# dashboard, and moto's in-memory S3 server. For trying deployments, triggers and S3 by hand.
#
#   infra/local-stack.sh start     # start what is not running; writes .osd-fleet/stack/env
#   source .osd-fleet/stack/env    # PREFECT_API_URL, RAY_ADDRESS, AWS_* for the local S3
#   infra/local-stack.sh status    # each service: pid, alive, answering
#   infra/local-stack.sh stop      # stop exactly what `start` started (by the pids it recorded)
#
# Prefect, S3 and Ray's dashboard listen on 127.0.0.1; Ray's GCS and raylet listen on every
# interface (Ray cannot bind them to loopback) and are protected by Ray 2.60's token auth.
#
# Each service runs in its own session (setsid), its pid in .osd-fleet/stack/<name>.pid; `stop`
# signals only those process groups, never processes found by name (`ray stop` would stop every
# Ray of this user on the machine). Ray keeps its files in its own temp dir
# (/tmp/osdf-ray-$UID), apart from any other Ray here. Ports: OSD_FLEET_PREFECT_PORT (4200), OSD_FLEET_RAY_PORT (6389),
# OSD_FLEET_DASHBOARD_PORT (8265), OSD_FLEET_S3_PORT (5055).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STACK="${OSD_FLEET_STACK_DIR:-$ROOT/.osd-fleet/stack}"
PY="${OSD_FLEET_PYTHON:-$ROOT/.venv/bin/python}"
BIN="$(dirname "$PY")"
HOST=127.0.0.1
PREFECT_PORT="${OSD_FLEET_PREFECT_PORT:-4200}"
RAY_PORT="${OSD_FLEET_RAY_PORT:-6389}"
DASHBOARD_PORT="${OSD_FLEET_DASHBOARD_PORT:-8265}"
S3_PORT="${OSD_FLEET_S3_PORT:-5055}"
S3_BUCKET="${OSD_FLEET_S3_BUCKET:-osd-fleet}"
SERVICES=(prefect ray s3)
# Ray's own files, apart from any other Ray here; short, since socket paths are limited to 107 bytes.
RAY_TMP="${OSD_FLEET_RAY_TMP:-${TMPDIR:-/tmp}/osdf-ray-$(id -u)}"

export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 RAY_USAGE_STATS_ENABLED=0

say() { printf 'local-stack: %s\n' "$*" >&2; }

pid_of() {  # the recorded pid of a service if that process is alive, else nothing
  local file="$STACK/$1.pid"
  [[ -f "$file" ]] || return 1
  local pid
  pid="$(cat "$file")"
  [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

launch() {  # launch NAME LOG COMMAND...: in a new session, pid recorded
  local name="$1" log="$2"
  shift 2
  setsid "$@" >>"$log" 2>&1 < /dev/null &
  echo $! >"$STACK/$name.pid"
}

probe() {  # probe URL [BEARER]: HTTP status < 500 within 2 s
  "$PY" - "$@" <<'EOF'
import sys, urllib.request, urllib.error
request = urllib.request.Request(sys.argv[1])
if len(sys.argv) > 2 and sys.argv[2]:
    request.add_header("Authorization", f"Bearer {sys.argv[2]}")  # never printed
try:
    urllib.request.urlopen(request, timeout=2)
except urllib.error.HTTPError as exc:
    sys.exit(0 if exc.code < 500 else 1)
except OSError:
    sys.exit(1)
EOF
}

url_of() {
  case "$1" in
    prefect) echo "http://$HOST:$PREFECT_PORT/api/health" ;;
    ray) echo "http://$HOST:$DASHBOARD_PORT/api/version" ;;
    s3) echo "http://$HOST:$S3_PORT/moto-api/" ;;
  esac
}

token() { [[ -r "$HOME/.ray/auth_token" ]] && cat "$HOME/.ray/auth_token" || true; }

wait_ready() {  # wait_ready NAME SECONDS
  local name="$1" deadline=$((SECONDS + $2))
  while ((SECONDS < deadline)); do
    if ! pid_of "$name" >/dev/null; then
      say "$name exited while starting; see $STACK/$name.log"
      return 1
    fi
    if probe "$(url_of "$name")" "$([[ $name == ray ]] && token)"; then
      say "$name ready: $(url_of "$name")"
      return 0
    fi
    sleep 1
  done
  say "$name not answering after $2 s; see $STACK/$name.log"
  return 1
}

start() {
  mkdir -p "$STACK/prefect" "$RAY_TMP"
  if ! pid_of prefect >/dev/null; then
    PREFECT_HOME="$STACK/prefect" launch prefect "$STACK/prefect.log" \
      "$PY" -m prefect server start --host "$HOST" --port "$PREFECT_PORT"
  fi
  if ! pid_of ray >/dev/null; then
    # Ray's workers take the environment of `ray start`, not the driver's: give them the local S3.
    # --block keeps one process that owns Ray's daemons: SIGTERM makes it stop them all.
    AWS_ENDPOINT_URL="http://$HOST:$S3_PORT" AWS_ACCESS_KEY_ID=local AWS_SECRET_ACCESS_KEY=local \
      AWS_DEFAULT_REGION=us-east-1 launch ray "$STACK/ray.log" "$BIN/ray" start --head --block --port "$RAY_PORT" \
      --include-dashboard true --dashboard-host "$HOST" --dashboard-port "$DASHBOARD_PORT" \
      --temp-dir "$RAY_TMP" --disable-usage-stats
  fi
  if ! pid_of s3 >/dev/null; then
    launch s3 "$STACK/s3.log" "$BIN/moto_server" -H "$HOST" -p "$S3_PORT"
  fi
  local ok=0
  wait_ready prefect 90 || ok=1
  wait_ready ray 90 || ok=1
  if wait_ready s3 30; then
    AWS_ACCESS_KEY_ID=local AWS_SECRET_ACCESS_KEY=local AWS_DEFAULT_REGION=us-east-1 \
      AWS_ENDPOINT_URL="http://$HOST:$S3_PORT" "$PY" -c \
      "import boto3, sys; boto3.client('s3').create_bucket(Bucket=sys.argv[1])" "$S3_BUCKET" \
      || ok=1
  else
    ok=1
  fi
  # moto accepts any credentials: these are placeholders for the local server, not secrets.
  cat >"$STACK/env" <<EOF
export PREFECT_API_URL=http://$HOST:$PREFECT_PORT/api
export RAY_ADDRESS=$HOST:$RAY_PORT
export RAY_AUTH_MODE=token   # Ray 2.60: a driver joining by address sends ~/.ray/auth_token only in token mode
export AWS_ENDPOINT_URL=http://$HOST:$S3_PORT
export AWS_ACCESS_KEY_ID=local AWS_SECRET_ACCESS_KEY=local AWS_DEFAULT_REGION=us-east-1
export OSD_FLEET_STORE=s3://$S3_BUCKET/fleet
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 RAY_USAGE_STATS_ENABLED=0
EOF
  say "environment for clients: source $STACK/env"
  say "Prefect UI http://$HOST:$PREFECT_PORT  Ray dashboard http://$HOST:$DASHBOARD_PORT (Bearer ~/.ray/auth_token)"
  return $ok
}

stop_one() {
  local name="$1" pid
  if ! pid="$(pid_of "$name")"; then
    rm -f "$STACK/$name.pid"
    return 0
  fi
  # Ray: SIGTERM to `ray start --block` drains the node (up to 30 s) and stops its daemons itself.
  # (SIGINT would not do: background jobs of a script start with SIGINT ignored.)
  local patience=30
  if [[ "$name" == ray ]]; then
    kill -TERM "$pid" 2>/dev/null || true
    patience=90
  else
    kill -TERM -- "-$pid" 2>/dev/null || true
  fi
  for _ in $(seq 1 "$patience"); do
    kill -0 -- "-$pid" 2>/dev/null || break  # the whole process group is gone
    sleep 0.5
  done
  if kill -0 -- "-$pid" 2>/dev/null; then
    say "$name did not stop in $((patience / 2)) s; killing its process group $pid"
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$STACK/$name.pid"
  say "$name stopped"
}

stop() {
  for name in s3 ray prefect; do stop_one "$name"; done
  rm -f "$STACK/env"
}

status() {
  local code=0 name pid
  for name in "${SERVICES[@]}"; do
    if pid="$(pid_of "$name")"; then
      if probe "$(url_of "$name")" "$([[ $name == ray ]] && token)"; then
        printf '%-8s running (pid %s), answering at %s\n' "$name" "$pid" "$(url_of "$name")"
      else
        printf '%-8s running (pid %s), NOT answering at %s\n' "$name" "$pid" "$(url_of "$name")"
        code=1
      fi
    else
      printf '%-8s stopped\n' "$name"
      code=3
    fi
  done
  return $code
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
