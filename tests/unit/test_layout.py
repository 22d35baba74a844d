"""The layout's rules, read from the imports (issue 15): what each kind of code may depend on.

* the contract (the ring's bytes, the event channels, the protocol and what
  rides on it: top-level ``hvemu/*.py``) imports nothing else of the project;
* the core (``hvemu/core``) imports only the contract, and no I/O;
* ``guest/`` and ``pager/`` import only the contract (and themselves);
* the hypervisor process (``hvemu/hypervisor``) never imports the toolstack,
  ``pager/`` or ``guest/``.

The toolstack (``hvemu/toolstack``) may import anything.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Iterator

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROJECT = ("hvemu", "pager", "guest")
#: Modules that do I/O or run an event loop: none of them may be loaded by the core.
IO_MODULES = {"asyncio", "socket", "select", "selectors", "subprocess", "signal", "threading", "mmap",
              "multiprocessing", "uvloop", "posix_ipc", "fcntl", "shutil", "tempfile"}


def _modules(package: str) -> Iterator[tuple[str, str]]:
    base = os.path.join(ROOT, *package.split("."))
    for dirpath, _, files in os.walk(base):
        for f in sorted(files):
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, ".")
                yield rel.removesuffix(".__init__"), os.path.join(dirpath, f)


def _imports(path: str, module: str) -> set[str]:
    """Every module ``path`` imports (absolute names; relative imports resolved against ``module``)."""
    tree = ast.parse(open(path).read(), path)
    out: set[str] = set()
    is_pkg = path.endswith("__init__.py")
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = module.split(".")
                base = parts if is_pkg else parts[:-1]
                base = base[:len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.add(name)
            out.update(f"{name}.{a.name}" for a in node.names)  # ``from hvemu import abi`` names a module
    return out


def _kind(name: str) -> str | None:
    """``contract``, ``core``, ``hypervisor``, ``toolstack``, ``pager``, ``guest``, or None (not ours)."""
    top = name.split(".")[0]
    if top in ("pager", "guest"):
        return top
    if top != "hvemu":
        return None
    parts = name.split(".")
    if len(parts) == 1:
        return "contract"  # the package itself (its __init__: the version, the include dir)
    if parts[1] in ("core", "hypervisor", "toolstack"):
        return parts[1]
    if os.path.isdir(os.path.join(ROOT, "hvemu", parts[1])):
        return "other"
    return "contract" if os.path.exists(os.path.join(ROOT, "hvemu", parts[1] + ".py")) else None


ALLOWED = {
    "contract": {"contract"},
    "core": {"contract", "core"},
    "guest": {"contract", "guest"},
    "pager": {"contract", "pager"},
    "hypervisor": {"contract", "core", "hypervisor"},
    "toolstack": {"contract", "core", "hypervisor", "toolstack", "pager", "guest"},
}


def _violations() -> list[str]:
    out = []
    for package in PROJECT:
        for module, path in _modules(package):
            kind = _kind(module)
            assert kind in ALLOWED, f"{module} belongs to no kind of code ({kind}): put it where it belongs"
            for name in sorted(_imports(path, module)):
                other = _kind(name)
                if other is not None and other not in ALLOWED[kind]:
                    out.append(f"{module} ({kind}) imports {name} ({other})")
                if kind == "core" and name.split(".")[0] in IO_MODULES:
                    out.append(f"{module} (core) imports {name}: the core does no I/O")
    return out


def test_each_kind_of_code_imports_only_what_it_may() -> None:
    assert _violations() == []


def test_the_rules_see_a_violation() -> None:
    """The reader resolves what a bad import would look like (so the test above can fail)."""
    assert _kind("hvemu.toolstack.cli") == "toolstack" and _kind("hvemu.abi") == "contract"
    assert _kind("hvemu.core.domain") == "core" and _kind("hvemu.hypervisor.daemon") == "hypervisor"
    assert "toolstack" not in ALLOWED["hypervisor"] and "pager" not in ALLOWED["guest"]
    assert _imports(os.path.join(ROOT, "hvemu", "core", "domain.py"), "hvemu.core.domain") >= {"hvemu.abi"}


@pytest.mark.parametrize("package", PROJECT)
def test_every_module_has_a_kind(package: str) -> None:
    for module, _ in _modules(package):
        assert _kind(module) in ALLOWED, module
