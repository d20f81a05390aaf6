"""The benchmark scripts keep running (a smoke run; the numbers themselves go in docs/performance.md)."""

from conftest import run_benchmark


def test_model_benchmark_smoke(tmp_path):
    data = run_benchmark("model.py", tmp_path, "--quick", "--steps", "2")
    assert set(data["flops"]) == {"tiny", "wan2.1-1.3b", "dreamzero-5b", "dreamzero-14b"}
    assert all(row["cached_s"] > 0 for row in data["chunk_inference"]["tiny"])


def test_train_step_benchmark_smoke(tmp_path):
    data = run_benchmark("train_step.py", tmp_path, "--quick")
    assert data["eager_step_s"] > 0 and set(data["titan_step_s"]) == {"1", "2"}


def test_data_benchmark_smoke(tmp_path):
    data = run_benchmark("data.py", tmp_path, "--smoke")
    assert set(data["results"]) == {"av1", "h264", "vp9"}
    assert all(row["samples_per_s"] > 0 for rows in data["results"].values() for row in rows.values())


def test_operator_benchmark_smoke(tmp_path):
    data = run_benchmark("operator.py", tmp_path, "--jobs", "3", "--baseline", "1")
    assert data["3_concurrent"]["n"] == 3 and data["one_at_a_time"]["p50_ms"] > 0


def test_serve_benchmark_smoke(tmp_path):
    data = run_benchmark("serve.py", tmp_path, "--quick")
    assert set(data["cpu_tiny"]) == {"1_steps", "4_steps"}
    assert all(row["kv_cache"]["p50_ms"] > 0 for row in data["cpu_tiny"].values())
    assert data["quantization"]["streaming"]["mb_per_s"] > 0
    burst = data["oversized_burst"]  # 4 clients x 7 MB over a 2 MB limit: refused unread, or buffered first
    assert burst["refused_from_header"]["refused"] == burst["buffered"]["refused"] == 4
    assert burst["refused_from_header"]["peak_growth_mb"] < 10 < burst["buffered"]["peak_growth_mb"]


def test_attention_benchmark_smoke(tmp_path):
    """On CPU the attention benchmark checks the kernels in Triton's interpreter and reports the schedules."""
    data = run_benchmark("attention.py", tmp_path, "--quick")
    if data["device"] == "cpu":
        assert all(error < 1e-4 for error in data["interpreter_max_abs_error"].values())
        assert 0.30 < data["schedules"]["4_chunks"]["visited_tiles"] < 0.45
    else:
        assert all(row["results"]["triton"]["forward_ms"] > 0 for row in data["layouts"].values())
