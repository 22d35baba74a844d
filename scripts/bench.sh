#!/usr/bin/env bash
# Benchmarks, each beside the floor it cannot beat, measured in the same run.
# Usage: scripts/bench.sh [--quick] [--json FILE] [--cpus LIST] ...  (see --help)
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
exec python -m hvemu.toolstack.bench "$@"
