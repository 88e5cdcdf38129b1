# Shared shell helpers for scripts/*. Sourced, never run.
# shellcheck shell=bash

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUN_DIR="$ROOT/.run"
VENV="$ROOT/.venv"
MOTO_VERSION="5.2.5"
CFN_LINT_VERSION="1.58.0"
SCHEMATHESIS_VERSION="4.32.5"
# Infrastructure checks and deploys (scripts/check-infra, scripts/deploy); see
# docs/decisions/0007-deploys-and-the-fleet-life-cycle.md for why these tools.
PARLIAMENT_VERSION="1.6.4"
AWSCLI_VERSION="1.46.3"
CARGO_LAMBDA_VERSION="1.9.2"
EMULATOR_HOST="127.0.0.1"
EMULATOR_PORT="${CHORUS_EMULATOR_PORT:-4566}"
mkdir -p "$RUN_DIR"

log() { printf '\033[1m==>\033[0m %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# ensure_venv: the project's Python tools live in .venv, made with the machine's python3.
ensure_venv() {
  if [ ! -x "$VENV/bin/python" ]; then
    command -v python3 >/dev/null || die "python3 is required to install the AWS emulator"
    log "creating $VENV"
    python3 -m venv "$VENV" || die "python3 -m venv failed"
  fi
  if ! "$VENV/bin/python" -c "import moto, sys; sys.exit(0 if moto.__version__ == '$MOTO_VERSION' else 1)" 2>/dev/null; then
    log "installing moto[server]==$MOTO_VERSION into .venv"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "moto[server]==$MOTO_VERSION" \
      || die "pip install moto[server]==$MOTO_VERSION failed"
  fi
  if ! "$VENV/bin/cfn-lint" --version 2>/dev/null | grep -q "$CFN_LINT_VERSION"; then
    log "installing cfn-lint==$CFN_LINT_VERSION into .venv"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "cfn-lint==$CFN_LINT_VERSION" \
      || die "pip install cfn-lint==$CFN_LINT_VERSION failed"
  fi
}

# pip_pin PACKAGE VERSION [MODULE-CHECK]: install PACKAGE==VERSION into .venv unless pip has it.
pip_pin() {
  local package=$1 version=$2
  if [ "$("$VENV/bin/pip" show "$package" 2>/dev/null | sed -n 's/^Version: //p')" != "$version" ]; then
    log "installing $package==$version into .venv"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "$package==$version" \
      || die "pip install $package==$version failed"
  fi
}

# ensure_infra_tools: ensure_venv plus what scripts/check-infra runs: parliament (IAM policy
# linter), the AWS CLI the instance scripts call (tested against fakes), cargo-lambda (the
# publisher deploy test).
ensure_infra_tools() {
  ensure_venv
  pip_pin parliament "$PARLIAMENT_VERSION"
  pip_pin awscli "$AWSCLI_VERSION"
  pip_pin cargo-lambda "$CARGO_LAMBDA_VERSION"
}

# ensure_deploy_tools: ensure_venv plus cargo-lambda (builds for Lambda and, with zig, for arm64).
ensure_deploy_tools() {
  ensure_venv
  pip_pin cargo-lambda "$CARGO_LAMBDA_VERSION"
}

# Dummy credentials and region for the emulator; real AWS keeps whatever the caller has.
use_emulator_env() {
  export AWS_ENDPOINT_URL="${AWS_ENDPOINT_URL:-http://$EMULATOR_HOST:$EMULATOR_PORT}"
  export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-test}"
  export AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-test}"
  export AWS_REGION="${AWS_REGION:-us-east-1}"
  export AWS_DEFAULT_REGION="${AWS_DEFAULT_REGION:-$AWS_REGION}"
  export AWS_EC2_METADATA_DISABLED=true
}

# wait_http URL SECONDS: poll until URL answers 2xx, or fail.
wait_http() {
  local url=$1 secs=${2:-30} i
  for ((i = 0; i < secs * 10; i++)); do
    if curl -fsS -o /dev/null --max-time 1 "$url" 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  return 1
}

# stop_pidfile FILE: SIGTERM the process in FILE, wait up to 15 s, then SIGKILL.
stop_pidfile() {
  local file=$1 pid i
  [ -f "$file" ] || return 0
  pid=$(cat "$file")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 150; i++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      log "pid $pid did not stop in 15 s: killing"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$file"
}

# start_bg NAME CMD...: run CMD in the background with its log in .run/NAME.log and PID in
# .run/NAME.pid.
start_bg() {
  local name=$1
  shift
  "$@" >"$RUN_DIR/$name.log" 2>&1 &
  echo $! >"$RUN_DIR/$name.pid"
}

# wait_ready NAME URL: wait for URL to answer 2xx while NAME's process lives; on failure show its log.
wait_ready() {
  local name=$1 url=$2 pid i
  pid=$(cat "$RUN_DIR/$name.pid")
  for ((i = 0; i < 300; i++)); do
    if ! kill -0 "$pid" 2>/dev/null; then
      tail -n 30 "$RUN_DIR/$name.log" >&2 || true
      die "$name exited during start-up (log: $RUN_DIR/$name.log)"
    fi
    if curl -fsS -o /dev/null --max-time 1 "$url" 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  tail -n 30 "$RUN_DIR/$name.log" >&2 || true
  die "$name not ready at $url within 30 s (log: $RUN_DIR/$name.log)"
}

# port_free PORT: fail clearly if something listens on 127.0.0.1:PORT already.
port_free() {
  if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then
    die "127.0.0.1:$1 is already in use: stop whatever listens there (an earlier scripts/dev?)"
  fi
}
