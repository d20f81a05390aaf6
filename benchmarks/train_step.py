"""Training step time: torchtitan's Trainer (1 and 2 processes, FSDP2) against a plain eager loop; packed windows
against windows padded to K chunks.

    python benchmarks/train_step.py            # tiny preset on CPU; on a GPU also MFU at the 14B block width
    python benchmarks/train_step.py --quick
    python benchmarks/train_step.py --packing  # only packed vs padded (useful tokens/s)
    python benchmarks/train_step.py --packing --dataset DATASET --profile metaworld   # the mix of real episodes

The eager loop runs the same model, batches, loss and optimizer in one process with no parallelism; the
ratios say what torchtitan + FSDP cost (or gain) per step and per sample. torchtitan step times are
read from the runs' progress files (medians after warm-up).

On a GPU, `parallelized_step` measures a few DiT blocks of the 14B width on the full 13,300-token sample:
the Trainer's own parallelize function (per-block compile, selective activation checkpointing, FSDP2 with
bf16 compute), the flow loss and a fused AdamW step, per attention backend; MFU from the platform's FLOP
accounting (wam.platform.accounting) and peak memory next to `wam model info`'s estimate for the same blocks.
benchmarks/gpu_check.py runs it too.

`packing_comparison` trains the same model on the same windows of 1..K chunks two ways: padded (every window
costs a K-chunk sequence, batch_size per step, as padding to K would) and packed (data.packing: windows share one
sequence of batch_size K-windows' tokens). Useful tokens/s counts only the windows' real tokens, per second of one thread's CPU time on a CPU (wall time on a
shared machine is mostly the other processes' load), of wall time on a GPU. The windows'
lengths come from the sampler itself (a window every half chunk, as many chunks as fit, up to K) run over
episodes as long as DROID's: 76k trajectories in 350 hours at 15 Hz (Khazatsky et al. 2024, arXiv 2403.12945),
a mean of 16.6 s = 249 frames, or with `--episodes bridge` as long as Bridge V2's (53,192 episodes, 1,999,410
frames at 5 Hz in its LeRobot form: a mean of 7.5 s, the same 1.6 s chunks); their spread is not published, so
lengths are drawn log-normal around that mean (sigma 0.5, an assumption; the ideal gain at sigma 0.25 and 1 is
printed too). With `--dataset URI [--profile NAME]` the mix is a LeRobot dataset's own: the windows
the sampler plans over its real episodes, at the profile's chunk length (what `wam data stats` reports). The ideal
ratio for that mix, from the platform's FLOP accounting, is printed next to the measured one (and the 14B sample
shape's, for scale).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from wam.platform.accelerators import detect
from wam.platform.accounting import GIB, count_flops, estimate_memory
from wam.platform.config import FlowSection, load_config, resolve_preset
from wam.platform.launch import free_port
from wam.platform.layout import TokenLayout
from wam.platform.presets import get_preset
from wam.trainer.data.batch import collate_latents
from wam.trainer.data.latent_episodes import SyntheticLatents
from wam.trainer.data.loader import PACK_GROUP, pack
from wam.trainer.data.windows import plan_windows
from wam.trainer.flow import LossWeighting, StepRandomness, flow_loss, noise_batch
from wam.trainer.model import build_model, model_config
from wam.trainer.model.text_encoder import load_text_encoder

WIDTH_14B = ["model.preset=dreamzero-14b", "model.num_layers=4"]  # 4 blocks of dim 5120, the full 14B sample
WARMUP = 25  # torchtitan's first steps (allocator, FSDP buffers, first async work) are slow
# Packed vs padded: a model big enough that compute, not Python, sets the step time on a CPU (1,060 tokens per
# 4-chunk window: 64 per latent frame, 24 actions per chunk as DROID's)
PACKING_MODEL = ["model.dim=256", "model.num_layers=4", "model.num_heads=4", "model.ffn_dim=1024",
                 "sample.latent_height=16", "sample.latent_width=16", "sample.actions_per_chunk=24"]
DROID_MEAN_FRAMES, DROID_HZ_HORIZON = 249, 24  # mean episode length at 15 Hz; actions per chunk at 15 Hz
# Real datasets' mean episode lengths, in frames at 15 Hz (a chunk of 24 of them is 1.6 s, DreamZero's on DROID):
EPISODES = {
    "droid": ("DROID", DROID_MEAN_FRAMES),  # 76k successful trajectories in 350 h (Khazatsky et al. 2024): 16.6 s
    # Bridge V2 in LeRobot form (jesbu1/bridge_v2_lerobot): 53,192 episodes, 1,999,410 frames at 5 Hz: 7.5 s
    "bridge": ("Bridge V2", 113),
}
SPREADS = (0.25, 0.5, 1.0)  # log-normal sigmas: the ideal gain at each shows how little the unknown spread matters


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


def episode_window_counts(chunks: int, mean_frames: int = DROID_MEAN_FRAMES, seed: int = 0, sigma: float = 0.5,
                        episodes: int = 5000) -> dict[int, int]:
    """Windows by chunks (1..`chunks`) that data.packing samples from episodes of `mean_frames` at 15 Hz on average,
    spread log-normal (module doc)."""
    rng = np.random.default_rng(seed)
    lengths = np.maximum(DROID_HZ_HORIZON + 1, rng.lognormal(np.log(mean_frames) - sigma**2 / 2, sigma,
                                                             episodes).astype(int))
    counts = dict.fromkeys(range(1, chunks + 1), 0)
    for frames in lengths:
        for _, k in plan_windows(np.zeros(frames, int), chunks, DROID_HZ_HORIZON, DROID_HZ_HORIZON // 2, 1):
            counts[k] += 1
    return counts


def dataset_window_counts(uri: str, profile: str, chunks: int) -> dict[int, int]:
    """Windows by chunks that data.packing samples from a LeRobot dataset's real episodes (`wam data stats`)."""
    from wam.platform.embodiment import resolve_profile
    from wam.trainer.data.lerobot import LeRobotDataset
    from wam.trainer.data.stats import sampling_summary

    return sampling_summary(LeRobotDataset(uri), resolve_profile(profile, {}), chunks).windows


