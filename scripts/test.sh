#!/usr/bin/env bash
# Run the whole test suite (creates .venv and installs the project on first use).
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
echo "scripts/test.sh: running the suite (about 7-8 minutes on 2 cores; a dot per test passed)" >&2
exec python -m pytest -q "$@"
