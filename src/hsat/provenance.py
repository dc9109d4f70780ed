"""Which code a stage runs, derived from its imports, so that no hand-kept list decides reruns.

`code_version(["hsat.cli.train"])` hashes the source of every `hsat` module that the entry
modules import, directly or through each other, at module level or inside functions, plus the
package data they read (the config schema). A new module imported by the training code is
therefore part of the pretraining stage's version without anyone listing it.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path
from typing import Iterable

PACKAGE = "hsat"
SRC = Path(__file__).resolve().parent
DATA_FILES: tuple[str, ...] = ("schemas/*.yaml",)
"""Package data every stage reads through hsat.config (validation and defaults)."""


def module_file(name: str) -> Path | None:
    """The source file of an `hsat` module or package, None for anything else."""
    if name != PACKAGE and not name.startswith(PACKAGE + "."):
        return None
    rel = Path(*name.split(".")[1:])
    for path in (SRC / rel / "__init__.py", (SRC / rel).with_suffix(".py")):
        if path.is_file():
            return path
    return None


@functools.lru_cache(maxsize=None)
def _imports(path: Path) -> tuple[str, ...]:
    """Module names imported anywhere in `path` (`from a import b` also yields `a.b`, which may be a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return tuple(names)


def module_closure(entries: Iterable[str]) -> list[Path]:
    """Source files of the entry modules and every `hsat` module they import, sorted."""
    seen: set[Path] = set()
    todo = [module_file(name) for name in entries]
    missing = [name for name, path in zip(entries, todo) if path is None]
    if missing:
        raise ValueError(f"not hsat modules: {missing}")
    while todo:
        path = todo.pop()
        if path is None or path in seen:
            continue
        seen.add(path)
        parts = path.relative_to(SRC).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        # a module's parent packages run their __init__ first
        for i in range(len(parts)):
            todo.append(module_file(".".join((PACKAGE, *parts[:i]))))
        todo += [module_file(name) for name in _imports(path)]
    return sorted(seen)


def code_version(entries: Iterable[str]) -> str:
    """sha256 (16 hex) of the sources in `module_closure(entries)` and the package data."""
    files = module_closure(list(entries))
    files += sorted(p for pattern in DATA_FILES for p in SRC.glob(pattern))
    h = hashlib.sha256()
    for path in files:
        h.update(path.relative_to(SRC).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]
