"""The benchmark scripts keep running (a smoke run; the numbers themselves go in docs/performance.md)."""

from conftest import run_benchmark


def test_model_benchmark_smoke(tmp_path):
    data = run_benchmark("model.py", tmp_path, "--quick", "--steps", "2")
    assert set(data["flops"]) == {"tiny", "tiny-5b", "wan2.1-1.3b", "dreamzero-5b", "dreamzero-14b"}
    assert all(row["cached_s"] > 0 for row in data["chunk_inference"]["tiny"])


def test_train_step_benchmark_smoke(tmp_path):
    data = run_benchmark("train_step.py", tmp_path, "--quick")
    assert data["eager_step_s"] > 0 and set(data["titan_step_s"]) == {"1"}  # --quick: 2 processes only in full runs


def test_packing_benchmark_draws_its_mix_from_a_datasets_real_episodes(tmp_path):
    """`--dataset`: the window mix is the one the sampler plans over the dataset's episodes (`wam data stats`)."""
    from wam.platform.embodiment import resolve_profile
    from wam.trainer.data.lerobot import LeRobotDataset
    from wam.trainer.data.stats import sampling_summary
    from wam.trainer.data.synth_dataset import SynthOptions, synthesize

    dataset = synthesize(tmp_path / "data", SynthOptions(episodes=4, seed=2))
    data = run_benchmark("train_step.py", tmp_path, "--packing", "--quick", "--dataset", str(dataset))
    planned = sampling_summary(LeRobotDataset(str(dataset)), resolve_profile("droid", {}), 4).windows
    mix = {int(k): n for k, n in data["packing"]["mix"].items()}
    assert str(dataset) in data["packing"]["episodes"] and sum(mix.values()) == 16
    assert {k for k, n in mix.items() if n} <= {k for k, n in planned.items() if n}
    assert data["packing"]["speedup"] > 0


def test_data_benchmark_smoke(tmp_path):
    data = run_benchmark("data.py", tmp_path, "--smoke")
    assert set(data["results"]) == {"av1", "h264", "vp9"}
    assert all(row["samples_per_s"] > 0 for rows in data["results"].values() for row in rows.values())


def test_vae_benchmark_smoke(tmp_path):
    data = run_benchmark("vae.py", tmp_path, "--smoke", "--repeats", "1")
    assert data["vaes"]["wan2.2"]["latents"] == [1, 8, 2, 2, 2] and data["vaes"]["wan2.1"]["latents"] == [1, 4, 2, 4, 4]
    assert data["ratios_wan22_over_wan21"]["dit_tokens_per_latent_frame"] == 0.25


def test_operator_benchmark_smoke(tmp_path):
    data = run_benchmark("operator_latency.py", tmp_path, "--jobs", "3", "--baseline", "1", "--running", "2",
                         "--interval", "0.5", "--ticks", "2")
    assert data["3_concurrent"]["n"] == 3 and data["one_at_a_time"]["p50_ms"] > 0
    per_job = data["per_new_trainjob"]  # counted at the emulated API server and from the operator's metrics
    assert per_job["api_requests_by_kind"]["create jobsets"] == 1 and per_job["reconciles"] >= 1
    assert data["cpu_ms_per_reconcile"] > 0
    polled = data["progress_polling"]  # counted in the MLflow server's and the S3 server's request logs
    assert polled["mlflow_requests_per_tick"]["each_job_by_itself"] == 4  # get-by-name + search, per job
    assert polled["object_store_requests_per_tick"]["batched"] < polled["object_store_requests_per_tick"][
        "each_job_by_itself"]


