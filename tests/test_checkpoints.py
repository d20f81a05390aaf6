"""Checkpoint manifests and consolidated export: the completeness contract, corruption, refusal."""

import json

import pytest

from wam.platform.checkpoints import (
    MANIFEST_NAME,
    latest_complete,
    list_checkpoints,
    read_manifest,
    verify,
    write_manifest,
)
from wam.platform.errors import CheckpointError


def fake_checkpoint(folder, step, complete=True, payload=b"weights"):
    path = folder / f"step-{step}"
    path.mkdir(parents=True)
    (path / ".metadata").write_bytes(b"meta")
    (path / "__0_0.distcp").write_bytes(payload)
    if complete:
        write_manifest(str(path), step, {"model": {"preset": "tiny"}}, {"loss": 1.0})
    return path


def test_manifest_lists_every_file_with_size_and_checksum(tmp_path):
    path = fake_checkpoint(tmp_path, 3)
    manifest = read_manifest(str(path))
    assert manifest.step == 3 and manifest.metrics == {"loss": 1.0}
    assert {(f.path, f.size) for f in manifest.files} == {(".metadata", 4), ("__0_0.distcp", 7)}
    assert json.loads((path / MANIFEST_NAME).read_text())["format"] == "torch-dcp"
    assert verify(str(path), manifest) == []


def test_verify_detects_missing_resized_and_corrupted_files(tmp_path):
    path = fake_checkpoint(tmp_path, 1)
    manifest = read_manifest(str(path))
    (path / "__0_0.distcp").write_bytes(b"WEIGHTS")  # same size, different bytes
    assert verify(str(path), manifest) == ["__0_0.distcp: sha256 differs from the manifest"]
    assert verify(str(path), manifest, checksums=False) == []
    (path / "__0_0.distcp").write_bytes(b"short")
    assert "5 bytes, manifest says 7" in verify(str(path), manifest, checksums=False)[0]
    (path / ".metadata").unlink()
    assert ".metadata: missing" in verify(str(path), manifest)


def test_only_checkpoints_with_a_manifest_are_complete(tmp_path):
    fake_checkpoint(tmp_path, 2)
    fake_checkpoint(tmp_path, 4)
    fake_checkpoint(tmp_path, 6, complete=False)  # an interrupted save
    (tmp_path / "notes").mkdir()
    assert [(s, ok) for s, _, ok in list_checkpoints(str(tmp_path))] == [(2, True), (4, True), (6, False)]
    assert latest_complete(str(tmp_path))[0] == 4
    assert latest_complete(str(tmp_path / "missing")) is None


def test_export_refuses_incomplete_and_corrupted_checkpoints(tmp_path):
    from wam.trainer.export import export_checkpoint

    incomplete = fake_checkpoint(tmp_path / "a", 6, complete=False)
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        export_checkpoint(str(incomplete), tmp_path / "out.safetensors")
    corrupted = fake_checkpoint(tmp_path / "b", 2)
    (corrupted / "__0_0.distcp").write_bytes(b"tamperd")
    with pytest.raises(CheckpointError, match="sha256 differs"):
        export_checkpoint(str(tmp_path / "b"), tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
