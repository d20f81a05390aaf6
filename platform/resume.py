"""Resuming a run: whether a config may continue the newest complete checkpoint of its series.

A checkpoint records the config it was trained with (its manifest). Continuing it with a config that changes the
model (any `model.*` key: the parameters would not fit) or the data-parallel layout (processes, nodes, HSDP
replicas: the data order and the optimizer shards belong to it) is refused, naming the keys and both values.
Other changes (learning rate, steps, ...) are allowed, and reported: the caller logs them, and training records
them on its MLflow run.
"""

from __future__ import annotations

import dataclasses
import json

from wam.platform.checkpoints import latest_complete, read_manifest
from wam.platform.config import WamConfig
from wam.platform.errors import ConfigError
from wam.platform.tracking import flatten

INCOMPATIBLE = ("model.", "training.processes", "training.nodes", "training.dp_replicate")
# Keys that say where a run lives or how it is watched, not what it trains: never reported as changes.
_BOOKKEEPING = ("output_dir", "tracking.uri", "checkpoint.uri")


@dataclasses.dataclass(frozen=True)
class Resume:
    step: int | None  # the newest complete checkpoint's step; None: nothing to resume, a fresh start
    checkpoint: str | None
    changed: dict[str, tuple[str, str]]  # harmless keys that differ: key -> (recorded, now)

    def describe(self) -> str:
        return "; ".join(f"{key}: {old} -> {new}" for key, (old, new) in sorted(self.changed.items()))


def check_resume(cfg: WamConfig) -> Resume:
    """What resuming `cfg` means: the checkpoint it continues and the harmless changes; ConfigError for changes
    the checkpoint cannot take."""
    newest = latest_complete(cfg.checkpoint_uri)
    if newest is None:
        return Resume(None, None, {})
    step, uri = newest
    recorded = read_manifest(uri).config
    if not recorded:  # written by something that recorded no config (tests' hand-made checkpoints)
        return Resume(step, uri, {})
    before, now = (flatten(json.loads(json.dumps(c, sort_keys=True))) for c in (recorded, dataclasses.asdict(cfg)))
    changed = {key: (before.get(key, "(unset)"), now.get(key, "(unset)")) for key in sorted(set(before) | set(now))
               if before.get(key) != now.get(key) and not key.startswith(_BOOKKEEPING)}
    refused = {key: values for key, values in changed.items() if key.startswith(INCOMPATIBLE)}
    if refused:
        listed = "; ".join(f"{key} was {old}, now {new}" for key, (old, new) in refused.items())
        raise ConfigError(f"this run resumes checkpoint {uri} (step {step}), which was trained differently: {listed}. "
                          "Resume with the checkpoint's values, or start a new run (another name, or another "
                          "checkpoint.uri)")
    return Resume(step, uri, changed)
