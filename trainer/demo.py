"""`wam demo`: closed-loop, chunk-wise inference on held-out episodes of a LeRobot dataset.

For each held-out window, the frozen encoders turn the prompt, the first frame and the recorded frames
into features and latents; the rollout denoises each chunk's actions and video against its KV cache,
then writes the chunk's REAL latents into the cache, as a robot loop would (the rollout of `wam eval`).
With `--weights` (a checkpoint, or an export from `wam export`; either carries its training config) the
trained policy's actions are compared with the recorded ones and with an untrained model's.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from rich import box
from rich.console import Console
from rich.table import Table

from wam.platform.config import SamplerSection, WamConfig, load_config, resolve_preset
from wam.platform.errors import ConfigError
from wam.trainer.checkpoint_reader import open_for_eval
from wam.trainer.data.synth_dataset import SynthOptions, synthesize
from wam.trainer.eval.heldout import RobotHeldOut
from wam.trainer.eval.rollouts import config_sampler, roll_out_models, summarize
from wam.trainer.inference import ChunkRollout
from wam.trainer.model import WamInputs, WamModel, build_model, model_config
from wam.trainer.model.encoders import FrozenEncoders


def _default_config(dataset: str) -> WamConfig:
    """configs/demo.yaml's shapes, for a demo without trained weights."""
    return load_config(None, ["sample.actions_per_chunk=24", "sample.num_chunks=2", "data.source=lerobot",
                              f"data.datasets=[{{uri: {dataset}, profile: droid}}]"])


@torch.no_grad()
def run_demo(console: Console, weights: Path | None = None, dataset: str | None = None, episodes: int = 8,
             steps: int | None = None) -> None:
    ckpt = open_for_eval(str(weights)) if weights is not None else None
    if ckpt is not None and ckpt.config.data.source != "lerobot":
        raise ConfigError(f"{weights} was trained on data.source={ckpt.config.data.source}; `wam demo` rolls a policy "
                          "out on robot video, so use weights trained on a LeRobot dataset (as `make demo` does)")
    with tempfile.TemporaryDirectory() as tmp:
        if dataset is None:  # a fresh held-out dataset, never trained on
            dataset = str(synthesize(Path(tmp) / "heldout", SynthOptions(episodes=2, seed=1_000_003)))
        cfg = ckpt.config if ckpt is not None else _default_config(dataset)
        preset = resolve_preset(cfg)
        cpu = torch.device("cpu")
        encoders = FrozenEncoders.of_config(cfg, cpu)  # as training did
        models = {"untrained": build_model(model_config(preset.arch, preset.sample), seed=cfg.seed).eval()}
        if ckpt is not None:
            models = {"trained": ckpt.load(cpu), **models}
        heldout = RobotHeldOut(cfg, dataset, cfg.data.datasets[0].profile, encoders)
        indices = heldout.select(episodes)
        s = preset.sample
        console.print(f"[bold]{preset.name}[/]: {sum(p.numel() for p in models['untrained'].parameters()):,} "
                      f"parameters; {s.num_chunks} chunks x ({s.frames_per_chunk} latent frames + {s.actions_per_chunk} "
                      f"actions); {len(indices)} held-out windows of {dataset}")
        results = {name: summarize(r) for name, r in roll_out_models(models, cfg, heldout, indices, cfg.seed,
                                                                        config_sampler(cfg, steps)).items()}

        table = Table("model", "chunk", "action MAE", "video MSE", "denoise ms", box=box.SIMPLE_HEAD,
                      title=f"rollouts with the KV cache; actions in {heldout.units} units")
        for name, result in results.items():
            for c, chunk in enumerate(result["per_chunk"]):
                table.add_row(name if c == 0 else "", str(c), f"{chunk['action_l1']:.4f}", f"{chunk['video_mse']:.3f}",
                              f"{chunk['denoise_ms']:.1f}")
        console.print(table)
        if ckpt is not None:
            for label, key in (("action error", "action_l1"), ("video error", "video_mse")):
                console.print(f"{label} over held-out windows: trained {results['trained'][key]:.4f} vs untrained "
                              f"{results['untrained'][key]:.4f}")
        _check_cache_equals_full_forward(console, next(iter(models.values())), preset, cfg.seed)


def _check_cache_equals_full_forward(console: Console, model: WamModel, preset, seed: int) -> None:
    """The cached chunk-by-chunk path must agree with one full teacher-forcing forward."""
    s = preset.sample
    k, f = s.num_chunks, s.frames_per_chunk
    inputs = WamInputs.random(preset.arch, s, batch=1, seed=seed)
    full = model(inputs)
    rollout = ChunkRollout(model, SamplerSection(), s)
    rollout.reset(inputs.video[:, :, :1], inputs.text, inputs.image, inputs.i2v_cond)
    worst = 0.0
    for c in range(k):
        out = model.predict(rollout.cache, inputs.noisy_video[:, :, c * f:(c + 1) * f], inputs.noisy_actions[:, c],
                            inputs.state[:, c], inputs.video_t[:, c], inputs.action_t[:, c])
        worst = max(worst, (out.actions - full.actions[:, c]).abs().max().item(),
                    (out.video - full.video[:, :, c * f:(c + 1) * f]).abs().max().item())
        rollout.observe(inputs.video[:, :, 1 + c * f:1 + (c + 1) * f])
    console.print(f"KV-cached chunk inference vs full-sequence forward: max abs difference {worst:.2e}")