def window_mix(counts: dict[int, int], windows: int, seed: int = 0) -> list[int]:
    """Chunks of `windows` windows in the proportions of `counts`, in a shuffled order as the loader reads them."""
    rng = np.random.default_rng(seed)
    share = np.array([counts.get(k, 0) for k in range(1, max(counts) + 1)], dtype=float)
    quota = share / share.sum() * windows
    whole = np.floor(quota).astype(int)
    whole[np.argsort(whole - quota)[:windows - whole.sum()]] += 1  # largest remainders
    mix = [k for k, n in enumerate(whole, start=1) for _ in range(n)]
    return [mix[i] for i in rng.permutation(windows)]


def _ideal_gain(arch, sample, mix: list[int]) -> float:
    """FLOPs of a K-chunk window over the mean FLOPs of the mix's windows: packing's ceiling."""
    flops = {k: count_flops(arch, dataclasses.replace(sample, num_chunks=k)).training for k in set(mix)}
    return count_flops(arch, sample).training / statistics.mean(flops[k] for k in mix)


def packing_comparison(overrides: list[str], windows: int, rounds: int, batch_size: int = 2, device: str = "cpu",
                       episodes: tuple[str, int] = EPISODES["droid"], dataset: tuple[str, str] | None = None) -> dict:
    """Useful (real) tokens/s of the same windows trained padded to K chunks and packed (module doc), the windows'
    lengths drawn from `episodes` (a name, their mean frames at 15 Hz), or from `dataset` (uri, profile)."""
    named, mean_frames = episodes
    cfg = load_config(None, overrides)
    preset = resolve_preset(cfg)
    arch, sample = preset.arch, preset.sample
    f, k_max = sample.frames_per_chunk, sample.num_chunks
    tokens = [TokenLayout.teacher_forcing(k, f, sample.tokens_per_frame(arch), sample.actions_per_chunk).length
              for k in range(k_max + 1)]
    planned = dataset_window_counts(*dataset, k_max) if dataset else episode_window_counts(k_max, mean_frames)
    mix = window_mix(planned, windows)
    world = SyntheticLatents(arch, sample, episodes=windows, seed=0)
    full = [world[i] for i in range(windows)]  # K chunks: what a padded window costs
    short = [dataclasses.replace(s, video=s.video[:, :1 + k * f], actions=s.actions[:k], state=s.state[:k],
                                 i2v_cond=s.i2v_cond[:, :1 + k * f] if s.i2v_cond is not None else None)
             for s, k in zip(full, mix, strict=True)]
    padded = [collate_latents(full[i:i + batch_size]) for i in range(0, windows, batch_size)]
    group = PACK_GROUP * batch_size  # as the loader packs them
    packed = [collate_latents([short[i] for i in indices], pack=True) for start in range(0, windows, group)
              for indices in pack(list(range(start, min(start + group, windows))), lambda i: tokens[mix[i]],
                                  batch_size * tokens[-1])]
    model = build_model(model_config(arch, sample), device=device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=device == "cpu", fused=device == "cuda")
    weighting, flow = LossWeighting("bell", 5.0), FlowSection()
    text = torch.randn(1, arch.text_len, arch.text_dim, device=device)  # the frozen encoder's cost is left out

    def epoch(batches: list[dict]) -> float:
        start = time.perf_counter() if device == "cuda" else time.process_time()
        for step, batch in enumerate(batches):
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            prompts = text.expand(len(batch["prompt"]), -1, -1)
            noised = noise_batch(batch["video"], batch["actions"], batch["state"], prompts, flow,
                                 StepRandomness(0, step, 0), batch.get("image"), batch.get("i2v_cond"),
                                 batch.get("windows"))
            out = model(noised.inputs)
            loss = flow_loss(out.video, out.actions, noised.target_video, noised.target_actions, noised.sigma_video,
                             noised.sigma_action, batch["action_dims"], batch["has_actions"], weighting).total()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        if device == "cuda":
            torch.cuda.synchronize()
            return time.perf_counter() - start
        return time.process_time() - start

    threads = torch.get_num_threads()
    if device == "cpu":  # one thread's CPU time: the work itself, whatever else the machine runs
        torch.set_num_threads(1)
    epoch(padded[:2] + packed[:2])  # warm-up: allocator, first calls
    useful = sum(tokens[k] for k in mix)
    times: dict[str, list[float]] = {"padded": [], "packed": []}
    for r in range(rounds):  # alternate, so both see the same conditions
        for name in (("padded", "packed") if r % 2 == 0 else ("packed", "padded")):
            times[name].append(epoch(padded if name == "padded" else packed))
    torch.set_num_threads(threads)
    rates = {name: useful / statistics.median(t) for name, t in times.items()}
    counts = {k: mix.count(k) for k in range(1, k_max + 1)}
    big = get_preset("dreamzero-14b")
    source = (f"the episodes of {dataset[0]} (profile {dataset[1]})" if dataset else
              f"{named}-length episodes of {mean_frames} frames on average")
    spread = ({} if dataset else {sigma: _ideal_gain(arch, sample, window_mix(episode_window_counts(k_max, mean_frames,
                                                                                               sigma=sigma), 2400))
                                  for sigma in SPREADS})
    return {"episodes": source, "windows": windows, "mix": counts, "ideal_speedup_by_sigma": spread, "clock": "CUDA wall time" if device == "cuda" else "CPU time, 1 thread", "batch_size": batch_size, "tokens_per_window": tokens[1:],
            "padded_steps": len(padded), "packed_steps": len(packed), "padded_token_share": useful / (windows * tokens[-1]),
            "useful_tokens_per_s": rates, "speedup": rates["packed"] / rates["padded"],
            "ideal_speedup": _ideal_gain(arch, sample, mix),
            "ideal_speedup_14b": _ideal_gain(big.arch, dataclasses.replace(big.sample, num_chunks=k_max), mix),
            "rounds": times}


