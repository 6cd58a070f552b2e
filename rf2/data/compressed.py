"""Compressed data files are named as such, instead of failing as malformed text.

rf2's loaders read plain text. A gzip-compressed ``u.data`` used to be reported as
"expected 4 fields, found 1"; now it is one error that says what the file is and how to
fix it. Detection is by magic bytes (the first few bytes), not by file name.
"""

from __future__ import annotations

from pathlib import Path

from rf2.core.errors import DataError

# (magic bytes, format, command that decompresses it)
_MAGIC = (
    (b"\x1f\x8b", "gzip", "gunzip -k"),
    (b"BZh", "bzip2", "bunzip2 -k"),
    (b"\xfd7zXZ\x00", "xz", "unxz -k"),
    (b"\x28\xb5\x2f\xfd", "zstd", "unzstd"),
    (b"PK\x03\x04", "zip", "unzip"),
)
SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".zip")


def compression_of(path: Path) -> tuple[str, str] | None:
    """(format, decompress command) when ``path`` starts like a compressed file."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return None  # the reader that opens it next reports why it cannot
    return next(((fmt, cmd) for magic, fmt, cmd in _MAGIC if head.startswith(magic)), None)


def refuse_compressed(path: Path) -> None:
    """Raise a DataError naming the compression if ``path`` is a compressed file."""
    found = compression_of(path)
    if found is not None:
        fmt, cmd = found
        raise DataError(str(path), f"is a {fmt}-compressed file; rf2 reads plain text: "
                        f"decompress it first ({cmd} {path.name})")


def compressed_sibling(path: Path) -> Path | None:
    """``path`` + a compression suffix, if such a file exists (for 'missing' errors)."""
    return next((p for p in (path.with_name(path.name + s) for s in SUFFIXES) if p.is_file()),
                None)
