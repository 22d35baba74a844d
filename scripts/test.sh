#!/usr/bin/env bash
# Run the whole test suite (creates .venv and installs the project on first use).
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
exec python -m pytest -q "$@"
