"""Atomic writes: a reader sees the old file or the whole new one, never half of it."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import IO, Any, Iterator

import yaml

from hsat.errors import HSATError


def _fresh_name(parent: Path, prefix: str, suffix: str, create: Any) -> Path:
    """Call `create(path)` on a new random name in `parent` until one does not exist yet."""
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            create(path)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no free temporary name {prefix}*{suffix} in {parent}")


def make_temp_file(parent: str | os.PathLike, prefix: str = "", suffix: str = ".tmp") -> Path:
    """Create an empty file with a new name in `parent`, with the mode a plain `open` gives.

    `tempfile.mkstemp` creates 0600 whatever the umask, and the rename that makes the file the
    result keeps that mode: colleagues sharing a results folder could not read it. Here the
    umask decides (0644 under the usual 022), as for any file the user writes.
    """
    def create(path: Path) -> None:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))

    return _fresh_name(Path(parent), prefix, suffix, create)


def make_temp_dir(parent: str | os.PathLike, prefix: str = "") -> Path:
    """Create an empty folder with a new name in `parent`, with the mode `mkdir` gives (the
    umask decides, unlike `tempfile.mkdtemp`'s 0700)."""
    return _fresh_name(Path(parent), prefix, "", lambda path: path.mkdir(0o777))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it over `path`, else delete it.

    Use for writers that want a filename (torch.save, safetensors, DataFrame.to_csv).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = make_temp_file(path.parent, prefix=f".{path.name}.", suffix=suffix or path.suffix or ".tmp")
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kw: Any) -> Iterator[IO]:
    """Open a temporary file for writing; it replaces `path` only if the block succeeds."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **kw) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_yaml(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, yaml.safe_dump(obj, sort_keys=False))


def write_csv(path: str | os.PathLike, df: "Any", **kw: Any) -> None:
    """Write a pandas DataFrame as CSV atomically (index off unless asked)."""
    kw.setdefault("index", False)
    with atomic_path(path, suffix=".csv") as tmp:
        df.to_csv(tmp, **kw)


def read_tidy(path: str | os.PathLike) -> "Any":
    """Read a tidy result CSV; an empty file (a stage with nothing to report) is an empty frame."""
    import pandas as pd  # local: the workflow imports hsat.io and only the report reads CSVs

    path = Path(path)
    if not path.is_file():
        raise HSATError(f"result file not found: {path}")
    if path.stat().st_size == 0:
        return pd.DataFrame()
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise HSATError(f"{path}: not a result CSV ({exc})") from exc
