#!/usr/bin/env bash
# The README's test command after scripts/install.sh: the main suite, then the kvpress tests in
# the kvpress environment (tests/with_kvpress is collected only where kvpress imports).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pytest -q "$@"
if [ -x .venv-kvpress/bin/python ]; then
  .venv-kvpress/bin/python -m pytest -q -p no:cacheprovider tests/with_kvpress
else
  echo "no .venv-kvpress (REFREEKV_SKIP_KVPRESS=1 at install): the kvpress tests did not run" >&2
  exit 1
fi
