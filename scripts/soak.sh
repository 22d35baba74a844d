#!/usr/bin/env bash
# Soak the whole system under heavy paging for a bounded time, then print a summary.
# Usage: scripts/soak.sh --minutes N [--domains 3 --vcpus 8 --target 64 --kill-pagers-every S ...]
# Options: see `scripts/soak.sh --help`.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
exec python -m hvemu.toolstack.soak "$@"
