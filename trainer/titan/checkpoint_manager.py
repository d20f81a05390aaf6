"""torchtitan's DCP checkpointing plus the platform's completeness contract.

After a checkpoint's data is durably written (at once for a synchronous save, when the future
completes for an async one), rank 0 hashes its files and writes `manifest.json` last, in a background
thread, then reports it (MLflow). Only checkpoints with a manifest are resumed from or kept by the
retention policy; half-written ones from a crash are cleaned up once a newer checkpoint is complete.
The checkpoint URI is probed for writability at start-up, so a bad URI fails before step 1.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torchtitan.components.checkpointer.dcp import AsyncMode, CheckpointManager

from wam.platform.checkpoints import (
    CheckpointManifest,
    list_checkpoints,
    read_manifest,
    verify,
    write_manifest,
)
from wam.platform.errors import CheckpointError
from wam.platform.storage import filesystem, localize, probe_writable

log = logging.getLogger("wam.checkpoint")


class WamCheckpointManager(CheckpointManager):
    @dataclass(kw_only=True, slots=True)
    class Config(CheckpointManager.Config):
        keep_complete: int = 3  # complete checkpoints kept (0 = all); replaces torchtitan's keep_latest_k
        init_weights: str | None = None  # safetensors loaded when no complete checkpoint exists

    def __init__(self, config: Config, **kwargs):
        super().__init__(config, **kwargs)
        if not self.enable:
            return
        self.keep_complete = config.keep_complete
        self.init_weights = config.init_weights
        self.coordinator = dist.get_rank() == 0
        # Set by the trainer: what a manifest records, and who to tell about a complete checkpoint.
        self.manifest_context: Callable[[], tuple[dict, dict]] = lambda: ({}, {})
        self.on_complete: Callable[[CheckpointManifest, str], None] | None = None
        self._finalizer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wam-manifest") if self.coordinator else None
        if self.coordinator:
            probe_writable(self.folder)
        if dist.is_initialized():
            # torchtitan asks every rank on its own whether the folder exists before the collective
            # _find_load_step; on S3 the probe object briefly makes it exist, so a rank checking during the
            # probe would enter the collective alone and hang. Everyone checks after the probe instead.
            dist.barrier()

    # -- saving ---------------------------------------------------------------------------------------

    def _save(self, curr_step: int, last_step: bool = False) -> bool:
        saved = super()._save(curr_step, last_step)
        if saved and self.coordinator:
            config, metrics = self.manifest_context()
            pending = self.save_future if (self.async_mode != AsyncMode.DISABLED and not last_step) else None
            self._finalizer.submit(self._finalize, curr_step, pending, config, metrics)
        return saved

    def _finalize(self, step: int, pending_save: Future | None, config: dict, metrics: dict) -> None:
        checkpoint = self._create_checkpoint_id(step)
        try:
            if pending_save is not None:
                pending_save.result()  # DCP's coordinator has written .metadata: every rank's data is durable
            manifest = write_manifest(checkpoint, step, config, metrics)
        except Exception:  # noqa: BLE001 - a failed save leaves an incomplete checkpoint, never a crash
            log.exception("checkpoint %s did not complete; it will not be resumed from", checkpoint)
            return
        log.info("checkpoint %s complete (%d files, %.1f MB)", checkpoint, len(manifest.files),
                 manifest.total_bytes / 1e6)
        self._apply_retention()
        if self.on_complete is not None:
            self.on_complete(manifest, checkpoint)

    def _apply_retention(self) -> None:
        """Keep the newest `keep_complete` complete checkpoints; drop older ones and incomplete leftovers
        older than the newest complete one (a newer incomplete one may still be in flight)."""
        found = list_checkpoints(self.folder)
        complete = [step for step, _, ok in found if ok]
        if not complete:
            return
        keep = set(complete[-self.keep_complete:]) if self.keep_complete else set(complete)
        for step, uri, ok in found:
            if step not in keep and (ok or step < complete[-1]):
                fs, path = filesystem(uri)
                fs.rm(path, recursive=True)

    def _close(self) -> None:
        super()._close()
        if self._finalizer is not None:
            self._finalizer.shutdown(wait=True)  # the last manifest is written before the process ends

    # -- loading --------------------------------------------------------------------------------------

    def _find_load_step(self, folder: str = "") -> int:
        """The newest COMPLETE checkpoint whose files match its manifest; decided on rank 0 for all ranks."""
        step = [-1]
        if dist.get_rank() == 0:
            for candidate, uri, complete in reversed(list_checkpoints(folder or self.folder)):
                if not complete:
                    log.warning("ignoring %s: no manifest (the save did not complete)", uri)
                    continue
                try:
                    problems = verify(uri, read_manifest(uri), checksums=False)
                except CheckpointError as err:  # a corrupt manifest: the next older checkpoint is tried
                    problems = [str(err)]
                if problems:
                    log.warning("ignoring %s: %s", uri, "; ".join(problems[:3]))
                    continue
                step = [candidate]
                break
        if dist.is_initialized():
            dist.broadcast_object_list(step, src=0)
        return step[0]

    def _load(self, step: int = -1) -> bool:
        loaded = super()._load(step)
        if not loaded and self.init_weights:
            self._load_init_weights()
            return True
        return loaded

    def _load_init_weights(self) -> None:
        """Full weights from one safetensors file (e.g. an imported Wan checkpoint): rank 0 reads it and
        FSDP scatters the shards."""
        log.info("no complete checkpoint: initialising from %s", self.init_weights)
        full = load_file(str(localize(self.init_weights))) if dist.get_rank() == 0 else {}
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        for model in self.states["model"].model:
            with torch.no_grad():
                set_model_state_dict(model, full, options=options)
