#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what the tests
# need (redis-server; python3-venv for the official SDK test; python3-yaml
# for the deploy files' check; prometheus for promtool and the Prometheus
# server of tests/operating), then `cargo test`.
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
# tests/operating: promtool (alert rules) and the prometheus server (the
# dashboard's queries); EMBEDGATE_SKIP_PROMETHEUS=1 skips those tests.
if [ "${EMBEDGATE_SKIP_PROMETHEUS:-}" != 1 ]; then
  { command -v promtool && command -v prometheus; } >/dev/null 2>&1 || need_apt+=(prometheus)
fi
if ((${#need_apt[@]})); then
  if [ "$(id -u)" -eq 0 ]; then
    apt-get update -qq
    # Installing a package must not start its service (the prometheus
    # package would start a server on :9090): a policy-rc.d that refuses
    # every start, for the install only, unless the machine has one.
    policy=/usr/sbin/policy-rc.d
    own_policy=
    if [ ! -e "$policy" ]; then
      printf '#!/bin/sh\nexit 101\n' >"$policy"
      chmod +x "$policy"
      own_policy=1
      trap 'rm -f "$policy"' EXIT
    fi
    # No recommends: prometheus recommends prometheus-node-exporter.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
    if [ -n "$own_policy" ]; then rm -f "$policy"; trap - EXIT; fi
  else
    echo "scripts/test.sh: please install: ${need_apt[*]}" >&2
    exit 1
  fi
fi

cargo test --locked --all-targets "$@"
