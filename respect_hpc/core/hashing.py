"""Content hashes: of input files and folders, and of the specs that make a task's output.

A task's output records the hash of its spec (its resolved settings, the digests of
its inputs, the code version); an output whose recorded hash equals the current
one is done, and the controller skips its task.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from respect_hpc import __version__

_MEMO: dict[tuple, str] = {}


def bytes_digest(file: Path) -> str:
    """A digest of one file's bytes, memoised in this process by path, size, inode, modification and change
    times (a file rewritten in place with its old size and modification time has a new change time)."""
    stat = file.stat()
    key = (str(file.resolve()), stat.st_size, stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns)
    if key not in _MEMO:
        digest = hashlib.blake2b(digest_size=16)
        with file.open("rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
        _MEMO[key] = digest.hexdigest()
    return _MEMO[key]


def file_digest(path: Path | None) -> str | None:
    """A digest of a file's bytes, or of a folder's files (names and bytes)."""
    if path is None or not path.exists():
        return None
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.blake2b(digest_size=16)
    for file in files:
        digest.update(f"{file.relative_to(path) if file != path else file.name}:{bytes_digest(file)}\n".encode())
    return digest.hexdigest()


def spec_hash(spec: dict) -> str:
    """The hash of a task spec (JSON-able), with the code version in it."""
    text = json.dumps({**spec, "code": __version__}, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
