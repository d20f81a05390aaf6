"""Training step time: torchtitan's Trainer (1 and 2 processes, FSDP2) against a plain eager loop.

    python benchmarks/train_step.py            # tiny preset on CPU; on a GPU also MFU at the 14B block width
    python benchmarks/train_step.py --quick

The eager loop runs the same model, batches, loss and optimizer in one process with no parallelism; the
ratios say what torchtitan + FSDP cost (or gain) per step and per sample. torchtitan step times are
read from the runs' progress files (medians after warm-up).

On a GPU, `parallelized_step` measures a few DiT blocks of the 14B width on the full 13,300-token sample:
the Trainer's own parallelize function (per-block compile, selective activation checkpointing, FSDP2 with
bf16 compute), the flow loss and a fused AdamW step, per attention backend; MFU from the platform's FLOP
accounting (wam.platform.accounting) and peak memory next to `wam model info`'s estimate for the same blocks.
benchmarks/gpu_check.py runs it too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from wam.platform.accelerators import detect
from wam.platform.accounting import GIB, count_flops, estimate_memory
from wam.platform.config import FlowSection, load_config, resolve_preset
from wam.platform.launch import free_port
from wam.trainer.data.batch import collate_latents
from wam.trainer.data.latent_episodes import SyntheticLatents
from wam.trainer.flow import LossWeighting, StepRandomness, flow_loss, noise_batch
from wam.trainer.model import build_model, model_config
from wam.trainer.model.text_encoder import load_text_encoder

WIDTH_14B = ["model.preset=dreamzero-14b", "model.num_layers=4"]  # 4 blocks of dim 5120, the full 14B sample
WARMUP = 25  # torchtitan's first steps (allocator, FSDP buffers, first async work) are slow


def titan_step_times(workdir: Path, name: str, steps: int, warmup: int, processes: int, **sections) -> list[dict]:
    config = {"name": name, "output_dir": str(workdir), "training": {"steps": steps, "processes": processes,
              "batch_size": 2, "log_every": 5}, "checkpoint": {"interval": 10_000}}
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values}
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    wam = Path(sys.executable).parent / "wam"
    result = subprocess.run([str(wam), "train", str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{result.stdout}\n{result.stderr}")
    records = [json.loads(line) for line in (workdir / name / "progress.jsonl").read_text().splitlines()]
    return [r for r in records if r["step"] > warmup]  # step_time_s: mean over the steps since the last log


def eager_step_time(steps: int, warmup: int) -> float:
    cfg = load_config(None, ["training.batch_size=2"])
    preset = resolve_preset(cfg)
    arch, sample = preset.arch, preset.sample
    model = build_model(model_config(arch, sample)).train()
    text_encoder = load_text_encoder(arch.text_encoder, arch.text_len)
    prompts = {}  # prompt features are cached, as the Trainer caches them
    world = SyntheticLatents(arch, sample, episodes=64, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-5,
                                  foreach=True)  # as the Trainer's optimizer on CPU
    weighting, flow = LossWeighting("bell", 5.0), FlowSection()
    times = []
    for step in range(steps):
        start = time.perf_counter()
        batch = collate_latents([world[(2 * step + i) % 64] for i in range(2)])
        for prompt in batch["prompt"]:
            if prompt not in prompts:
                prompts[prompt] = text_encoder([prompt])[0]
        text = torch.stack([prompts[p] for p in batch["prompt"]])
        loss = _flow_step_loss(model, batch, text, flow, weighting, step)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[warmup:])


def _flow_step_loss(model, batch: dict, text: torch.Tensor, flow: FlowSection, weighting: LossWeighting,
                    step: int) -> torch.Tensor:
    """The training step's loss (as in the Trainer): noise the chunks, predict velocities, weighted MSE."""
    noised = noise_batch(batch["video"], batch["actions"], batch["state"], text, flow, StepRandomness(0, step, 0),
                         batch.get("image"), batch.get("i2v_cond"))
    out = model(noised.inputs)
    return flow_loss(out.video, out.actions, noised.target_video, noised.target_actions, noised.sigma_video,
                     noised.sigma_action, batch["action_dims"], batch["has_actions"], weighting).total()


