#!/usr/bin/env bash
# The hostile fuzzers at scale (the default suite runs a few hundred cases of each).
# Usage: scripts/fuzz.sh [CASES] [SEED]   (default 10000 cases each, a fresh seed)
# Prints each fuzzer's figures: cases per kind, the bystander's rounds, and the
# hypervisor's memory and fd trend over the run.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
export HVEMU_FUZZ_CASES="${1:-10000}"
[ -n "${2:-}" ] && export HVEMU_FUZZ_SEED="$2"
exec python -m pytest -q -s -p no:cacheprovider \
    tests/integration/test_hostile_ring.py::test_hostile_daemon_fuzz \
    tests/integration/test_hostile_control.py::test_hostile_control_traffic
