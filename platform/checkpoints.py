"""Checkpoints: where they live, and the manifest that says one is complete (the contract between
training and every later stage).

Layout, defined here in both directions (build a path with the functions below, and take one apart
with them too, never by slicing strings):

    <run dir>/checkpoints            a local run's series (`checkpoint.uri` overrides it; any fsspec URI)
    <series>/step-<N>                one checkpoint: torch.distributed.checkpoint files + manifest.json
    <series>/nvfp4/step-<N>          its NVFP4 model (`wam quantize`; beside the series, so retention of
                                     checkpoints never removes a model that is being served)

A checkpoint (or a quantized model) is complete when its `manifest.json` (step, every file with size and
sha256, the config, the metrics at that step) exists, written LAST. No manifest means not complete:
never resumed from, never handed off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from wam.platform.errors import CheckpointError, ConfigError
from wam.platform.storage import basename, filesystem, is_remote, join, local_path, parent, write_atomic

log = logging.getLogger("wam.checkpoints")
MANIFEST_NAME = "manifest.json"
RUN_SERIES = "checkpoints"  # a local run's series, inside its run directory
QUANTIZED = "nvfp4"  # quantized models, inside a series
_STEP_DIR = re.compile(r"^step-(\d+)$")
FORMAT = "torch-dcp"  # a training checkpoint; a quantized model's manifest names its own format


# -- the layout -------------------------------------------------------------------------------------------


def run_series(run_dir: Path) -> str:
    """The series of a local run that names no `checkpoint.uri`."""
    return str(run_dir / RUN_SERIES)


def step_dir(series: str, step: int) -> str:
    return join(series, f"step-{step}")


def quantized_uri(series: str, step: int) -> str:
    """The NVFP4 model of `<series>/step-<step>`."""
    return join(series, QUANTIZED, f"step-{step}")


def step_of(checkpoint: str) -> int | None:
    """N of a `step-N` folder (a checkpoint or a quantized model), else None."""
    match = _STEP_DIR.match(basename(checkpoint))
    return int(match.group(1)) if match else None


def series_of(checkpoint: str) -> str:
    """The series a checkpoint folder (`<series>/step-N`) or quantized model (`<series>/nvfp4/step-N`) is in."""
    if step_of(checkpoint) is None:
        raise ValueError(f"{checkpoint} is not a step-N folder")
    folder = parent(checkpoint)
    return parent(folder) if basename(folder) == QUANTIZED else folder


def run_dir_of(series: str) -> Path | None:
    """The local run directory whose default series this is, else None (a remote or configured series)."""
    if is_remote(series) or basename(series) != RUN_SERIES:
        return None
    return local_path(series).resolve().parent


# -- manifests --------------------------------------------------------------------------------------------


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


def write_manifest(checkpoint: str, step: int, config: dict, metrics: dict, threads: int = 8,
                   format: str = FORMAT) -> CheckpointManifest:
    """Hash every file of a finished checkpoint folder (`format`: a DCP training checkpoint, or another stage's
    output) and write its manifest last."""
    fs, root, files = _data_files(checkpoint)
    if not files:
        raise FileNotFoundError(f"checkpoint {checkpoint} holds no files")
    with ThreadPoolExecutor(max_workers=threads) as pool:  # hashlib releases the GIL on large blocks
        digests = list(pool.map(lambda p: _sha256(fs, p), files))
    entries = [FileEntry(p[len(root) + 1:], fs.size(p), d) for p, d in zip(files, digests, strict=True)]
    manifest = CheckpointManifest(step=step, files=entries, config=config, metrics=metrics, format=format)
    write_atomic(join(checkpoint, MANIFEST_NAME), manifest.to_json())
    return manifest


def read_manifest(checkpoint: str) -> CheckpointManifest | None:
    """The checkpoint's manifest, None when it has none (not complete); CheckpointError when it is unreadable."""
    fs, path = filesystem(join(checkpoint, MANIFEST_NAME))
    if not fs.exists(path):
        return None
    try:
        with fs.open(path, "r") as f:
            return CheckpointManifest.from_json(f.read())
    except (ValueError, TypeError, KeyError) as err:  # truncated or edited JSON, missing fields
        raise CheckpointError(f"{join(checkpoint, MANIFEST_NAME)} is corrupt ({type(err).__name__}: {err}); the "
                              "checkpoint cannot be trusted: use an older one, or delete this folder") from None


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
    # Other processes write here: listings cached by this process's filesystem object (s3fs keeps them
    # until invalidated) would hide their newer checkpoints and manifests from a long-running reader.
    fs.invalidate_cache()
    if not fs.exists(root):
        return []
    found = []
    for entry in fs.ls(root, detail=False):
        step = step_of(entry)
        if step is not None:
            found.append((step, step_dir(folder, step), fs.exists(join(entry, MANIFEST_NAME))))
    return sorted(found)


