#!/usr/bin/env bash
# MLflow tracking server over this folder's store: SQLite backend + artifacts/ here, one worker, job execution
# off (light enough for 2 cores), loopback only unless MLFLOW_HOST says otherwise.
#   mlflow/server.sh                 # http://127.0.0.1:5000
#   MLFLOW_PORT=5050 mlflow/server.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
store="${VITFLOW_MLFLOW_DIR:-$here}"  # where mlflow.db and artifacts/ live
mkdir -p "$store" && store="$(cd "$store" && pwd)"  # absolute: it goes into URIs
host="${MLFLOW_HOST:-127.0.0.1}"
port="${MLFLOW_PORT:-5000}"
mlflow_bin="${MLFLOW_BIN:-$(dirname "$here")/.venv/bin/mlflow}"
[ -x "$mlflow_bin" ] || mlflow_bin="$(command -v mlflow)"
if (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; then
  if [ "$("$(dirname "$mlflow_bin")/python" -c "import sys, urllib.request
print(urllib.request.urlopen(sys.argv[1], timeout=3).read().decode())" "http://$host:$port/health" 2>/dev/null)" = OK ]
  then  # most often the stack's own server (make serve), over this same store
    echo "mlflow/server.sh: an MLflow server already answers on http://$host:$port (make serve's, if the stack" \
         "runs; 'make status' says): open that, or choose another port with MLFLOW_PORT=..." >&2
  else
    echo "mlflow/server.sh: port $port on $host is already in use; choose another with MLFLOW_PORT=..." >&2
  fi
  exit 1
fi
# Bound to loopback (the default), every client is on this machine: new experiments keep their artifacts as plain
# files under $store/artifacts, so `make run`, `vitflow predict` and `make ui`, which open mlflow.db directly, read
# and write the same runs as the server's clients. Served to other machines (MLFLOW_HOST), clients cannot reach
# that folder: new experiments then get mlflow-artifacts:/ locations, uploaded and downloaded through the server.
root=()
case "$host" in
  127.*|localhost|::1) root=(--default-artifact-root "file://$store/artifacts") ;;
esac
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
exec "$mlflow_bin" server --host "$host" --port "$port" --workers 1 \
  --backend-store-uri "sqlite:///$store/mlflow.db" \
  --artifacts-destination "$store/artifacts" --serve-artifacts "${root[@]}"
