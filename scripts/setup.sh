#!/usr/bin/env bash
# Set up .venv at the repo root on a fresh machine: the CPU torch first, then wuneng and its extras, every
# package at the exact version CI uses (constraints/ci.txt; pyproject.toml gives the supported ranges).
# Usage: bash scripts/setup.sh [EXTRAS]   (default extras: test,dev,plot,data,bench,eval,peft: everything CI runs)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test,dev,plot,data,bench,eval,peft}"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, exactly this CPU build, so that nothing later pulls a CUDA build.
.venv/bin/python -m pip install -q -c constraints/ci.txt "torch==2.13.0"
.venv/bin/python -m pip install -q -c constraints/ci.txt -e ".[${extras}]"
v=$(.venv/bin/python -c 'import torch; print(torch.__version__)')
case "$v" in
  2.13.0*) ;;
  *) echo "setup: torch was replaced by $v; expected 2.13.0 (CPU build)" >&2; exit 1 ;;
esac
if .venv/bin/python -m pip list 2>/dev/null | grep -qi '^nvidia-'; then
  echo "setup: warning: CUDA libraries (nvidia-*) were installed into .venv" >&2
fi
echo "setup: .venv ready (torch $v)"
