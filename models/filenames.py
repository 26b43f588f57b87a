"""File names for data ids: an id is data, never a path component.

Study and image ids come from user manifests and may hold `..`, `/`, NUL, thousands of characters or any
script. A file named after one must stay inside its folder, be a legal name everywhere, and not collide
with the name of another id, so an id that is not already a short plain name is encoded.
"""

from __future__ import annotations

import hashlib
import re

_PLAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,79}")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_stem(identifier: str) -> str:
    """A file-name stem for `identifier`: the id itself when it is a short plain name, else a readable
    ASCII prefix of it plus `~` and a hash of the whole id (`~` never occurs in a plain name, so an encoded
    name cannot equal another id's plain one)."""
    if _PLAIN.fullmatch(identifier) and ".." not in identifier:
        return identifier
    digest = hashlib.sha256(identifier.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    readable = _UNSAFE.sub("_", identifier).strip("._-")[:40]
    return f"{readable}~{digest}" if readable else f"id~{digest}"


def printable(identifier: str) -> str:
    """The id with control characters (NUL, newlines) shown as `?`, for titles and log lines."""
    return "".join(c if c.isprintable() else "?" for c in identifier)