def print_packing(row: dict) -> None:
    mix = ", ".join(f"{k}: {n}" for k, n in row["mix"].items())
    print(f"packed vs padded to K chunks: {row['windows']} windows from {row['episodes']} (chunks: count {mix}), "
          f"batch {row['batch_size']}; "
          f"real tokens are {100 * row['padded_token_share']:.0f}% of the padded sequences; {row['clock']}")
    for name, rate in row["useful_tokens_per_s"].items():
        steps = row[f"{name}_steps"]
        print(f"  {name:<7} {steps:>3} steps  {rate:>10,.0f} useful tokens/s")
    print(f"  packed / padded: {row['speedup']:.2f}x (ideal for this mix from FLOPs: {row['ideal_speedup']:.2f}x; "
          f"at the 14B sample shape {row['ideal_speedup_14b']:.2f}x)")
    if row["ideal_speedup_by_sigma"]:
        print("  ideal for lengths of this mean spread log-normal with sigma "
              + ", ".join(f"{sigma:g}: {gain:.2f}x" for sigma, gain in row["ideal_speedup_by_sigma"].items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="5 warm-up and 5 timed steps, the Trainer in 1 process only (a smoke run)")
    parser.add_argument("--packing", action="store_true", help="only packed vs padded windows (useful tokens/s)")
    parser.add_argument("--episodes", choices=sorted(EPISODES), default="droid",
                        help="the real dataset whose mean episode length the window mix is drawn from")
    parser.add_argument("--episode-frames", type=int,
                        help="a mean episode length at 15 Hz instead (a sensitivity run)")
    parser.add_argument("--dataset", help="a LeRobot dataset whose real episodes the window mix is drawn from instead")
    parser.add_argument("--profile", default="droid", help="--dataset's embodiment profile (its chunk length)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    warmup, timed = (5, 5) if args.quick else (WARMUP, 50)
    steps = warmup + timed
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results: dict = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                     "torch_threads_eager": torch.get_num_threads()}
    episodes = ("sensitivity", args.episode_frames) if args.episode_frames else EPISODES[args.episodes]
    mix = {"episodes": episodes, "dataset": (args.dataset, args.profile) if args.dataset else None}
    results["packing"] = (packing_comparison([], 16, 1, device=device, **mix) if args.quick
                          else packing_comparison(PACKING_MODEL, 24, 3, device=device, **mix))
    print_packing(results["packing"])
    if args.packing:
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        eager = eager_step_time(steps, warmup)
        titan = {n: statistics.median(r["step_time_s"] for r in titan_step_times(work, f"tiny-{n}p", steps, warmup, n))
                 for n in ((1,) if args.quick else (1, 2))}
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
