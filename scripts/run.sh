#!/usr/bin/env bash
# Run an overcommitted host: hypervisor, guests and pagers, then a summary.
# Options: see `scripts/run.sh --help`.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
exec python -m hvemu.toolstack.run "$@"