def parallelized_step(overrides: list[str], attention: str, *, device: str, steps: int, warmup: int,
                      compile: bool = True, activation_checkpointing: str = "selective") -> dict:
    """Step time, tokens/s, MFU and peak memory of the model as the Trainer parallelizes it, in one process.

    The Trainer's parallelize_wam (compile per block, activation checkpointing, FSDP2 on a 1-rank mesh with
    bf16 compute on CUDA, fp32 on CPU), the flow loss on synthetic latents (random text features), fused AdamW.
    """
    import os

    import torch.distributed as dist
    from torchtitan.config import CompileConfig, TrainingConfig
    from torchtitan.distributed.activation_checkpoint import FullAC, SelectiveAC
    from torchtitan.distributed.parallel_dims import ParallelDims

    from wam.trainer.titan.parallelize import parallelize_wam

    cfg = load_config(None, overrides)
    preset = resolve_preset(cfg)
    arch, sample = preset.arch, preset.sample
    cuda = device == "cuda"
    torch._dynamo.reset()  # graphs of an earlier model in this process would be reused as dynamic ones
    if not dist.is_initialized():  # a 1-rank group: FSDP2 needs one, as in a single-GPU Trainer run
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    dims = ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, ep=1, world_size=1,
                        spmd_backend="partial_dtensor")
    dims.build_mesh()
    ac = {"none": None, "full": FullAC.Config, "selective": SelectiveAC.Config}[activation_checkpointing]
    model = build_model(model_config(arch, sample, attention=attention), device=device)
    model = parallelize_wam(model, parallel_dims=dims,
                            training=TrainingConfig(mixed_precision_param="bfloat16" if cuda else "float32"),
                            parallelism=None, compile_config=CompileConfig(enable=compile),
                            ac_config=ac() if ac else None, dump_folder=tempfile.gettempdir())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda, foreach=not cuda)
    world = SyntheticLatents(arch, sample, episodes=8, seed=0)
    text = torch.randn(1, arch.text_len, arch.text_dim, device=device)
    weighting, flow = LossWeighting("bell", 5.0), FlowSection()
    times = []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for step in range(warmup + steps):
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                 for k, v in collate_latents([world[step % len(world)]]).items()}
        start = time.perf_counter()
        loss = _flow_step_loss(model, batch, text, flow, weighting, step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss at step {step}")
    step_s = statistics.median(times[warmup:])
    flops = count_flops(arch, sample)
    result = {"layers": arch.num_layers, "dim": arch.dim, "heads": arch.num_heads, "tokens": flops.tokens,
              "attention": attention, "compile": compile, "activation_checkpointing": activation_checkpointing,
              "first_step_s": times[0], "step_s": step_s, "tokens_per_s": flops.tokens / step_s,
              "model_tflops_per_s": flops.training / step_s / 1e12}
    accelerator = detect(torch.cuda.get_device_name()) if cuda else None
    if accelerator:
        result["mfu_pct"] = 100 * flops.training / step_s / accelerator.peak_bf16_flops
    if cuda:  # the estimate of the same blocks on 1 GPU, frozen encoders left out (none run here)
        estimate = estimate_memory(arch, sample, 1, activation_checkpointing=activation_checkpointing != "none")
        result.update(peak_allocated_gib=torch.cuda.max_memory_allocated() / GIB,
                      estimate_gib=(estimate.total - estimate.frozen_encoders) / GIB)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5 warm-up and 5 timed steps (a smoke run)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    warmup, timed = (5, 5) if args.quick else (WARMUP, 50)
    steps = warmup + timed
    results: dict = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                     "torch_threads_eager": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        eager = eager_step_time(steps, warmup)
        titan = {n: statistics.median(r["step_time_s"] for r in titan_step_times(work, f"tiny-{n}p", steps, warmup, n))
                 for n in (1, 2)}
        results.update(eager_step_s=eager, titan_step_s=titan)
        print(f"tiny preset, batch 2 per process, {results['device']}; medians after {warmup} warm-up steps")
        print(f"{'setup':<34} {'step ms':>8} {'samples/s':>10} {'vs eager (time)':>16}")
        print(f"{'eager loop, 1 process':<34} {eager * 1000:>8.1f} {2 / eager:>10.1f} {1.0:>15.2f}x")
        for n, t in titan.items():
            print(f"{f'torchtitan Trainer, {n} process(es)':<34} {t * 1000:>8.1f} {2 * n / t:>10.1f} {t / eager:>15.2f}x")
        if torch.cuda.is_available():  # a few DiT blocks at the 14B width, on one GPU
            results["width_14b"] = {}
            for attention in ("triton", "flex"):
                row = parallelized_step(WIDTH_14B, attention, device="cuda", steps=timed, warmup=3)
                results["width_14b"][attention] = row
                print(f"dreamzero-14b width, {row['layers']} blocks, bf16, {attention}: MFU {row['mfu_pct']:.1f}%, "
                      f"{row['tokens_per_s']:,.0f} tokens/s, peak {row['peak_allocated_gib']:.1f} GiB "
                      f"(estimate {row['estimate_gib']:.1f} GiB)")
        else:
            print("no GPU: MFU at the 14B block width is measured when one is present")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
