#!/usr/bin/env bash
# Create .venv in the repository and install layersplice with its test and eval
# extras (eval brings lm-evaluation-harness, so the `eval --tasks` test runs too).
# torch is pinned first so pip takes the CPU build from this machine's disk
# instead of pulling a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[test,eval]"
