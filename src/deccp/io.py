"""Atomic writes and safe output directories: nothing already written is lost, sources are never touched."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from deccp import DeccpError


def _explain_os_error(exc: OSError, path: Path) -> DeccpError:
    if exc.errno == errno.ENOSPC:
        return DeccpError(f"{path}: no space left on device (free some disk space and re-run; finished steps are kept)")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return DeccpError(f"{path}: permission denied (choose another output directory)")
    return DeccpError(f"{path}: {exc.strerror or exc}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` through a temporary file in the same directory, then rename."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    except OSError as exc:
        raise _explain_os_error(exc, path) from exc
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `final` in one rename.

    If the body fails (or the process is killed), `final` is untouched and the temporary
    directory (named `.<name>.partial-*`) is never mistaken for a finished one.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise DeccpError(f"{final}: already exists (refusing to overwrite; pass another output directory)")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
        os.chmod(tmp, 0o755)
    except OSError as exc:
        raise _explain_os_error(exc, final) from exc
    try:
        yield tmp
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _explain_os_error(exc, final) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def clean_partials(parent: str | os.PathLike) -> None:
    """Remove leftovers of killed runs (`.<name>.partial-*`) in `parent`."""
    parent = Path(parent)
    if parent.is_dir():
        for p in parent.glob(".*.partial-*"):
            shutil.rmtree(p, ignore_errors=True)


def ensure_not_inside(output: str | os.PathLike, *sources: str | os.PathLike | None) -> Path:
    """Refuse an output directory that is, contains or lies inside any source model directory."""
    out = Path(output).resolve()
    for src in sources:
        if src is None:
            continue
        s = Path(src).resolve()
        if out == s or s in out.parents or out in s.parents:
            raise DeccpError(f"output {output} overlaps the source {src}: outputs never overwrite inputs")
    return out


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_jsonl_objects(path: str | os.PathLike, *, missing_hint: str = "") -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a JSONL file; errors name `file:line`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DeccpError(f"{path}: no such file{missing_hint}") from None
    except UnicodeDecodeError as exc:
        raise DeccpError(f"{path}: not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise DeccpError(f"{path}: cannot read ({exc.strerror})") from None
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DeccpError(f"{path}:{i}: malformed JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise DeccpError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
        rows.append((i, row))
    return rows
