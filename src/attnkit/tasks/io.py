"""Reading user files: paths that must exist (:func:`check_path`), UTF-8 text with errors that
name the file, the line and the column (:func:`decode_utf8`, :func:`split_lines`,
:func:`read_text_lines`), and warnings for the person at the command line (:func:`warn`).
Plain Python: the tasks' ``data.py`` modules read their files with it.
"""

from __future__ import annotations

import codecs
import gzip
import sys
from pathlib import Path


def check_path(name: str, path: str | Path, *, kind: str = "file") -> Path:
    """A data path that must exist, with an error naming the option and the path."""
    p = Path(path)
    if kind == "file" and p.is_dir():
        raise ValueError(f"{name}: {str(p)!r} is a folder; expected a file")
    if kind == "file" and not p.is_file():
        raise ValueError(f"{name}: no such file {str(p)!r}")
    if kind == "dir" and not p.is_dir():
        raise ValueError(f"{name}: no such folder {str(p)!r}")
    return p


def decode_utf8(data: bytes, where: str) -> str:
    """``data`` as UTF-8 text (a leading byte-order mark is dropped). Invalid bytes raise
    ``ValueError`` naming ``where`` (e.g. ``"--data: 'x.tsv'"`` or ``"stdin"``), the line, the
    column and the byte.

    Example::

        >>> decode_utf8(b"ok\\nb\\xffd", "stdin")
        Traceback (most recent call last):
        ...
        ValueError: stdin line 2 is not UTF-8 text (byte 0xff at column 2)
    """
    skip = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = skip + e.start
        line = data.count(b"\n", 0, at) + 1
        column = at - (data.rfind(b"\n", 0, at) + 1) + 1  # in bytes, from 1
        raise ValueError(f"{where} line {line} is not UTF-8 text (byte 0x{data[at]:02x} at column {column})") from None


def split_lines(text: str) -> list[str]:
    """Lines split at ``\\n`` only (so they number as editors and ``wc -l`` count them), without
    their ``\\r\\n`` / ``\\n`` ends; a final line end does not start another line."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def read_text_lines(path: str | Path, where: str) -> list[str]:
    """The lines of a UTF-8 text file, plain or gzipped (see :func:`split_lines`). ``where`` starts
    every error message (e.g. ``"--data: 'x.tsv'"``): an unreadable file, a corrupt gzip stream,
    or bytes that are not UTF-8 (with the line and column)."""
    try:
        data = Path(path).read_bytes()
        if data[:2] == b"\x1f\x8b":  # gzip magic
            data = gzip.decompress(data)
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{where}: cannot read it ({e})") from None
    return split_lines(decode_utf8(data, where))


def warn(message: str) -> None:
    """Tell the person at the command line (one line on stderr, like the CLI's errors)."""
    print(f"attnkit: warning: {message}", file=sys.stderr, flush=True)