def test_serve_benchmark_smoke(tmp_path):
    data = run_benchmark("serve.py", tmp_path, "--quick")
    assert set(data["cpu_tiny"]) == {"1_steps", "4_steps"}
    assert all(row["kv_cache"]["p50_ms"] > 0 for row in data["cpu_tiny"].values())
    assert {name: row["transformer_passes"] for name, row in data["cpu_tiny_samplers"].items()} == {
        "unipc_16": 16, "guided_batched": 16, "guided_sequential": 32, "dreamzero": 8}
    attention = data["cpu_served_attention"]  # the 14B layout's last chunk: every query but one unmasked
    assert (attention["queries"], attention["keys"]) == (1785, 7945) and attention["speedup_p50"] > 0
    encoding = data["cpu_tiny_encoding"]  # a served chunk's encoding: its frames, a new window, sessions batched
    assert (encoding["canvas"], encoding["frames_per_chunk"], encoding["window_latent_frames"]) == ([64, 64], 8, 9)
    assert encoding["new_window"]["p50_ms"] > encoding["observed_chunk"]["p50_ms"] > 0
    assert encoding["batched_speedup_p50"] > 0
    for kind in ("chunks", "windows"):  # arriving at once through the server's encoder: the first alone, then batched
        assert encoding[f"server_{kind}_speedup_p50"] > 0
        assert encoding[f"server_{kind}_one_at_a_time"]["mean_batch"] == 1 < encoding[f"server_{kind}_batching"]["mean_batch"]
    assert data["quantization"]["streaming"]["mb_per_s"] > 0
    burst = data["oversized_burst"]  # 4 clients x 7 MB over a 2 MB limit: refused unread, or buffered first
    assert burst["refused_from_header"]["refused"] == burst["buffered"]["refused"] == 4
    assert burst["refused_from_header"]["peak_growth_mb"] < 10 < burst["buffered"]["peak_growth_mb"]


def test_serving_memory_at_the_14b_width_stays_where_it_was_traced(tmp_path):
    """A batched forward's activations at the 14B width, traced on fake tensors, grow by one session's share per
    session and stay at the 0.59 GiB a guided session took (2026-12-05, once the trace stopped counting the caches
    the forward writes in place); what the admission counts covers the peaks the H200 measured (docs/performance.md)."""
    data = run_benchmark("serve.py", tmp_path, "--memory")
    one = data["1_sessions"]["predict_activations_gib"]
    assert one < 0.65 and 7.5 * one < data["8_sessions"]["predict_activations_gib"] < 8.5 * one
    assert all(data[f"{n}_sessions"]["traced_engine_peak_gib"] < data[f"{n}_sessions"]["h200_measured_gib"]
               <= data[f"{n}_sessions"]["admission_counts_gib"] for n in (1, 4, 8))


def test_attention_benchmark_smoke(tmp_path):
    """On CPU the attention benchmark checks the kernels in Triton's interpreter and reports the schedules."""
    data = run_benchmark("attention.py", tmp_path, "--quick")
    if data["device"] == "cpu":
        assert all(error < 1e-4 for error in data["interpreter_max_abs_error"].values())
        assert 0.30 < data["schedules"]["4_chunks"]["visited_tiles"] < 0.45
    else:
        assert all(row["results"]["triton"]["forward_ms"] > 0 for row in data["layouts"].values())


def test_no_benchmark_script_shadows_a_standard_module():
    """`python benchmarks/x.py` puts benchmarks/ first on sys.path: a script named like a standard module
    (operator.py did) replaces it for everything imported after, wherever no site hook imported it first."""
    import sys
    from pathlib import Path

    scripts = {p.stem for p in (Path(__file__).parents[1] / "benchmarks").glob("*.py")}
    assert not scripts & set(sys.stdlib_module_names)


