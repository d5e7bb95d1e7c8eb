"""Ceph's Python bindings (`rados`, `rbd`) for the FUSE server, whichever CPython 3.11 runs it.

They are not on PyPI: they come with the distribution (Debian's python3-rados and python3-rbd,
built against its librados/librbd), installed in the system interpreter's directory
(`/usr/lib/python3/dist-packages`). A daemon in a virtual environment, or under another build of
the same Python (pyenv, a custom prefix), does not see that directory — and must not put all of
it on its path, which would let Debian's older copies of other packages shadow nothing but
still answer every import the venv lacks.

So: a normal `import` first (an interpreter that has them on its path: Debian's own, or a venv
made with --system-site-packages); else exactly the two extension modules are loaded by file
from the directories below, if their ABI tag (e.g. `cpython-311-x86_64-linux-gnu`) is one this
interpreter loads. An interpreter of another minor version (3.12) cannot load modules built for
3.11; `locate` says so without importing anything (the daemon's startup check).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

# Where distributions install them: Debian and Ubuntu; Fedora, RHEL, SUSE (64-bit, then not).
SEARCH = (
    Path("/usr/lib/python3/dist-packages"),
    Path(f"/usr/lib64/python{sys.version_info[0]}.{sys.version_info[1]}/site-packages"),
    Path(f"/usr/lib/python{sys.version_info[0]}.{sys.version_info[1]}/site-packages"),
)
MODULES = ("rados", "rbd")  # in this order: rbd's module init imports rados
PACKAGES = "python3-rados python3-rbd"


class BindingsMissing(ImportError):
    pass


def _on_path(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def locate(search: tuple[Path, ...] = SEARCH) -> dict[str, str]:
    """Where each module would come from (`"path"` for the normal import); raises
    BindingsMissing saying why not. Imports nothing."""
    found: dict[str, str] = {}
    seen_elsewhere: list[str] = []
    for name in MODULES:
        if _on_path(name):
            found[name] = "path"
            continue
        for directory in search:
            for suffix in importlib.machinery.EXTENSION_SUFFIXES:
                candidate = directory / f"{name}{suffix}"
                if candidate.is_file():
                    found[name] = str(candidate)
                    break
            if name in found:
                break
            seen_elsewhere += [p.name for p in directory.glob(f"{name}.cpython-*.so")]
        if name not in found:
            why = f"the Ceph Python module {name!r} is not installed (apt-get install {PACKAGES})"
            if seen_elsewhere:
                why = (f"the Ceph Python module {name!r} is built for another Python "
                       f"({', '.join(sorted(set(seen_elsewhere)))}), not for this "
                       f"{sys.implementation.cache_tag} ({sys.executable}): run the daemon "
                       "with that Python's version")
            raise BindingsMissing(why)
    return found


def load(search: tuple[Path, ...] = SEARCH) -> tuple[ModuleType, ModuleType]:
    """The `rados` and `rbd` modules, imported."""
    where = locate(search)
    for name in MODULES:
        if name in sys.modules:
            continue
        if where[name] == "path":
            importlib.import_module(name)
            continue
        spec = importlib.util.spec_from_file_location(name, where[name])
        if spec is None or spec.loader is None:
            raise BindingsMissing(f"cannot load {where[name]}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except ImportError as exc:  # e.g. librados2 itself missing
            del sys.modules[name]
            raise BindingsMissing(f"cannot load {where[name]}: {exc}") from exc
    return sys.modules["rados"], sys.modules["rbd"]
