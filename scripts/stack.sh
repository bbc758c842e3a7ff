#!/usr/bin/env bash
# The local operations stack on loopback: Prefect server, MLflow tracking server, a process work pool with the
# deployments from prefect.yaml, and a worker. Each service runs in its own process group, recorded in a pid file,
# so that `stop` ends exactly those processes and nothing else.
#
#   scripts/stack.sh start | stop | status
#
# Settings (environment): PREFECT_PORT (4200), MLFLOW_PORT (5000), STACK_HOST (127.0.0.1), VITFLOW_STACK_DIR (.vitflow/stack: pids, logs, Prefect's database), VITFLOW_MLFLOW_DIR (mlflow:
# the tracking store the server serves), VITFLOW_DATA_DIR (passed to flow runs).
set -euo pipefail

HOME_DIR="$(cd "$(dirname "$0")/.." && pwd)"
BIN="${VITFLOW_BIN:-$HOME_DIR/.venv/bin}"
HOST="${STACK_HOST:-127.0.0.1}"
PREFECT_PORT="${PREFECT_PORT:-4200}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
POOL=vitflow-pool  # named in prefect.yaml
STACK_DIR="$(mkdir -p "${VITFLOW_STACK_DIR:-$HOME_DIR/.vitflow/stack}" && cd "${VITFLOW_STACK_DIR:-$HOME_DIR/.vitflow/stack}" && pwd)"
MLFLOW_DIR="$(mkdir -p "${VITFLOW_MLFLOW_DIR:-$HOME_DIR/mlflow}" && cd "${VITFLOW_MLFLOW_DIR:-$HOME_DIR/mlflow}" && pwd)"
SERVICES=(worker mlflow prefect)  # stop order

export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_API_URL="http://$HOST:$PREFECT_PORT/api"
export MLFLOW_TRACKING_URI="http://$HOST:$MLFLOW_PORT"
export VITFLOW_HOME="$HOME_DIR"

die() { echo "stack: $*" >&2; exit 1; }

port_free() {
  "$BIN/python" - "$HOST" "$1" <<'EOF'
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind((sys.argv[1], int(sys.argv[2])))
except OSError:
    sys.exit(1)
finally:
    s.close()
EOF
}

wait_http() {  # url, seconds, service
  local deadline=$((SECONDS + $2))
  until "$BIN/python" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" "$1" 2>/dev/null; do
    if ! alive "$3"; then die "$3 exited during start-up; see $STACK_DIR/$3.log"; fi
    if (( SECONDS > deadline )); then die "$3 not healthy at $1 after $2 s; see $STACK_DIR/$3.log"; fi
    sleep 1
  done
}

boot_id() { cat /proc/sys/kernel/random/boot_id 2>/dev/null || true; }
start_ticks() { sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | awk '{print $20}' || true; }  # since boot

# A pid file holds "PGID START_TICKS BOOT_ID": the group's leader and when it started. The group is ours while
# any of its processes runs (a leader killed alone can leave a child serving the port), unless the machine
# rebooted or the leader's PID now names another process (a stale file must never stop someone else's group).
alive() {
  local pgid ticks boot now
  [[ -f "$STACK_DIR/$1.pid" ]] || return 1
  read -r pgid ticks boot < "$STACK_DIR/$1.pid" || true
  [[ "$pgid" =~ ^[0-9]+$ && -n "$ticks" ]] || return 1  # a bare PID (an older script's file) proves nothing
  kill -0 -- "-$pgid" 2>/dev/null || return 1
  [[ "$boot" == "$(boot_id)" ]] || return 1
  now=$(start_ticks "$pgid")
  [[ -z "$now" || "$ticks" == "$now" ]]  # leader gone (its group still runs), or the same leader
}

pgid_of() { local pgid=""; read -r pgid _ < "$STACK_DIR/$1.pid" || true; echo "$pgid"; }

