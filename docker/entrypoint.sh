#!/usr/bin/env bash
# One entry point for compose, Kubernetes and bare hosts.
#   entrypoint.sh head     [ray start args...]   Ray head (GCS, dashboard, client server)
#   entrypoint.sh worker   [ray start args...]   Ray worker joining RAY_HEAD_ADDRESS (host:port; KubeRay: FQ_RAY_IP)
#   entrypoint.sh mlflow   [mlflow server args]  MLflow tracking server (MLFLOW_BACKEND_STORE_URI)
#   entrypoint.sh campaign [campaign args...]    xrdmatch campaign run --config $XRDMATCH_CONFIG
#   entrypoint.sh validate [validate args...]    extra validation workers on the campaign store
#   entrypoint.sh health                          exit 0 when this container's service answers
# RAY_BLOCK=1 (default in containers) keeps `ray start` in the foreground; tests set RAY_BLOCK=0.
set -euo pipefail
mode=${1:-head}
shift || true
block=()
[ "${RAY_BLOCK:-1}" = 1 ] && block=(--block)
export RAY_USAGE_STATS_ENABLED=${RAY_USAGE_STATS_ENABLED:-0}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1} OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1}

# Ray token authentication: every node and driver of a cluster shares one token, given as
# RAY_AUTH_TOKEN (compose .env / a Kubernetes secret) or a file (RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token).
token_file=${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}
if [ -z "${RAY_AUTH_MODE:-}" ] && { [ -n "${RAY_AUTH_TOKEN:-}" ] || [ -s "$token_file" ]; }; then
  export RAY_AUTH_MODE=token
fi

# The head a worker (or a driver's node) joins: RAY_HEAD_ADDRESS, else the head service KubeRay
# names in FQ_RAY_IP (a RayJob's cluster gets a generated name, so no fixed service name works).
head_address() {
  printf '%s' "${RAY_HEAD_ADDRESS:-${FQ_RAY_IP:+$FQ_RAY_IP:${RAY_PORT:-6379}}}"
}

# A driver started in its own container (campaign, validate: `compose run`) must run on a Ray
# node: a driver given host:port needs a raylet on its host. So the container joins the head as a
# node that takes no work, and the driver connects to it ("auto"). Inside a Ray job, or where
# RAY_ADDRESS is set, nothing changes.
join_head() {
  local head
  head=$(head_address)
  if [ -z "${RAY_ADDRESS:-}" ] && [ -n "$head" ]; then
    ray start --address="$head" --num-cpus=0 --num-gpus=0 \
      ${RAY_NODE_IP:+--node-ip-address="$RAY_NODE_IP"} --disable-usage-stats >/dev/null
    export RAY_ADDRESS=auto
  fi
}

case "$mode" in
  head)
    # the dashboard and client ports accept jobs (code): off loopback only with a token, or open on purpose
    case "${RAY_DASHBOARD_HOST:-127.0.0.1}" in
      127.0.0.1|localhost|::1) ;;
      *)
        if [ "${RAY_AUTH_MODE:-}" != token ] && [ "${RAY_AUTH_MODE:-}" != disabled ]; then
          echo "entrypoint: RAY_DASHBOARD_HOST=$RAY_DASHBOARD_HOST exposes a Ray head that runs any submitted job;" \
               "set RAY_AUTH_TOKEN (a Kubernetes/compose secret), or RAY_AUTH_MODE=disabled to run it open on purpose" >&2
          exit 2
        fi ;;
    esac
    if [ "${RAY_AUTH_MODE:-}" = token ] && [ -z "${RAY_AUTH_TOKEN:-}" ] && [ ! -s "$token_file" ]; then
      ray get-auth-token --generate >/dev/null
    fi
    exec ray start --head \
      ${RAY_NODE_IP:+--node-ip-address="$RAY_NODE_IP"} \
      --port="${RAY_PORT:-6379}" \
      --dashboard-host="${RAY_DASHBOARD_HOST:-127.0.0.1}" \
      --ray-client-server-port="${RAY_CLIENT_PORT:-10001}" \
      ${RAY_NUM_CPUS:+--num-cpus="$RAY_NUM_CPUS"} \
      ${RAY_NUM_GPUS:+--num-gpus="$RAY_NUM_GPUS"} \
      --disable-usage-stats "${block[@]}" "$@"
    ;;
  worker)
    head=$(head_address)
    : "${head:?set RAY_HEAD_ADDRESS=host:port of the Ray head}"
    exec ray start --address="$head" \
      ${RAY_NODE_IP:+--node-ip-address="$RAY_NODE_IP"} \
      ${RAY_NUM_CPUS:+--num-cpus="$RAY_NUM_CPUS"} \
      ${RAY_NUM_GPUS:+--num-gpus="$RAY_NUM_GPUS"} \
      --disable-usage-stats "${block[@]}" "$@"
    ;;
  mlflow)
    : "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI (postgresql://...)}"
    # mlflow server reads it from the environment; in argv its password would show in ps
    export MLFLOW_BACKEND_STORE_URI
    exec mlflow server \
      --artifacts-destination "${MLFLOW_ARTIFACTS_DESTINATION:-/mlflow/artifacts}" \
      --serve-artifacts \
      --host "${MLFLOW_HOST:-127.0.0.1}" --port "${MLFLOW_PORT:-5000}" \
      ${MLFLOW_ALLOWED_HOSTS:+--allowed-hosts "$MLFLOW_ALLOWED_HOSTS"} "$@"
    ;;
  campaign)
    join_head
    exec xrdmatch campaign run --config "${XRDMATCH_CONFIG:-configs/cluster.yaml}" \
      ${XRDMATCH_RUN_DIR:+--dir "$XRDMATCH_RUN_DIR"} "$@"
    ;;
  validate)
    join_head
    exec xrdmatch validate work --config "${XRDMATCH_CONFIG:-configs/cluster.yaml}" \
      ${XRDMATCH_RUN_DIR:+--dir "$XRDMATCH_RUN_DIR"} "$@"
    ;;
  health)
    if pgrep -f "mlflow server" >/dev/null 2>&1 || pgrep -f "mlflow.server" >/dev/null 2>&1; then
      exec curl -fsS "http://127.0.0.1:${MLFLOW_PORT:-5000}/health" >/dev/null
    fi
    exec ray health-check ${RAY_HEAD_ADDRESS:+--address "$RAY_HEAD_ADDRESS"}
    ;;
  *)
    echo "usage: entrypoint.sh head|worker|mlflow|campaign|validate|health [args...]" >&2
    exit 2
    ;;
esac
