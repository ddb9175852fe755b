#!/usr/bin/env bash
# Creates (once) a Python venv with the official DashScope SDK and the
# openai SDK (for DashScope's OpenAI-compatible mode), for tests/sdk.rs and
# tests/sdk_family.rs. Idempotent and safe to run concurrently (flock).
# Usage: scripts/sdk-venv.sh VENV_DIR   (prints the venv's python on success)
set -euo pipefail

SDK_VERSION=2.0.2  # newest on PyPI when pinned; bump deliberately
OPENAI_VERSION=3.57.0  # newest on PyPI when pinned; bump deliberately
dir="${1:?usage: sdk-venv.sh VENV_DIR}"
# Names both pins: changing either rebuilds the venv.
marker="$dir/.embedgate-dashscope-$SDK_VERSION-openai-$OPENAI_VERSION"

mkdir -p "$(dirname "$dir")"
exec 9>"$dir.lock"
flock 9

if [ ! -f "$marker" ]; then
  rm -rf "$dir"
  python3 -m venv "$dir" >&2
  "$dir/bin/python" -m pip install --quiet --disable-pip-version-check \
    "dashscope==$SDK_VERSION" "openai==$OPENAI_VERSION" >&2
  touch "$marker"
fi
echo "$dir/bin/python"
