#!/usr/bin/env bash
# The GPU check (scripts/gpu_check.py): the worker runtime on one GPU, without Ray, in under 8 minutes on an H200.
#
#   bash scripts/gpu_check.sh --prepare    # here, with the package registry: fills .gpu_check/site (~3 MB + DeepSpeed)
#   bash scripts/gpu_check.sh [ARGS]       # on the GPU machine: python3 scripts/gpu_check.py ARGS
#
# The lent GPU machine has python3 (3.12) with torch, transformers, peft, numpy, pyyaml and rich, and reaches no
# registry. What the runtime needs beyond that travels in .gpu_check/site (the device tool's `carry`): pydantic (the
# config schema) and DeepSpeed with its small dependencies, unpacked wheels for CPython 3.12 on Linux x86_64.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
site=.gpu_check/site
if [ "${1:-}" = "--prepare" ]; then
  pip=(.venv/bin/python -m pip --disable-pip-version-check)
  wheels=.gpu_check/wheels
  rm -rf .gpu_check && mkdir -p "$wheels" "$site"
  "${pip[@]}" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d "$wheels" \
    pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 hjson==3.1.0 einops==0.8.2 psutil==7.2.2
  "${pip[@]}" wheel -q --no-deps --no-build-isolation -w "$wheels" deepspeed==0.19.8  # a pure-Python wheel from its sdist
  for wheel in "$wheels"/*.whl; do .venv/bin/python -m zipfile -e "$wheel" "$site"; done
  rm -rf "$wheels"
  echo "prepared $site ($(du -sh "$site" | cut -f1)): carry it to the GPU machine with the working tree"
  exit 0
fi
[ -d "$site" ] || echo "note: $site is missing (bash scripts/gpu_check.sh --prepare): the check needs pydantic there" >&2
PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" exec python3 scripts/gpu_check.py "$@"
