# Shared by the system-test scripts: install what they need from Debian's packages when
# missing, pick free loopback ports, wait for a listener.

need_debian_packages() { # need_debian_packages COMMAND PACKAGE [COMMAND PACKAGE ...]
  local missing=()
  while [ $# -gt 0 ]; do
    command -v "$1" >/dev/null || missing+=("$2")
    shift 2
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "installing ${missing[*]} from Debian"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

# A free loopback port, from the OS, for a server that cannot report the one it chose.
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_for_port() { # wait_for_port PORT: up to 10 s
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done
  echo "nothing listens on 127.0.0.1:$1" >&2
  return 1
}

# tansu, an independent Kafka-protocol broker (crates.io), for system tests and benchmarks
# on a second Kafka implementation. Reused when installed; the first install compiles for
# ~14 minutes on 2 cores. Its in-memory storage needs the dynostore feature.
TANSU_VERSION=0.6.0
need_tansu() {
  if command -v tansu >/dev/null && tansu --version 2>/dev/null | grep -q "$TANSU_VERSION"; then
    return 0
  fi
  echo "installing tansu $TANSU_VERSION with cargo (once per machine)"
  cargo install tansu --version "$TANSU_VERSION" --features dynostore,libsql --locked --quiet
}

start_tansu() { # start_tansu PORT LOG: in-memory storage, in the background
  tansu broker --listener-url "tcp://127.0.0.1:$1" --advertised-listener-url "tcp://127.0.0.1:$1" \
    --storage-engine memory://tansu/ > "$2" 2>&1 &
  wait_for_port "$1" || { cat "$2"; return 1; }
}
