#!/usr/bin/env bash
# One-time set-up on a fresh machine (no GPU, no model hub needed): a virtualenv in .venv with
# lavis-point, LAVIS 1.0.2 and the test tools. Safe to run again. Java (METEOR, PTB tokenizer) is
# installed with apt when missing and possible; otherwise a warning, and the rest goes on.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if ! command -v java >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq default-jre-headless >/dev/null
  else
    echo "setup.sh: warning: no java, and no apt-get as root to install it: install a JRE for METEOR and" \
      "the PTB tokenizer (caption metrics); everything else is set up" >&2
  fi
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
if ! .venv/bin/python -c "import lavis_point"; then
  echo "setup.sh: the install ran, but 'import lavis_point' fails in .venv (error above)" >&2
  exit 1
fi
echo "lavis-point installed in .venv"
