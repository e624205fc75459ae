"""The files mxd keeps, read and written in one place: JSON whose parse errors name file and line,
atomic writes, SHA-256 checksums verified once per process, and names kept inside their folder.

Every damaged or edited file is reported as a `DamagedFileError` (a ValueError) that names it; a
write that fails (disk full, read-only folder) raises an OSError naming the file and leaves no
half-written file under the final name.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


class DamagedFileError(ValueError):
    """A file mxd wrote is missing, truncated, unparsable, out of its folder or fails its checksum."""


def read_text(path: str | Path) -> str:
    """The UTF-8 text of `path`; DamagedFileError naming it when it is not UTF-8 (a binary file)."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DamagedFileError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None


def read_json(path: str | Path) -> Any:
    """The JSON value in `path`; DamagedFileError naming file, line and column when it does not parse."""
    path = Path(path)
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DamagedFileError(f"{path}: invalid JSON at line {e.lineno} column {e.colno} ({e.msg})") from None


def read_jsonl(path: str | Path) -> list:
    """The JSON value of every non-blank line of `path`; DamagedFileError naming file and line."""
    path = Path(path)
    records = []
    for number, line in enumerate(read_text(path).splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DamagedFileError(f"{path}: invalid JSON at line {number} column {e.colno} ({e.msg})") from None
    return records


def finite_or_none(value: Any) -> Any:
    """`value` with every NaN or ±Inf float (also inside lists and dicts) replaced by None: strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call write(temporary path) and rename the result to `path`; on failure nothing is left behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1) + "\n"))


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """save_file, atomically; a failed write (disk full) raises OSError naming `path`."""
    def write(tmp: Path) -> None:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except SafetensorError as e:
            code = re.search(r"os error (\d+)", str(e))
            if code:
                raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from None
            raise OSError(f"{path}: cannot write ({e})") from None

    write_atomic(path, write)


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """load_file; DamagedFileError naming `path` when it is not a readable safetensors file."""
    try:
        return load_file(str(path), device=str(device))
    except SafetensorError as e:
        raise DamagedFileError(f"{path}: not a readable safetensors file ({e})") from None


def write_folder_atomic(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call write(temporary folder) and rename the result to `path`, replacing what was there; on
    failure (disk full) the temporary folder is removed and `path` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


_VERIFIED: set[tuple] = set()  # (path, size, mtime, inode, sha256) of files checked in this process


def _stamp(path: Path, expected: str) -> tuple:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, expected


def remember_verified(path: str | Path, expected: str) -> None:
    """Record that `path` (as it is now) has SHA-256 `expected`, e.g. right after writing it."""
    _VERIFIED.add(_stamp(Path(path), expected))


def has_sha256(path: str | Path, expected: str) -> bool:
    """Whether `path` has SHA-256 `expected`; a file unchanged (path, size, mtime, inode) since it
    last matched in this process is not read again."""
    stamp = _stamp(Path(path), expected)
    if stamp not in _VERIFIED:
        if sha256(path) != expected:
            return False
        _VERIFIED.add(stamp)
    return True


def check_sha256(path: str | Path, expected: str, fix: str) -> None:
    """DamagedFileError unless `path` has SHA-256 `expected`; `fix`: what to do about a mismatch."""
    if not has_sha256(path, expected):
        raise DamagedFileError(f"{path}: checksum mismatch (damaged or edited after it was written); {fix}")


def inside(folder: Path, name: Any, what: str) -> Path:
    """folder / name for a plain file name recorded in `what`; DamagedFileError for anything that could
    point elsewhere (a path with separators, '..', an absolute path, not a string)."""
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
        raise DamagedFileError(f"{what}: file name {name!r} is invalid: must be a plain file name inside {folder}")
    return folder / name
