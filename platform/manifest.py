"""Checkpoint manifests: the contract between training and every later stage.

A checkpoint is the folder `<checkpoint uri>/step-<N>` written by torch.distributed.checkpoint, plus
`manifest.json` (step, every file with size and sha256, the config, the metrics at that step), written
LAST. No manifest means not complete: never resumed from, never handed off.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from wam.platform.storage import filesystem, join, write_text_atomic

MANIFEST_NAME = "manifest.json"
STEP_DIR = re.compile(r"^step-(\d+)$")
FORMAT = "torch-dcp"


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the checkpoint folder
    size: int
    sha256: str


@dataclass
class CheckpointManifest:
    step: int
    files: list[FileEntry]
    config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    format: str = FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CheckpointManifest:
        data = json.loads(text)
        data["files"] = [FileEntry(**f) for f in data["files"]]
        return cls(**data)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def step_dir(folder: str, step: int) -> str:
    return join(folder, f"step-{step}")


def _sha256(fs, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _data_files(checkpoint: str) -> tuple[object, str, list[str]]:
    fs, root = filesystem(checkpoint)
    root = root.rstrip("/")
    files = sorted(p for p in fs.find(root) if not p.endswith("/" + MANIFEST_NAME))
    return fs, root, files


def write_manifest(checkpoint: str, step: int, config: dict, metrics: dict, threads: int = 8) -> CheckpointManifest:
    """Hash every file of a finished checkpoint folder and write its manifest last."""
    fs, root, files = _data_files(checkpoint)
    if not files:
        raise FileNotFoundError(f"checkpoint {checkpoint} holds no files")
    with ThreadPoolExecutor(max_workers=threads) as pool:  # hashlib releases the GIL on large blocks
        digests = list(pool.map(lambda p: _sha256(fs, p), files))
    entries = [FileEntry(p[len(root) + 1:], fs.size(p), d) for p, d in zip(files, digests, strict=True)]
    manifest = CheckpointManifest(step=step, files=entries, config=config, metrics=metrics)
    write_text_atomic(join(checkpoint, MANIFEST_NAME), manifest.to_json())
    return manifest


def read_manifest(checkpoint: str) -> CheckpointManifest | None:
    fs, path = filesystem(join(checkpoint, MANIFEST_NAME))
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as f:
        return CheckpointManifest.from_json(f.read())


def verify(checkpoint: str, manifest: CheckpointManifest, checksums: bool = True) -> list[str]:
    """Problems of a checkpoint folder against its manifest (empty when intact)."""
    fs, root, files = _data_files(checkpoint)
    present = {p[len(root) + 1:]: p for p in files}
    problems = []
    for entry in manifest.files:
        path = present.get(entry.path)
        if path is None:
            problems.append(f"{entry.path}: missing")
        elif fs.size(path) != entry.size:
            problems.append(f"{entry.path}: {fs.size(path)} bytes, manifest says {entry.size}")
        elif checksums and _sha256(fs, path) != entry.sha256:
            problems.append(f"{entry.path}: sha256 differs from the manifest")
    return problems


def list_checkpoints(folder: str) -> list[tuple[int, str, bool]]:
    """(step, uri, complete) for every step folder under `folder`, by step."""
    fs, root = filesystem(folder)
    if not fs.exists(root):
        return []
    found = []
    for entry in fs.ls(root, detail=False):
        match = STEP_DIR.match(entry.rstrip("/").rsplit("/", 1)[-1])
        if match:
            step = int(match.group(1))
            uri = step_dir(folder, step)
            found.append((step, uri, fs.exists(f"{entry.rstrip('/')}/{MANIFEST_NAME}")))
    return sorted(found)


def latest_complete(folder: str) -> tuple[int, str] | None:
    complete = [(step, uri) for step, uri, ok in list_checkpoints(folder) if ok]
    return complete[-1] if complete else None
