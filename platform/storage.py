"""Storage URIs: local paths and anything fsspec reads (s3://, gs://, memory://, ...), torch-free.

Large frozen weights are read through a local copy (`localize`): safetensors memory-maps them and a
pod restart reuses the copy. A copy is complete only once its marker file exists, so an interrupted
download is never mistaken for a finished one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import fsspec
from fsspec.core import url_to_fs

_COMPLETE = ".wam-complete"


def is_remote(uri: str | os.PathLike) -> bool:
    text = str(uri)
    return "://" in text and not text.startswith("file://")


def local_path(uri: str | os.PathLike) -> Path:
    text = str(uri)
    return Path(text[len("file://"):] if text.startswith("file://") else text)


def default_cache_dir() -> Path:
    return Path(os.environ.get("WAM_CACHE_DIR", Path.home() / ".cache" / "wam"))


def localize(uri: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local path holding the file or folder at `uri` (the path itself when it is local)."""
    if not is_remote(uri):
        path = local_path(uri)
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
        return path
    fs, remote = url_to_fs(str(uri))
    if not fs.exists(remote):
        raise FileNotFoundError(f"{uri} does not exist")
    root = Path(cache_dir or default_cache_dir()) / hashlib.sha256(str(uri).encode()).hexdigest()[:16]
    target = root / Path(remote.rstrip("/")).name
    if (root / _COMPLETE).exists():
        return target
    if root.exists():
        shutil.rmtree(root)  # an interrupted earlier copy
    root.mkdir(parents=True)
    fs.get(remote, str(target), recursive=fs.isdir(remote))
    (root / _COMPLETE).write_text(str(uri))
    return target


def open_uri(uri: str | os.PathLike, mode: str = "rb"):
    """Open a local path or fsspec URI."""
    return fsspec.open(str(uri), mode).open()
