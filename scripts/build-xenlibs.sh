#!/usr/bin/env bash
# Build hvemu's drop-in Xen libraries (libxenctrl.so.4.17, libxenevtchn.so.1, libxenstore.so.4,
# libxentoollog.so.1) with the system C compiler; prints the directory to put on LD_LIBRARY_PATH.
# Usage: scripts/build-xenlibs.sh [--out DIR]   (default: the cache hvemu xen-tool uses)
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
exec "$root/.venv/bin/python" -m hvemu.toolstack.xentools.build "$@"
