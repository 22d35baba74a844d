# Sourced by the scripts: make .venv with the project installed (once).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.hvemu-installed"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
    if ! "$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$root[test,dev]" \
            > "$venv/install.log" 2>&1; then
        cat "$venv/install.log" >&2
        echo "scripts: installing the project into $venv failed (log above)" >&2
        exit 1
    fi
    touch "$stamp"
fi
export PATH="$venv/bin:$PATH"
cd "$root"
