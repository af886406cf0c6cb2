#!/usr/bin/env bash
# Build the sdist and the wheel into dist/ and check them before a release: contents
# and metadata, and the wheel alone (no server extra) in a fresh venv, where
# `import bastion` and `bastion --help` work and `bastion serve` says what to install.
# The checks are tests/integration/test_packaging.py, run here on these very files
# (CI runs the same test on a build of its own).
#
#   scripts/check-dist.sh            # uses .venv (make setup)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-.venv/bin/python}

rm -rf dist
"$PY" -m build --outdir dist .
BASTION_DIST_DIR="$PWD/dist" "$PY" -m pytest -q -p no:cacheprovider tests/integration/test_packaging.py
ls -l dist