def test_gpu_check_isolates_sections_and_summarises(tmp_path):
    """The GPU check's CPU mode: each section in its own process under its own limit; one that runs out of
    time is reported and the next still runs; the summary names versions and statuses; exit code 1. The compile
    caches a previous run wrote are restored for the sections and written back with the results."""
    import json
    import subprocess
    import sys
    import tarfile

    from conftest import REPO

    previous = tmp_path / "compile-cache.tar.gz"
    (tmp_path / "triton").mkdir()
    (tmp_path / "triton" / "kernel.cubin").write_bytes(b"\0" * 1000)
    with tarfile.open(previous, "w:gz") as tar:
        tar.add(tmp_path / "triton", arcname="triton")
    out = tmp_path / "check"
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), str(out), "--cpu",
                          "--only", "serve,env", "--limit", "serve=0.5", "--compile-cache", str(previous)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 1, run.stdout + run.stderr
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["sections"]["serve"]["status"] == "timed out"
    env = summary["sections"]["env"]
    assert env["status"] == "passed" and env["result"]["torch"].startswith("2.") and env["result"]["matmul"]["tflops"] > 0
    assert "cuda" in summary["missing_capabilities"]
    markdown = (out / "gpu_check.md").read_text()
    assert "| serve | timed out |" in markdown and "| env | passed |" in markdown
    assert "===== env" in (out / "sections.log").read_text()
    assert summary["compile_cache"]["restored_bytes"] == 1000 and "Compile caches: " in markdown
    with tarfile.open(out / "compile-cache.tar.gz") as tar:
        assert "triton/kernel.cubin" in tar.getnames()


def test_the_chunk_profile_says_where_a_served_chunks_time_goes():
    """The GPU check's profile of one chunk (serve section): the top operators by self time, each sorted into
    matmul / attention / other (on a GPU, cuBLAS's and SDPA's kernels by name), the shares summing to one, and
    its table in the summary."""
    import sys

    import pytest
    import torch

    from conftest import REPO

    sys.path.insert(0, str(REPO / "benchmarks"))
    from gpu_check import markdown
    from serve import LastChunk, chunk_profile, op_kind

    assert [op_kind(k) for k in ("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNT", "sm90_xmma_gemm_bf16bf16_bf16f32",
                                 "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128>>",
                                 "fmha_cutlassF_bf16_aligned_64x128_rf_sm80", "aten::addmm",
                                 "void at::native::vectorized_elementwise_kernel<4, CUDAFunctor_add<float>>")] == [
        "matmul", "matmul", "attention", "attention", "matmul", "other"]
    profile = chunk_profile(LastChunk([], "cpu", torch.float32), "cpu", top=5)
    assert profile["clock"] == "host" and sum(profile["shares"].values()) == pytest.approx(1.0)
    times = [r["self_ms"] for r in profile["top"]]
    assert len(times) == 5 and times == sorted(times, reverse=True) and sum(times) <= profile["total_ms"]
    assert all(r["kind"] == op_kind(r["op"]) for r in profile["top"])
    # the tiny model's chunk calls both (among all its operators: on a busy machine any few may top the list)
    assert profile["shares"]["matmul"] > 0 and profile["shares"]["attention"] > 0
    text = markdown({"date": "2026-12-04T00:00:00+00:00", "mode": "cpu dry run", "targets": [],
                     "missing_capabilities": {}, "sections": {"serve": {"status": "passed", "seconds": 1,
                                                                        "result": {"profile": profile}}}})
    top = profile["top"][0]
    assert f"| `{top['op']}` | {top['kind']} | {top['self_ms']:.2f} | {top['share']:.1%} |" in text


def test_gpu_check_refuses_bad_arguments_before_running(tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    for args in (["--only", "env,nonsense"], ["--limit", "train=soon"], []):
        run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), *args],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 2 and ("nonsense" in run.stderr or "SECTION=SECONDS" in run.stderr
                                        or "OUT" in run.stderr), run.stderr


def test_gpu_bundle_is_pure_python_but_torchao_and_small(tmp_path):
    """The wheels for a GPU machine without our dependencies: the project, torchtitan, omegaconf…, all
    py3-none-any but torchao's (one wheel for every CPython >= 3.10 on x86-64 Linux, the GPU machine's), well
    under what may travel, and the command to run there."""
    import json
    import subprocess
    import sys

    from conftest import REPO

    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_bundle.py"), "--out", str(tmp_path / "b")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    manifest = json.loads((tmp_path / "b" / "bundle.json").read_text())
    names = {name.split("-")[0] for name in manifest["wheels"]}
    assert {"wam_platform", "torchtitan", "omegaconf"} <= names
    binary = [name for name in manifest["wheels"] if not name.endswith("-none-any.whl")]
    assert [name.split("-")[0] for name in binary] == ["torchao"] and "-abi3-" in binary[0] and "x86_64" in binary[0]
    assert manifest["total_mib"] < 16
    assert "--no-index --no-deps" in manifest["command"] and "benchmarks/gpu_check.py" in run.stdout


