# Sourced by the scripts: make .venv with the project installed (once), saying what it does meanwhile.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.hvemu-installed"
# What pip installs: the project with its extras (plot: matplotlib; test; dev: ruff and mypy).
extras="test,dev,plot"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
    started=$SECONDS
    if [ ! -x "$venv/bin/python" ]; then
        echo "scripts: creating $venv (once; about 2 minutes in all on a 2-core machine)" >&2
        python3 -m venv "$venv"
    fi
    packages="$("$venv/bin/python" - "$root/pyproject.toml" "$extras" <<'PY'
import re, sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
deps = project["dependencies"] + [d for e in sys.argv[2].split(",") for d in project["optional-dependencies"][e]]
print(", ".join(re.split(r"[~<>=!\[; ]", d, maxsplit=1)[0] for d in deps))
PY
)"
    echo "scripts: installing hvemu and $packages into .venv (log: $venv/install.log)..." >&2
    if ! "$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$root[$extras]" \
            > "$venv/install.log" 2>&1; then
        cat "$venv/install.log" >&2
        echo "scripts: installing the project into $venv failed (log above)" >&2
        exit 1
    fi
    touch "$stamp"
    echo "scripts: .venv ready in $((SECONDS - started)) s" >&2
fi
export PATH="$venv/bin:$PATH"
cd "$root"
