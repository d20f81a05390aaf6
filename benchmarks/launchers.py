"""The two launchers of `wam train`, torchrun and Ray Train, on the same run (tiny preset, 2 CPU processes).

    python benchmarks/launchers.py            # 2 rounds of 45 steps per launcher
    python benchmarks/launchers.py --quick

Start-up is the time from launching `wam train` to the first step's progress record (process start-up,
Ray's local cluster and worker group for Ray, model build, the first step). Step time is the median of the
Trainer's own step times after warm-up. The launchers alternate, round by round, so that a busy machine
weighs on both alike; the ratios are Ray over torchrun.
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

import yaml

WARMUP = 25  # as benchmarks/train_step.py: the first steps are slow for reasons of their own
LAUNCHERS = ("torchrun", "ray")


def run(workdir: Path, launcher: str, index: int, steps: int) -> dict:
    name = f"{launcher}-{index}"
    config = {"name": name, "output_dir": str(workdir), "training": {"steps": steps, "processes": 2,
              "batch_size": 2, "launcher": launcher}, "checkpoint": {"interval": 10_000}}
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    wam = Path(sys.executable).parent / "wam"
    launched = time.time()
    result = subprocess.run([str(wam), "train", str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{result.stdout}\n{result.stderr}")
    records = [json.loads(line) for line in (workdir / name / "progress.jsonl").read_text().splitlines()]
    warm = [r["step_time_s"] for r in records if r["step"] > min(WARMUP, steps // 2)]
    return {"launcher": launcher, "startup_s": records[0]["time"] - launched, "step_s": statistics.median(warm),
            "total_s": time.time() - launched}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one round of 10 steps (a smoke run)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rounds, steps = (1, 10) if args.quick else (args.rounds, WARMUP + 20)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(rounds):
            for launcher in LAUNCHERS:
                runs.append(run(Path(tmp), launcher, index, steps))
                print(f"round {index}: {launcher:<8} start-up {runs[-1]['startup_s']:6.1f} s   "
                      f"step {runs[-1]['step_s'] * 1000:6.1f} ms", flush=True)
    summary = {launcher: {key: statistics.median(r[key] for r in runs if r["launcher"] == launcher)
                          for key in ("startup_s", "step_s")} for launcher in LAUNCHERS}
    ratios = {key: summary["ray"][key] / summary["torchrun"][key] for key in ("startup_s", "step_s")}
    print(f"tiny preset, 2 CPU processes, {steps} steps x {rounds} round(s); medians, Ray / torchrun:")
    print(f"  start-up (launch -> first step)  {summary['torchrun']['startup_s']:6.1f} s  vs {summary['ray']['startup_s']:6.1f} s"
          f"  {ratios['startup_s']:.2f}x")
    print(f"  step time                        {summary['torchrun']['step_s'] * 1000:6.1f} ms vs "
          f"{summary['ray']['step_s'] * 1000:6.1f} ms {ratios['step_s']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"steps": steps, "rounds": rounds, "runs": runs, "median": summary,
                                         "ray_over_torchrun": ratios}, indent=2))


if __name__ == "__main__":
    main()