launch() {  # name, command...: own session = own process group (pgid == pid)
  local name=$1; shift
  setsid "$@" >"$STACK_DIR/$name.log" 2>&1 < /dev/null &
  echo "$! $(start_ticks $!) $(boot_id)" >"$STACK_DIR/$name.pid"
}

check_port() {  # name, value
  [[ "$2" =~ ^[0-9]+$ ]] && (( $2 >= 1 && $2 <= 65535 )) || die "$1=$2 is not a port number (1-65535)"
}

start() {
  [[ -x "$BIN/prefect" ]] || die "$BIN/prefect not found; run 'make install' first"
  for svc in "${SERVICES[@]}"; do
    alive "$svc" && die "$svc is already running (process group $(pgid_of "$svc")); run 'make stop' first"
  done
  check_port PREFECT_PORT "$PREFECT_PORT"
  check_port MLFLOW_PORT "$MLFLOW_PORT"
  [[ "$PREFECT_PORT" != "$MLFLOW_PORT" ]] || die "PREFECT_PORT and MLFLOW_PORT are both $PREFECT_PORT; give them two ports"
  port_free "$PREFECT_PORT" || die "port $PREFECT_PORT on $HOST is already in use; choose another with PREFECT_PORT=..."
  port_free "$MLFLOW_PORT" || die "port $MLFLOW_PORT on $HOST is already in use; choose another with MLFLOW_PORT=..."
  trap 'echo "stack: start failed; stopping what was started" >&2; stop' EXIT  # no half-started stack

  # Logs streamed out (off by default): `prefect deployment run --watch` then shows the flow run's log, and why
  # it failed, not only its state changes.
  PREFECT_API_DATABASE_CONNECTION_URL="sqlite+aiosqlite:///$STACK_DIR/prefect.db" \
    PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED=true PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED=true \
    launch prefect "$BIN/prefect" server start --host "$HOST" --port "$PREFECT_PORT"
  MLFLOW_HOST="$HOST" MLFLOW_BIN="$BIN/mlflow" VITFLOW_MLFLOW_DIR="$MLFLOW_DIR" \
    launch mlflow "$HOME_DIR/mlflow/server.sh"
  wait_http "http://$HOST:$PREFECT_PORT/api/health" 90 prefect
  wait_http "http://$HOST:$MLFLOW_PORT/health" 90 mlflow

  (cd "$HOME_DIR" && "$BIN/prefect" --no-prompt work-pool create "$POOL" --type process --overwrite) \
    >>"$STACK_DIR/deploy.log" 2>&1 || die "could not create work pool $POOL; see $STACK_DIR/deploy.log"
  # prefect.yaml's schedules say active: true; a schedule the operator paused stays paused (scripts/schedules.py).
  "$BIN/python" "$HOME_DIR/scripts/schedules.py" save "$STACK_DIR/paused-schedules.json" \
    >>"$STACK_DIR/deploy.log" 2>&1 || die "could not read the deployments' schedules; see $STACK_DIR/deploy.log"
  (cd "$HOME_DIR" && "$BIN/prefect" --no-prompt deploy --all) \
    >>"$STACK_DIR/deploy.log" 2>&1 || die "prefect deploy --all failed; see $STACK_DIR/deploy.log"
  "$BIN/python" "$HOME_DIR/scripts/schedules.py" restore "$STACK_DIR/paused-schedules.json" 2>>"$STACK_DIR/deploy.log" \
    || die "could not keep the paused schedules paused; see $STACK_DIR/deploy.log"
  # VITFLOW_STACK_RUN marks the worker's flow runs (its children inherit it, each in its own session): `stop` finds
  # them by it even after the worker itself was killed.
  (cd "$HOME_DIR" && VITFLOW_STACK_RUN="$STACK_DIR" launch worker "$BIN/prefect" worker start --pool "$POOL" --type process)
  sleep 2
  alive worker || die "the worker exited at start; see $STACK_DIR/worker.log"
  trap - EXIT
  # Point the Prefect CLI's active profile at this server, so that a plain `prefect deployment run` finds it
  # (undone by stop). PREFECT_API_URL in the environment still wins over the profile.
  "$BIN/prefect" --no-prompt config set "PREFECT_API_URL=$PREFECT_API_URL" >/dev/null
  echo "$PREFECT_API_URL" >"$STACK_DIR/profile-api-url"

  cat <<EOF
Stack up on $HOST (logs and pids in $STACK_DIR):
  Prefect UI   http://$HOST:$PREFECT_PORT
  MLflow UI    http://$HOST:$MLFLOW_PORT
  work pool    $POOL, deployments: vit-pipeline/seed-study, vit-pipeline/scheduled-retraining
The Prefect CLI's profile now points at it (PREFECT_API_URL=$PREFECT_API_URL). Run the study:
  source .venv/bin/activate
  prefect deployment run 'vit-pipeline/seed-study' --watch
Stop everything with: make stop
EOF
}

