"""Atomic writes: a reader sees the old file or the whole new one, never half of it.

A write the operating system refuses (a full disk, a read-only folder, no permission) leaves
nothing behind and raises `OSError` naming the file that was being written, whatever library
did the writing: the command line turns it into one line and exit status `WRITE_ERROR`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
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


WRITE_ERROR = 74
"""Exit status of a command whose output the operating system refused to store (sysexits' EX_IOERR)."""

# safetensors (Rust) reports an I/O failure as text: "... No space left on device (os error 28)".
_OS_ERROR_TEXT = re.compile(r"\(os error (\d+)\)")


def write_error(exc: BaseException, path: str | os.PathLike) -> OSError | None:
    """The OS error behind a writer's failure, as an OSError naming `path`; None if it was none.

    Writers report the same refusal differently (Python raises OSError, safetensors a
    SafetensorError quoting the errno); the user needs the file and the cause, e.g.
    `results/x.pt: No space left on device`.
    """
    if isinstance(exc, OSError):
        code = exc.errno
    else:
        match = _OS_ERROR_TEXT.search(str(exc))
        code = int(match.group(1)) if match else None
    if code is None:
        return None
    return OSError(code, os.strerror(code), str(path))


def describe_os_error(exc: OSError) -> str:
    """One line for a user: the file, the cause, and for a full disk what to do."""
    name = errno.errorcode.get(exc.errno, "") if exc.errno is not None else ""
    where = f"{exc.filename}: " if exc.filename else ""
    text = f"{where}{exc.strerror or exc}{f' ({name})' if name else ''}"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        text += "; free disk space, then rerun the same command (finished work is kept)"
    return text


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it over `path`, else delete it.

    Use for writers that want a filename (safetensors, DataFrame.to_csv, savefig). A failure the
    operating system caused is re-raised as `write_error` (an OSError naming `path`).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = make_temp_file(path.parent, prefix=f".{path.name}.", suffix=suffix or path.suffix or ".tmp")
    except OSError as exc:
        raise write_error(exc, path) from exc
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException as exc:
        tmp_path.unlink(missing_ok=True)  # first: on a full disk this frees the room the message needs
        about_other_file = isinstance(exc, OSError) and exc.filename not in (None, str(tmp_path), str(path))
        refused = write_error(exc, path) if isinstance(exc, Exception) and not about_other_file else None
        if refused is not None:
            raise refused from exc
        raise


class _KeepWriteErrors:
    """A binary file wrapper that remembers the OSError of a failed write. torch.save's C++
    writer turns it into `RuntimeError: unexpected pos ...`, which says nothing of the disk."""

    def __init__(self, fh: IO[bytes]) -> None:
        self.fh, self.error = fh, None

    def write(self, data: bytes) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.fh.flush()


@contextlib.contextmanager
def atomic_stream(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """A binary file object whose bytes replace `path` only if the block succeeds.

    For writers that take a file object (torch.save): the file's content then depends on the
    data only -- torch names the archive's members after a file name it is given, and a temporary
    name is random -- and a refused write is raised as the OSError it was.
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as raw:
        stream = _KeepWriteErrors(raw)
        try:
            yield stream  # type: ignore[misc]
            raw.flush()
            os.fsync(raw.fileno())
        except Exception as exc:
            if stream.error is not None and stream.error is not exc:
                raise stream.error from exc
            raise


# What atomic_path names its temporary file: "." + the target's name + "." + 12 random hex digits
# (make_temp_file; mkstemp's 8 characters in files left by earlier versions) + the suffix (the
# target's own, or ".tmp").
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?:[0-9a-f]{12}|[a-z0-9_]{8})(?P<suffix>\.[^.]+)$")


def is_temporary(name: str) -> bool:
    """Whether a file name is that of an atomic write's temporary file."""
    match = _TEMPORARY.match(name)
    return bool(match) and (match["name"].endswith(match["suffix"]) or match["suffix"] == ".tmp")


def temporary_dir_prefix(path: str | os.PathLike, kind: str = "tmp") -> str:
    """The name prefix (for `make_temp_dir`) of a folder a writer builds `path` in ("tmp") or
    moves an old `path` aside to ("old") before renaming: `remove_temporaries` knows it."""
    return f".{Path(path).name}.{kind}-"


def remove_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete what interrupted atomic writes of `path` left beside it; returns them.

    A kill during a write leaves its temporary file, or for a folder written whole (a synthetic
    cohort) the folder it was being built in or the old one moved aside
    (`temporary_dir_prefix`); only the one process that writes `path` may call this (another's
    write in progress would lose it).
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    prefixes = "|".join(re.escape(temporary_dir_prefix(path, kind)) for kind in ("tmp", "old"))
    folder = re.compile(f"(?:{prefixes})[0-9a-f]{{12}}")  # make_temp_dir's 12 random hex digits
    return _remove(sorted(p for p in path.parent.glob(f".{path.name}.*")
                          if (p.is_file() and is_temporary(p.name)) or (p.is_dir() and folder.fullmatch(p.name))))


def _remove(paths: list[Path]) -> list[Path]:
    for tmp in paths:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
    return paths


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
