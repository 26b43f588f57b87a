"""Hashes and cheap stamps of output files and folders (weights, adapters, tokenizers, plots).

A stamp (relative paths, sizes, mtimes) costs a `stat` per file; the content hash reads every byte. The
success record keeps both, so checking an untouched output costs a stat, and a changed stamp triggers the
full hash: an edit that keeps size and mtime is the only one that goes unseen, as with make or rsync.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

CHUNK = 1 << 20


def list_files(path: Path) -> list[Path]:
    """The file itself, or every file under a folder in a stable order (symlinked folders not entered)."""
    if path.is_file():
        return [path]
    out = []
    for root, dirs, names in os.walk(path):
        dirs.sort()
        out += [Path(root) / n for n in sorted(names)]
    return out


def _text_hash(value: object) -> str:
    return hashlib.sha256(json.dumps(value, separators=(",", ":")).encode()).hexdigest()


def stamp(path: Path) -> str:
    """Relative names, sizes and mtimes of a file or of every file under a folder.

    A symlink that leads nowhere (dangling, or a loop) is stamped by the link itself: an input tree may hold
    one (the extraction rejects it, naming the file), and the stage's cache key must still be computable."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: does not exist")
    entries = []
    for f in list_files(path):
        try:
            st = f.stat()
        except OSError:
            if not f.is_symlink():
                raise
            st = f.lstat()
        entries.append([f.relative_to(path).as_posix() if f != path else f.name, st.st_size, st.st_mtime_ns])
    return _text_hash(entries)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def content_hash(path: Path) -> str:
    """SHA-256 of a file, or of a folder's relative names and file hashes (names matter, mtimes do not)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: does not exist")
    if path.is_file():
        return sha256_file(path)
    return _text_hash([[f.relative_to(path).as_posix(), sha256_file(f)] for f in list_files(path)])
