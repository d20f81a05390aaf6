"""Training step time: torchtitan's Trainer (1 and 2 processes, FSDP2) against a plain eager loop.

    python benchmarks/train_step.py            # tiny preset on CPU; on a GPU also MFU at the 14B block width
    python benchmarks/train_step.py --quick

The eager loop runs the same model, batches, loss and optimizer in one process with no parallelism; the
ratios say what torchtitan + FSDP cost (or gain) per step and per sample. torchtitan step times are
read from the runs' progress files (medians after warm-up).
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

from wam.platform.config import FlowSection, load_config, resolve_preset
from wam.trainer.data.batch import collate_latents
from wam.trainer.data.latent_episodes import SyntheticLatents
from wam.trainer.flow import LossWeighting, StepRandomness, flow_loss, noise_batch
from wam.trainer.model import build_model, model_config
from wam.trainer.model.text_encoder import load_text_encoder

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
        noised = noise_batch(batch["video"], batch["actions"], batch["state"], text, flow,
                             StepRandomness(0, step, 0), batch.get("image"), batch.get("i2v_cond"))
        out = model(noised.inputs)
        loss = flow_loss(out.video, out.actions, noised.target_video, noised.target_actions, noised.sigma_video,
                         noised.sigma_action, batch["action_dims"], batch["has_actions"], weighting).total()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[warmup:])


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
            records = titan_step_times(work, "width-14b", steps, warmup, 1,
                                       model={"preset": "dreamzero-14b", "num_layers": 4, "attention": "flex"},
                                       training={"batch_size": 1, "precision": "bfloat16"})
            mfu = statistics.median(r["mfu_pct"] for r in records)
            tps = statistics.median(r["tokens_per_s"] for r in records)
            results["width_14b"] = {"mfu_pct": mfu, "tokens_per_s": tps}
            print(f"dreamzero-14b width, 4 blocks, bf16, flex attention: MFU {mfu:.1f}%, {tps:,.0f} tokens/s")
        else:
            print("no GPU: MFU at the 14B block width is measured when one is present")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
