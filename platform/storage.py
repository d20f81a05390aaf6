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

from wam.platform.errors import StorageError

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


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or URI."""
    if is_remote(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(local_path(base), *parts))


def parent(uri: str) -> str:
    """The folder holding a local path or URI."""
    if is_remote(uri):
        return uri.rstrip("/").rsplit("/", 1)[0]
    return str(local_path(uri).parent)


def basename(uri: str) -> str:
    """The last part of a local path or URI."""
    return uri.rstrip("/").rsplit("/", 1)[-1] if is_remote(uri) else local_path(uri).name


def filesystem(uri: str):
    """(fsspec filesystem, path within it) for a local path or URI."""
    return url_to_fs(str(uri) if is_remote(uri) else str(local_path(uri)))


def write_atomic(uri: str, data: str | bytes) -> None:
    """Write a small file so that readers see the old file, or none, or the whole new one."""
    if is_remote(uri):
        with fsspec.open(uri, "wb" if isinstance(data, bytes) else "w") as f:  # object stores publish in one PUT
            f.write(data)
        return
    path = local_path(uri)
    tmp = path.with_name(f".{path.name}.tmp")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data)
    os.replace(tmp, path)


def probe_writable(uri: str) -> None:
    """Create `uri` (a folder) if needed and write and delete a file there; raise a clear error if not."""
    fs, path = filesystem(uri)
    probe = f"{path.rstrip('/')}/.wam-write-probe"
    try:
        fs.makedirs(path, exist_ok=True)
        with fs.open(probe, "wb") as f:
            f.write(b"ok")
        fs.rm(probe)
    except Exception as err:  # noqa: BLE001 - any storage failure means the same thing to the user
        raise StorageError(f"cannot write to {uri}: {type(err).__name__}: {err}. Fix the path or its credentials "
                      "(for s3:// set AWS_* variables or AWS_ENDPOINT_URL) and start again") from err
