"""Which code a stage runs, derived from its imports, so that no hand-kept list decides reruns.

`code_version(["hsat.cli.train"])` hashes the source of every `hsat` module that the entry
modules import, directly or through each other, at module level or inside functions, plus the
package data they read (the config schema). A new module imported by the training code is
therefore part of the pretraining stage's version without anyone listing it.

A module is hashed without its comments, docstrings and blank lines (`code_text`), the schema as
the data it parses to: editing the documentation reruns nothing, any change to what the code does
or to a default reruns the stages that read it.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import io
import json
import tokenize
from pathlib import Path
from typing import Iterable

import yaml

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


def _docstring_nodes(tree: ast.Module) -> list[ast.Expr]:
    """The docstring statements of a module and of every class and function in it."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                found.append(first)
    return found


def code_text(source: str) -> str:
    """`source` without comments, docstrings, trailing spaces and blank lines: what the code does.

    Spans come from the tokenizer (comments) and the parser (docstrings), then are cut from the
    text itself, so the result does not depend on how a Python version tokenizes the rest.
    """
    lines = source.splitlines()
    spans: list[tuple[int, int, int, int]] = [
        (*tok.start, *tok.end)
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    ]
    # The parser counts columns in UTF-8 bytes, the tokenizer and str slicing in characters.
    char = lambda line, col: len(lines[line - 1].encode()[:col].decode(errors="ignore"))  # noqa: E731
    spans += [(n.lineno, char(n.lineno, n.col_offset), n.end_lineno, char(n.end_lineno, n.end_col_offset))
              for n in _docstring_nodes(ast.parse(source))]
    # Cut from the end so earlier positions stay valid; a docstring may span several lines.
    for l1, c1, l2, c2 in sorted(spans, reverse=True):
        head, tail = lines[l1 - 1][:c1], lines[l2 - 1][c2:]
        lines[l1 - 1 : l2] = [head + tail]
    return "\n".join(line.rstrip() for line in lines if line.strip())


@functools.lru_cache(maxsize=None)
def _content_digest(path: Path, mtime_ns: int, size: int) -> bytes:
    """sha256 of what a file means to a stage: `code_text` of a module, the parsed data of YAML."""
    text = path.read_text(encoding="utf-8")
    content = code_text(text) if path.suffix == ".py" else json.dumps(yaml.safe_load(text), sort_keys=True)
    return hashlib.sha256(content.encode()).digest()


def code_version(entries: Iterable[str]) -> str:
    """sha256 (16 hex) of the code (`code_text`) in `module_closure(entries)` and the package data.

    This module is left out of its own hash: what it contributes is the hash itself, so a change
    to how code is read shows as new versions exactly where it reads the code differently."""
    own = module_file(__name__)
    files = [path for path in module_closure(list(entries)) if path != own]
    data = sorted(p for pattern in DATA_FILES for p in SRC.glob(pattern))
    h = hashlib.sha256()
    for path in files + data:
        stat = path.stat()
        h.update(path.relative_to(SRC).as_posix().encode())
        h.update(_content_digest(path, stat.st_mtime_ns, stat.st_size))
    return h.hexdigest()[:16]
