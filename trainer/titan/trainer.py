"""The WAM on torchtitan's Trainer: its train step, with the flow-matching loss in place of an LLM's.

The base class owns the loop, FSDP, gradient clipping, the optimizer, checkpoints and metrics. This
subclass owns the frozen text encoder (prompt features are cached), turns each batch into a noised
teacher-forcing step (noise and timesteps from (seed, step, rank), so resumed runs repeat exactly),
normalises the loss by global counts, and reports to MLflow and a progress file from rank 0.
"""

from __future__ import annotations

import json
import logging
import resource
import time
import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Annotated, Any

import spmd_types as spmd
import torch
import torch.distributed as dist
import tyro
from torchtitan.components.metrics import BaseLogger, LoggerContainer
from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.trainer import Trainer

from wam.platform.accelerators import detect
from wam.platform.checkpoints import CheckpointManifest
from wam.platform.config import WamConfig, resolve_preset
from wam.platform.resume import Resume
from wam.platform.tracking import Tracker, flatten, resolve_uri
from wam.trainer.flow import LossWeighting, StepRandomness, drop_prompts, flow_loss, noise_batch
from wam.trainer.model.encoders import FrozenEncoders

log = logging.getLogger("wam.train")
# FSDP warns about any view among a root module's outputs (in-place edits would skip its backward hook);
# the WAM returns unflattened action views that nothing edits in place.
warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")

# torchtitan metric names -> MLflow-safe names (MLflow keys allow letters, digits, _ - . / and spaces).
_METRIC_NAMES = {
    "loss_metrics/global_avg_loss": "loss",
    "loss_metrics/global_max_loss": "loss_max",
    "throughput(tps)": "tokens_per_s",
    "mfu(%)": "mfu_pct",
    "lr/AdamW": "lr",
    "time_metrics/end_to_end(s)": "step_time_s",
    "time_metrics/data_loading(s)": "data_time_s",
    "memory/max_reserved(GiB)": "memory/max_reserved_gib",
}
_PROMPT_CACHE_BYTES = 256 * 2**20  # umT5-XXL features are 512 x 4096 per prompt: 64 prompts in bf16


class PromptsNotTokens(BaseTokenizer):
    """torchtitan always builds a tokenizer for its LLM data loaders. WAM samples carry prompt strings,
    which the frozen text encoder tokenizes itself, so this slot is filled by a tokenizer that refuses to
    be used."""

    @dataclass(kw_only=True, slots=True)
    class Config(BaseTokenizer.Config):
        pass

    def __init__(self, config: Config, **_: Any):
        super().__init__()

    def encode(self, *args, **kwargs) -> list[int]:
        raise NotImplementedError("WAM prompts are tokenized by the text encoder")

    def decode(self, *args, **kwargs) -> str:
        raise NotImplementedError("WAM prompts are tokenized by the text encoder")

    def get_vocab_size(self) -> int:
        return 0


class _ProgressLogger(BaseLogger):
    """Rank 0's metrics sink: MLflow (through the non-blocking tracker) and <run dir>/progress.jsonl."""

    def __init__(self, trainer: WamTrainer):
        self.trainer = trainer
        self.progress = (trainer.wam.run_dir / "progress.jsonl").open("a")
        self.known_accelerator = trainer.accelerator is not None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        clean = {}
        for key, value in metrics.items():
            if not self.known_accelerator and (key == "mfu(%)" or key.startswith("memory/")):
                continue  # MFU against an unknown peak, or device memory on a CPU, would be made-up numbers
            name = _METRIC_NAMES.get(key, key.replace("(", "_").replace(")", "").replace("%", "pct"))
            if isinstance(value, int | float):
                clean[name] = float(value)
        self.trainer.last_metrics = clean
        if self.trainer.tracker is not None:
            self.trainer.tracker.log_metrics(clean, step)
        record = {"step": step, "steps": self.trainer.config.training.steps, "time": time.time(), **clean}
        self.progress.write(json.dumps(record) + "\n")
        self.progress.flush()

    def close(self) -> None:
        self.progress.close()


