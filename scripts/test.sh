#!/usr/bin/env bash
# Create/reuse .venv/ and run the whole test suite (the README's test command; .ci/run calls it).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -q "$@"
