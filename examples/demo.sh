#!/usr/bin/env bash
# README's main command: install everything on a fresh Debian 12 machine,
# then run the end-to-end demo (examples/demo.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install
exec .venv/bin/python examples/demo.py "$@"
