"""text8 (Mahoney, 2006): the first 10^8 characters of a cleaned 2006 English Wikipedia dump.

The file cannot be downloaded here (no network); fetch ``http://mattmahoney.net/dc/text8.zip``
elsewhere and pass its path (the zip or the extracted ``text8``). The format is a single
line of ``a-z`` and single spaces, with no newline.
"""

from __future__ import annotations

import os
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np

from maskdiff.data._cache import default_cache_dir
from maskdiff.data.errors import DataError, one_line
from maskdiff.data.splits import TokenSplits, split_90_5_5
from maskdiff.data.tokenizers import CharTokenizer, text8_bytes_to_ids

__all__ = ["load_text8", "find_text8", "read_text8_ids", "TEXT8_URL"]

TEXT8_URL = "http://mattmahoney.net/dc/text8.zip"
TEXT8_CHARS = 100_000_000

PathLike = str | os.PathLike[str]


def find_text8(path: PathLike | None = None, cache_dir: PathLike | None = None) -> Path:
    """Locate the text8 file.

    ``path`` may be the ``text8`` file, ``text8.zip``, or a directory containing either.
    Without ``path`` the cache directory (``$MASKDIFF_CACHE`` or ``~/.cache/maskdiff``) is
    searched.

    Raises:
        FileNotFoundError: with download instructions.
    """
    if path is not None:
        p = Path(path).expanduser()
        candidates = [p / "text8", p / "text8.zip"] if p.is_dir() else [p]
    else:
        root = default_cache_dir(cache_dir)
        candidates = [root / "text8", root / "text8.zip"]
    for c in candidates:
        if c.is_file():
            return c
    looked = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"text8 not found (looked for {looked}). It cannot be fetched automatically here "
        f"(no network access): download {TEXT8_URL} (31 MB) on a machine with internet, "
        "copy it over and pass path='/path/to/text8.zip' (or the unzipped 'text8'), or put it "
        "in the cache directory ($MASKDIFF_CACHE or ~/.cache/maskdiff)."
    )


def read_text8_ids(path: PathLike) -> np.ndarray:
    """Read a ``text8`` file or ``text8.zip`` and map it to ids (space=0, a..z=1..26).

    A zip must contain a member named ``text8`` (or exactly one member).

    Returns:
        ``uint8`` array of shape ``(n_chars,)``.

    Raises:
        ValueError: the content is not text8 format (names the first bad byte).
    """
    path = Path(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if not n.endswith("/")]
            member = next((n for n in names if Path(n).name == "text8"), None)
            if member is None:
                if len(names) != 1:
                    raise ValueError(
                        f"{path} is a zip without a 'text8' member (members: {names[:10]}); "
                        f"expected the archive from {TEXT8_URL}"
                    )
                member = names[0]
            try:
                raw = zf.read(member)
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
                raise DataError(
                    f"{path} is a damaged zip ({type(e).__name__}: {one_line(e)}): download {TEXT8_URL} again"
                ) from e
        source = f"{path}!{member}"
    else:
        raw = path.read_bytes()
        source = str(path)
    if not raw:
        raise ValueError(
            f"{source} is empty; expected text8 ({TEXT8_CHARS:,} characters of a-z and space)"
        )
    return text8_bytes_to_ids(raw, source=source)


def load_text8(*, path: PathLike | None = None, cache_dir: PathLike | None = None) -> TokenSplits:
    """text8 as character ids (vocab 27), split first 90M / next 5M / last 5M characters.

    The split is :func:`~maskdiff.data.splits.split_90_5_5`: ``train = n*9//10`` chars,
    ``validation = n//20``, ``test`` = the rest. For the real 100,000,000-character file this
    is exactly the standard 90M / 5M / 5M split; smaller files (e.g. test fixtures) are
    split in the same 90/5/5 proportions. Nothing is cached: reading and mapping the file
    is a few vectorised passes (about a second for the full file).

    Args:
        path: ``text8``, ``text8.zip`` or a directory containing one (see :func:`find_text8`).
        cache_dir: searched for the file when ``path`` is None.
    """
    t0 = time.perf_counter()
    file = find_text8(path, cache_dir)
    ids = read_text8_ids(file)
    a, b = split_90_5_5(len(ids))
    meta = {
        "source": str(file),
        "from_cache": False,
        "seconds": time.perf_counter() - t0,
        "standard_size": len(ids) == TEXT8_CHARS,
    }
    return TokenSplits("text8", 27, CharTokenizer(), ids[:a], ids[a:b], ids[b:], meta)