class WamTrainer(Trainer):
    @dataclass(kw_only=True, slots=True)
    class Config(Trainer.Config):
        wam: Annotated[WamConfig | None, tyro.conf.Suppress] = None  # the project config the run was built from
        resume: Annotated[Resume | None, tyro.conf.Suppress] = None  # what resuming changes (from_yaml checks it)

    def __init__(self, config: Config):
        super().__init__(config)
        self.wam = config.wam
        arch = resolve_preset(self.wam).arch
        self.weighting = LossWeighting(self.wam.flow.loss_weighting, self.wam.flow.shift)
        batch_mesh = self.parallel_dims.get_optional_mesh("batch")
        self.dp_rank = batch_mesh.get_local_rank() if batch_mesh is not None else 0
        loss_mesh = self.parallel_dims.get_optional_mesh("loss")
        self.loss_group = loss_mesh.get_group() if loss_mesh is not None else None

        self.encoders = FrozenEncoders.of_config(self.wam, self.device,
                                                 vision=self.wam.data.source == "lerobot")  # pixels need VAE, CLIP
        encoder_dtype = self.encoders.text.model.dtype
        self.text_encoder = self.encoders.text
        self.prompt_features: OrderedDict[str, torch.Tensor] = OrderedDict()  # LRU, stored in encoder_dtype
        self.prompt_cache_size = max(1, _PROMPT_CACHE_BYTES // (arch.text_len * arch.text_dim * encoder_dtype.itemsize))

        self.accelerator = detect(torch.cuda.get_device_name(self.device)) if self.device.type == "cuda" else None
        if self.accelerator is not None:
            self.metrics_processor.gpu_peak_flops = self.accelerator.peak_bf16_flops
        # video sum/count, action sum/count, skipped bad samples: global totals since the last log
        self.window = torch.zeros(5, device=self.device)
        self.microbatch = (0, 0)  # (step, index) of the micro-batch being run
        self.last_metrics: dict[str, float] = {}
        self.tracker: Tracker | None = None
        self._add_loss_metrics()
        if dist.get_rank() == 0:
            self._start_reporting()
        if self.checkpointer.enable:
            self.checkpointer.manifest_context = lambda: (self.config_dict, dict(self.last_metrics))
            self.checkpointer.on_complete = self._checkpoint_complete

    @property
    def config_dict(self) -> dict:
        return asdict(self.wam)

    # -- reporting ------------------------------------------------------------------------------------

    def _start_reporting(self) -> None:
        wam = self.wam
        wam.run_dir.mkdir(parents=True, exist_ok=True)
        uri = resolve_uri(wam.tracking.uri, wam.run_dir)
        # An embedded store keeps artifacts beside the run; a tracking server keeps them where it is configured
        # to (a pod's run directory is scratch space, gone with the pod, and out of other pods' reach).
        served = uri.startswith(("http://", "https://"))
        self.tracker = Tracker(uri, wam.tracking.experiment, wam.name, wam.tracking.registered_model or f"wam-{wam.name}",
                               artifact_dir=None if served else wam.run_dir / "mlartifacts")
        self.tracker.start(flatten(self.config_dict), tags={"wam.preset": wam.model.preset})
        resume = self.config.resume
        if resume is not None and resume.changed:  # MLflow params are immutable: the changes become a tag
            log.warning("resuming step %d with changed settings: %s", resume.step, resume.describe())
            self.tracker.tag(f"wam.resumed_step_{resume.step}_with", resume.describe())
        self._write_run_info(uri)
        sink = _ProgressLogger(self)
        if isinstance(self.metrics_processor.logger, LoggerContainer):
            self.metrics_processor.logger.add_logger(sink)
        else:
            container = LoggerContainer()
            container.add_logger(sink)
            self.metrics_processor.logger = container

    def _write_run_info(self, tracking_uri: str, **extra: Any) -> None:
        info = {"name": self.wam.name, "run_dir": str(self.wam.run_dir.resolve()), "checkpoints": self.wam.checkpoint_uri,
                "tracking_uri": tracking_uri, "experiment": self.wam.tracking.experiment,
                "mlflow_run_id": self.tracker.run_id if self.tracker else None, **extra}
        (self.wam.run_dir / "run.json").write_text(json.dumps(info, indent=2))

    def _add_loss_metrics(self) -> None:
        """Video and action losses (global means over the steps since the last log) next to torchtitan's."""
        log_metrics = self.metrics_processor.log

        def log_with_losses(step, global_avg_loss, global_max_loss, grad_norm, extra_metrics=None):
            video_sum, video_count, action_sum, action_count, skipped = self.window.tolist()
            extra = dict(extra_metrics or {})
            extra["video_loss"] = video_sum / max(video_count, 1.0)
            if action_count:
                extra["action_loss"] = action_sum / action_count
            # Peak host memory (RSS, ru_maxrss is in KiB) of the busiest process, for regression suites: device
            # memory is torchtitan's memory/*, which a CPU run does not have.
            rss = torch.tensor(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, device=self.device)
            if dist.is_initialized():
                dist.all_reduce(rss, op=dist.ReduceOp.MAX)
            extra["host/peak_rss_gib"] = rss.item()
            if self.wam.data.source == "lerobot":
                extra["data/skipped"] = skipped
                if skipped and dist.get_rank() == 0:
                    log.warning("%d bad samples skipped in the last %d step(s) (data.bad_samples: skip)", skipped,
                                self.config.metrics.log_freq)
            self.window.zero_()
            log_metrics(step, global_avg_loss, global_max_loss, grad_norm, extra_metrics=extra)

        self.metrics_processor.log = log_with_losses

    def _checkpoint_complete(self, manifest: CheckpointManifest, uri: str) -> None:
        if self.tracker is not None:
            self.tracker.log_checkpoint(manifest.step, uri, manifest.to_json())

    # -- the train step -------------------------------------------------------------------------------

    def _encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        missing = [p for p in dict.fromkeys(prompts) if p not in self.prompt_features]
        if missing:
            features = self.text_encoder(missing)
            for prompt, feature in zip(missing, features, strict=True):
                self.prompt_features[prompt] = feature.to(self.text_encoder.model.dtype)
        batch = torch.stack([self.prompt_features[p] for p in prompts]).float()
        for prompt in prompts:
            self.prompt_features.move_to_end(prompt)
        while len(self.prompt_features) > self.prompt_cache_size:
            self.prompt_features.popitem(last=False)
        return batch

    def _encode_pixels(self, pixels: torch.Tensor, windows: tuple[int, ...] | None):
        """(latents, CLIP image tokens, I2V channels) of robot video; packed windows are encoded one by one
        (the VAE encodes each window's first frame alone) and packed again along the frame axis."""
        if windows is None:
            clip = self.encoders.encode_clip(pixels)
            return clip.latents, clip.image, clip.i2v
        per_chunk = (pixels.shape[2] - len(windows)) // sum(windows)
        clips = [self.encoders.encode_clip(part) for part in pixels.split([1 + per_chunk * k for k in windows], dim=2)]
        image = torch.cat([c.image for c in clips]) if clips[0].image is not None else None
        i2v = torch.cat([c.i2v for c in clips], dim=2) if clips[0].i2v is not None else None
        return torch.cat([c.latents for c in clips], dim=2), image, i2v

    def forward_backward_step(self, *, input_dict: dict, labels: torch.Tensor,
                              global_valid_tokens: torch.Tensor) -> torch.Tensor:
        step, index = self.microbatch
        self.microbatch = (self.step, index + 1 if step == self.step else 0)
        randomness = StepRandomness(self.wam.seed, self.step, self.dp_rank, self.microbatch[1])
        flow = self.wam.flow
        windows = input_dict.get("windows")  # packed windows (data.packing): their chunks
        if "pixels" in input_dict:  # robot video: the frozen VAE / CLIP encode it here
            video, image, i2v = self._encode_pixels(input_dict["pixels"], windows)
        else:
            video, image, i2v = input_dict["video"], input_dict.get("image"), input_dict.get("i2v_cond")
        text = self._encode_prompts(drop_prompts(input_dict["prompt"], flow, randomness))
        batch = noise_batch(video, input_dict["actions"], input_dict["state"], text, flow, randomness, image, i2v,
                            windows)
        with self.train_context():
            out = self.model_parts[0](batch.inputs)
            parts = flow_loss(out.video, out.actions, batch.target_video, batch.target_actions, batch.sigma_video,
                              batch.sigma_action, input_dict["action_dims"], input_dict["has_actions"],
                              self.weighting, flow.video_loss_weight, flow.action_loss_weight)
            # Normalise by the counts over all data-parallel ranks: FSDP sums gradients across ranks. The counts are
            # real latent frames and actions only (packed ranks hold different numbers of them).
            totals = torch.stack([parts.video_sum.detach(), parts.video_count, parts.action_sum.detach(),
                                  parts.action_count, torch.tensor(float(input_dict.get("skipped", 0)),
                                                                   device=self.device)]).float()
            if self.loss_group is not None:
                dist.all_reduce(totals, group=self.loss_group)
            loss = parts.total(totals[1], totals[3]) / self.gradient_accumulation_steps
            with spmd.no_typecheck():
                loss.backward()
        self.window += totals
        self.ntokens_seen += labels.numel()
        return loss.detach()

    def close(self) -> None:
        super().close()  # waits for the last checkpoint's manifest
        if self.tracker is not None:
            finished = self.step >= self.config.training.steps
            self.tracker.finish("FINISHED" if finished else "FAILED")
            self.tracker.close()
            self._write_run_info(self.tracker.uri, finished=finished, step=self.step)