stop_one() {
  local svc=$1 pid
  [[ -f "$STACK_DIR/$svc.pid" ]] || return 0
  pid=$(pgid_of "$svc")
  if alive "$svc"; then
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq 1 20); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.5; done
    kill -TERM -- "-$pid" 2>/dev/null || true  # a Prefect worker wants a second SIGTERM
    for _ in $(seq 1 10); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    echo "stopped $svc (process group $pid)"
  elif [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 -- "-$pid" 2>/dev/null; then
    echo "$svc: stale pid file: process group $pid is not the one this stack started (another program, or one" \
         "it cannot identify), so it was left alone; if it is this stack's, end it with: kill -- -$pid"
  fi
  rm -f "$STACK_DIR/$svc.pid"
}

flow_runs() {  # processes carrying this stack's VITFLOW_STACK_RUN: flow runs a killed worker left behind
  local e pid
  for e in /proc/[0-9]*/environ; do
    pid=${e#/proc/}; pid=${pid%/environ}
    tr '\0' '\n' 2>/dev/null < "$e" | grep -qxF "VITFLOW_STACK_RUN=$STACK_DIR" && echo "$pid"
  done
  return 0
}

stop_flow_runs() {  # SIGTERM (each closes its MLflow runs as KILLED while the servers are still up), then SIGKILL
  local pids left
  pids=$(flow_runs | tr '\n' ' ')
  [[ -n "${pids// }" ]] || return 0
  # shellcheck disable=SC2086
  kill -TERM $pids 2>/dev/null || true
  for _ in $(seq 1 60); do
    left=""; for p in $pids; do kill -0 "$p" 2>/dev/null && left+="$p "; done
    [[ -n "$left" ]] || break; sleep 0.5
  done
  # shellcheck disable=SC2086
  [[ -z "$left" ]] || kill -KILL $left 2>/dev/null || true
  echo "stopped flow-run process(es) the worker had left: $pids"
}

stop() {
  stop_one worker
  stop_flow_runs
  for svc in "${SERVICES[@]}"; do [[ "$svc" == worker ]] || stop_one "$svc"; done
  if [[ -f "$STACK_DIR/profile-api-url" ]]; then  # undo the profile setting if it is still ours
    if [[ "$(env -u PREFECT_API_URL "$BIN/prefect" config view 2>/dev/null | grep -o "PREFECT_API_URL='[^']*'")" == "PREFECT_API_URL='$(cat "$STACK_DIR/profile-api-url")'" ]]; then
      "$BIN/prefect" --no-prompt config unset PREFECT_API_URL >/dev/null 2>&1 || true
    fi
    rm -f "$STACK_DIR/profile-api-url"
  fi
}

status() {
  for svc in prefect mlflow worker; do
    if alive "$svc"; then
      if kill -0 "$(pgid_of "$svc")" 2>/dev/null; then echo "$svc: running (process group $(pgid_of "$svc"))"
      else echo "$svc: running without its leader (process group $(pgid_of "$svc")); 'make stop' ends it"; fi
    else echo "$svc: stopped"; fi
  done
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