def test_gpu_check_summary_of_a_gpu_run_names_every_target():
    """The GPU-only parts of the summary (targets, attention, training and serving tables) render from results
    shaped as the sections return them on a GPU; a missing measurement reads 'not measured', never a crash."""
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "benchmarks"))
    from gpu_check import TARGETS, evaluate_targets, markdown

    kernel = {"forward_ms": 1.0, "forward_backward_ms": 3.0, "forward_tflops": 300.0, "forward_backward_tflops": 350.0}
    layout = {"tokens": 13300, "allowed_fraction": 0.35, "tuning_s": 20.0, "results": {"triton": kernel, "flex": kernel},
              "tuning": {"chosen": {"forward": "PassConfig(block=128, tile=64, num_warps=8, num_stages=3)"}},
              "triton_vs_flex_speedup_forward_backward": 1.2, "triton_tflops_vs_dense_sdpa_forward_backward": 0.5}
    step = {"layers": 4, "dim": 5120, "tokens": 13300, "step_s": 0.4, "tokens_per_s": 33250.0, "mfu_pct": 47.0,
            "peak_allocated_gib": 40.0, "estimate_gib": 44.0}
    latency = {"kv_cache": {"p50_ms": 10.0, "p99_ms": 12.0}, "recompute": {"p50_ms": 80.0, "p99_ms": 90.0},
               "speedup_p50": 8.0}
    sections = {"env": {"status": "passed", "seconds": 3, "result": {
                    "gpu": "NVIDIA H200", "python": "3.12.3", "torch": "2.11.0+cu130", "cuda_runtime": "13.0",
                    "triton": "3.6.0", "torchtitan": "0.3.0", "bundle_commit": "abc1234",
                    "matmul": {"n": 8192, "dtype": "torch.bfloat16", "tflops": 790.0}, "nvidia_smi": "| H200 |"}},
                "attention": {"status": "passed", "seconds": 90, "result": {"layouts": {"4_chunks": layout}}},
                "train": {"status": "passed", "seconds": 120, "result": {"triton": step}},
                "pytest": {"status": "failed", "seconds": 50, "error": "2 test(s) failed"},
                "serve": {"status": "passed", "seconds": 40, "result": {"1_steps": latency}}}
    targets = evaluate_targets(sections)
    assert len(targets) == len(TARGETS)
    verdicts = {row["target"]: row["verdict"] for row in targets}
    assert verdicts["Triton fwd+bwd vs compiled flex (time ratio), 4 chunks"] == "met"
    assert verdicts["Triton TFLOP/s per allowed FLOP vs dense SDPA, 4 chunks"] == "missed by 0.1"
    assert verdicts["MFU % of 989 TFLOP/s, 14B width, Triton"] == "met"
    assert verdicts["MFU % of 989 TFLOP/s, 14B width, flex"] == "not measured"
    assert verdicts["KV cache vs recompute at 4 chunks, 1 step (speed-up)"] == "met"
    assert verdicts["KV cache vs recompute at 4 chunks, 4 steps (speed-up)"] == "not measured"
    text = markdown({"date": "2026-12-03T00:00:00+00:00", "mode": "gpu", "sections": sections, "targets": targets,
                     "missing_capabilities": {"titan-trainer": "ImportError: DataParallelMeshDims"}})
    assert "NVIDIA H200" in text and "790 TFLOP/s" in text and "| pytest | failed |" in text
    assert "| 1 | 10.0 / 12.0 | 80.0 / 90.0 | 8.0x |" in text
    assert "| triton | 4 x 5120 | 13300 | 0.400 | 33,250 | 47.0 | 40.0 | 44.0 |" in text
    assert "Tiles chosen: forward PassConfig(block=128" in text and "missed by 0.1" in text
