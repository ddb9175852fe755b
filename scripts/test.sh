#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what the tests
# need (redis-server; python3-venv for the official SDK test; python3-yaml
# for the deploy files' check), then `cargo test`.
# Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v python3 >/dev/null 2>&1 || need_apt+=(python3 python3-venv python3-pip)
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
  need_apt+=(python3-venv)
fi
# deploy/check_deploy.py reads the Compose and Kubernetes YAML.
python3 -c 'import yaml' >/dev/null 2>&1 || need_apt+=(python3-yaml)
if ((${#need_apt[@]})); then
  if [ "$(id -u)" -eq 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "scripts/test.sh: please install: ${need_apt[*]}" >&2
    exit 1
  fi
fi

cargo test --locked --all-targets "$@"
