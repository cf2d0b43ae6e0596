# Shared by scripts/run, scripts/test and .ci/run: make sure the local Postgres
# and RabbitMQ of a development machine answer, starting them if they do not.
# Sourced, not executed.

port_open() {
  python3 - "$1" "$2" <<'PY'
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1).close()
except OSError:
    sys.exit(1)
PY
}

wait_port() {  # host port name seconds
  local i
  for ((i = 0; i < $4 * 2; i++)); do
    port_open "$1" "$2" && return 0
    sleep 0.5
  done
  echo "error: $3 is not answering on $1:$2" >&2
  return 1
}

ensure_postgres() {
  if ! port_open 127.0.0.1 5432; then
    echo "starting PostgreSQL..." >&2
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start
  fi
  wait_port 127.0.0.1 5432 PostgreSQL 60
}

ensure_rabbitmq() {
  if ! port_open 127.0.0.1 5672; then
    echo "starting RabbitMQ..." >&2
    rabbitmq-server -detached
  fi
  wait_port 127.0.0.1 5672 RabbitMQ 120
  # The port opens before the broker accepts work; wait until it answers.
  local i
  for ((i = 0; i < 60; i++)); do
    rabbitmqctl -q await_startup >/dev/null 2>&1 && return 0
    sleep 1
  done
  echo "error: RabbitMQ did not finish starting" >&2
  return 1
}

ensure_venv() {  # extras, e.g. "" or "[test]"
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
  fi
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".$1"
}