def latest_complete(folder: str) -> tuple[int, str] | None:
    """The newest checkpoint with a readable manifest: one whose manifest is corrupt is passed over, with a warning."""
    for step, uri, ok in reversed(list_checkpoints(folder)):
        if not ok:
            continue
        try:
            read_manifest(uri)
        except CheckpointError as err:
            log.warning("passing over %s: %s", uri, err)
            continue
        return step, uri
    return None


def require_complete(uri: str, *, newest_under: bool = True, what: str = "checkpoint", hint: str = "",
                     checksums: bool = True) -> tuple[str, CheckpointManifest]:
    """`uri` (or, with `newest_under`, the newest complete checkpoint under it) with its manifest, every file
    checked against it (sizes, and with `checksums` sha256). Refuses a folder without a manifest (an unfinished
    save: `hint` says what to do) and files that differ from their manifest."""
    manifest = read_manifest(uri)
    if manifest is None and newest_under:
        newest = latest_complete(uri)
        if newest is not None:
            uri, manifest = newest[1], read_manifest(newest[1])
    if manifest is None:
        holds = " and holds none" if newest_under else ""
        raise CheckpointError(f"{uri} is not a complete {what} (no {MANIFEST_NAME}){holds}" + (f"; {hint}" if hint else ""))
    problems = verify(uri, manifest, checksums=checksums)
    if problems:
        raise CheckpointError(f"{what} {uri} does not match its manifest: " + "; ".join(problems[:5]))
    return uri, manifest


# -- what a folder holds (checked before torch loads: a wrong folder is named at once) ---------------------

WEIGHT_DTYPES = ("bfloat16", "float32")  # what a model's weights are written as (`wam export`, `wam model import`)


def check_weight_dtype(dtype: str) -> None:
    if dtype not in WEIGHT_DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of {', '.join(WEIGHT_DTYPES)}")


def _is_quantized(manifest: CheckpointManifest) -> bool:
    """A quantized model's manifest (its format; before formats were recorded, its policy.json tells)."""
    return manifest.format != FORMAT or any(f.path == "policy.json" for f in manifest.files)


def require_training_checkpoint(uri: str, checksums: bool = True) -> tuple[str, CheckpointManifest]:
    """A complete training checkpoint (`uri`, or the newest complete one under it) and its manifest; a quantized
    model is refused, naming what to do with it."""
    folder, manifest = require_complete(uri, checksums=checksums)
    if _is_quantized(manifest):
        source = manifest.metrics.get("source")
        raise CheckpointError(f"{folder} is a quantized model (from `wam quantize`), not a training checkpoint: "
                              f"serve it with `wam serve {folder}`"
                              + (f", or use the checkpoint it came from, {source}" if source else ""))
    return folder, manifest


def require_quantized_model(uri: str, checksums: bool = True) -> CheckpointManifest:
    """The manifest of the complete quantized model folder `uri`; a training checkpoint is refused, naming the command
    that quantizes it."""
    _, manifest = require_complete(uri, newest_under=False, what="quantized model", checksums=checksums,
                                   hint="run `wam quantize` on a complete training checkpoint and serve its output folder")
    if not _is_quantized(manifest):
        raise CheckpointError(f"{uri} is a training checkpoint, not a quantized model: quantize it first with "
                              f"`wam quantize {uri}`, then serve the folder it writes")
    return manifest
