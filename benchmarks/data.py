"""Data pipeline throughput per CPU core: DreamZero sampling (4 chunks -> 33 frames at stride 3, three
cameras) from synthesized LeRobot v3.0 datasets encoded the way LeRobot encodes (GOP 2), 180x320 per
camera with sensor noise.

For each decoder: decoding only the window's frames (the loader's path) against the straightforward
approach of decoding every frame of the window and then subsampling; plus whole samples (decode, tile,
normalise). On a GPU, DALI decodes H.264 with NVDEC as well.

    python benchmarks/data.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from wam.platform.config import DatasetEntry
from wam.platform.presets import get_preset
from wam.trainer.data.decode import make_decoder
from wam.trainer.data.robot import RobotSource
from wam.trainer.data.synth_dataset import CAMERAS, SynthOptions, synthesize
from wam.trainer.data.windows import video_frames

CHUNKS, STRIDE, FRAMES_PER_CHUNK = 4, 3, 2


def straightforward(uri: str, first: int, last: int) -> np.ndarray:
    """Open the video, decode every frame from `first` to `last`, keep every STRIDE-th."""
    from torchcodec.decoders import VideoDecoder

    decoder = VideoDecoder(uri, seek_mode="exact", num_ffmpeg_threads=1, dimension_order="NHWC")
    return decoder.get_frames_in_range(first, last + 1).data.numpy()[::STRIDE]


def windows(source: RobotSource, n: int) -> list:
    rng = np.random.default_rng(0)
    return [source.windows[i] for i in rng.choice(len(source.windows), size=n, replace=False)]


def time_per_sample(fn, items) -> float:
    fn(items[0])  # warm-up (opens files, loads codecs)
    start = time.perf_counter()
    for item in items:
        fn(item)
    return (time.perf_counter() - start) / len(items)


def measure(dataset: str, n: int, decoders: list[str]) -> dict:
    preset = get_preset("tiny")
    sample = type(preset.sample)(num_chunks=CHUNKS, frames_per_chunk=FRAMES_PER_CHUNK, actions_per_chunk=24,
                                 latent_height=44, latent_width=80)  # the 14B canvas: 352 x 640
    source = RobotSource([DatasetEntry(uri=dataset, profile="droid")], {}, preset.arch, sample, seed=0)
    picked = windows(source, n)
    frames_per_window = len(video_frames(0, CHUNKS, FRAMES_PER_CHUNK, STRIDE)) * len(CAMERAS)

    def window_segments(window):
        episode = source.datasets[0].episodes[window.episode]
        indices = video_frames(window.start, CHUNKS, FRAMES_PER_CHUNK, STRIDE)
        return [(episode.videos[c], indices) for c in CAMERAS]

    result = {}
    for name in decoders:
        decoder = make_decoder(name)
        seconds = time_per_sample(lambda w, d=decoder: [d.decode(seg.path, (seg.first_frame + ix).tolist())
                                                        for seg, ix in window_segments(w)], picked)
        result[name] = {"samples_per_s": 1 / seconds, "frames_per_s": frames_per_window / seconds}
    seconds = time_per_sample(lambda w: [straightforward(seg.path, seg.first_frame + ix[0], seg.first_frame + ix[-1])
                                         for seg, ix in window_segments(w)], picked)
    result["straightforward"] = {"samples_per_s": 1 / seconds, "frames_per_s": frames_per_window / seconds}
    source.decoder_name = "torchcodec"
    seconds = time_per_sample(lambda i: source[i], [source.windows.index(w) for w in picked])
    result["whole_sample_torchcodec"] = {"samples_per_s": 1 / seconds}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer windows and episodes")
    parser.add_argument("--smoke", action="store_true", help="tiny videos: only checks that the script runs")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    n = 3 if args.smoke else 6 if args.quick else 24
    size = dict(height=36, width=64, sensor_noise=0.0) if args.smoke else dict(height=180, width=320, sensor_noise=10.0)
    gpu = torch.cuda.is_available()
    report = {"device": torch.cuda.get_device_name() if gpu else "cpu", "threads": 1, "results": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for codec in ("av1", "h264", "vp9"):
            path = Path(tmp) / codec
            synthesize(path, SynthOptions(episodes=2 if args.smoke else 4 if args.quick else 8, codec=codec,
                                          episodes_per_file=4, **size))
            decoders = ["torchcodec", "pyav"] + (["dali"] if gpu or codec == "vp9" else [])
            report["results"][codec] = measure(str(path), n, decoders)
    print(f"per CPU core (1 thread), {report['device']}: 33 frames x 3 cameras per sample, 180x320, GOP 2")
    print(f"{'codec':<6} {'path':<26} {'samples/s':>10} {'frames/s':>10} {'vs straightforward':>19}")
    for codec, rows in report["results"].items():
        base = rows["straightforward"]["samples_per_s"]
        for name, row in rows.items():
            frames = f"{row['frames_per_s']:>10.0f}" if "frames_per_s" in row else f"{'':>10}"
            print(f"{codec:<6} {name:<26} {row['samples_per_s']:>10.2f} {frames} {row['samples_per_s'] / base:>18.2f}x")
    chosen = {c: rows["torchcodec"]["samples_per_s"] / rows["straightforward"]["samples_per_s"]
              for c, rows in report["results"].items()}
    report["chosen_vs_straightforward"] = chosen
    print("chosen CPU path (torchcodec) vs straightforward: " + ", ".join(f"{c} {r:.2f}x" for c, r in chosen.items())
          + f" (mean {statistics.mean(chosen.values()):.2f}x)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
