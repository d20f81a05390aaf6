"""The Triton attention kernels (wam.trainer.kernels) against SDPA with the dense mask.

On CPU they run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), which computes bf16 wrongly, so
these tests use fp32 and fp16; tests/test_gpu.py repeats them compiled, in bf16, where a GPU exists.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

from wam.platform.config import load_config
from wam.platform.layout import TokenKind, TokenLayout
from wam.trainer.kernels import RaggedMask, block_sparse_attention
from wam.trainer.kernels.schedule import KernelConfigs, PassConfig, build_schedule
from wam.trainer.model.attention import TritonKernel
from wam.trainer.model.mask import AttentionMask
from wam.trainer.model.rope import apply_rope, rope_tables

from conftest import progress, random_inputs, randomized_model, wam_cli, write_run_config

HEADS = 2


def reference(q, k, v, dense: torch.Tensor, scale: float | None = None):
    """(out, lse) of masked attention in fp32: SDPA with the dense mask, lse from the masked scores."""
    q, k, v = (t.float().transpose(1, 2) for t in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=dense, scale=scale).transpose(1, 2)
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~dense, float("-inf"))
    return out, torch.logsumexp(scores, dim=-1)


def inputs(lq: int, lk: int, dtype, batch=2, head_dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, lq, HEADS, head_dim, generator=g).to(dtype).requires_grad_()
    k, v = (torch.randn(batch, lk, HEADS, head_dim, generator=g).to(dtype).requires_grad_() for _ in range(2))
    return q, k, v


def inference_layouts(chunk: int, frames: int, tpf: int, actions: int) -> tuple[TokenLayout, TokenLayout]:
    """(queries, keys) of KV-cached prediction of `chunk`: the new chunk against the cache + itself."""
    context = TokenLayout.first_frame(tpf, actions)
    for c in range(chunk):
        context = context + TokenLayout.clean_chunk(c, frames, tpf, actions)
    query = TokenLayout.prediction(range(chunk, chunk + 1), frames, tpf, actions)
    return query, context + query


CASES = {  # (queries, keys) layouts: 1-4 chunks, 24 and 48 actions per chunk, training and inference shapes
    "1chunk-24act": (TokenLayout.teacher_forcing(1, 2, 4, 24),) * 2,
    "2chunks-48act": (TokenLayout.teacher_forcing(2, 2, 8, 48),) * 2,
    "4chunks-24act": (TokenLayout.teacher_forcing(4, 2, 4, 24),) * 2,
    "3chunks-48act": (TokenLayout.teacher_forcing(3, 1, 8, 48),) * 2,
    "infer-chunk0": inference_layouts(0, 2, 8, 24),
    "infer-chunk2-48act": inference_layouts(2, 2, 8, 48),
}
TOLERANCE = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.float16: dict(atol=4e-3, rtol=4e-3)}


def assert_close(got, want, dtype):
    torch.testing.assert_close(got.float(), want.float(), **TOLERANCE[dtype])


# fp32 on every layout; fp16 (each case costs seconds in the interpreter) on two training layouts (2 and 1
# latent frames per chunk) and an inference layout.
FP16_CASES = ("2chunks-48act", "3chunks-48act", "infer-chunk2-48act")


@pytest.mark.parametrize(("case", "dtype"), [(c, torch.float32) for c in CASES] + [(c, torch.float16) for c in FP16_CASES],
                         ids=[f"{c}-fp32" for c in CASES] + [f"{c}-fp16" for c in FP16_CASES])
def test_forward_lse_and_gradients_match_dense_sdpa(case, dtype):
    queries, keys = CASES[case]
    mask = AttentionMask(queries, keys)
    q, k, v = inputs(queries.length, keys.length, dtype)
    out, lse = block_sparse_attention(q, k, v, mask, return_lse=True)
    ref_out, ref_lse = reference(q, k, v, mask.dense())
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close(out, ref_out, dtype)
    assert_close(lse, ref_lse, dtype)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref_out, (q, k, v), grad.float())
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, dtype)


def test_gradient_through_lse():
    """lse is differentiable too: a loss on it back-propagates like torch.logsumexp of the masked scores."""
    layout = TokenLayout.teacher_forcing(2, 2, 4, 24)
    mask = AttentionMask(layout)
    q, k, v = inputs(layout.length, layout.length, torch.float32)
    out, lse = block_sparse_attention(q, k, v, mask, return_lse=True)
    ref_out, ref_lse = reference(q, k, v, mask.dense())
    got = torch.autograd.grad(out.sum() + lse.square().sum(), (q, k, v))
    want = torch.autograd.grad(ref_out.sum() + ref_lse.square().sum(), (q, k, v))
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, torch.float32)


def test_ragged_batch_matches_each_sample_alone():
    """Samples with 1, 3 and 2 chunks packed along the tokens: each gets what it would get alone."""
    layouts = [TokenLayout.teacher_forcing(n, 2, 4, 24) for n in (1, 3, 2)]
    ragged = RaggedMask([AttentionMask(layout) for layout in layouts])
    total = sum(layout.length for layout in layouts)
    q, k, v = inputs(total, total, torch.float32, batch=1)
    out = block_sparse_attention(q, k, v, ragged)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    start = 0
    for layout, mask in zip(layouts, ragged.masks, strict=True):
        part = slice(start, start + layout.length)
        ref_out, _ = reference(q[:, part], k[:, part], v[:, part], mask.dense())
        want = torch.autograd.grad(ref_out, (q, k, v), grad[:, part], retain_graph=True)
        assert_close(out[:, part], ref_out, torch.float32)
        for g, w in zip(got, want, strict=True):
            assert_close(g[:, part], w[:, part], torch.float32)
        start += layout.length


def test_keys_read_in_place_from_a_kv_cache():
    """Inference reads keys as a prefix view of a preallocated cache (batch stride = capacity): no copy."""
    queries, keys = inference_layouts(1, 2, 8, 24)
    mask = AttentionMask(queries, keys)
    q, _, _ = inputs(queries.length, keys.length, torch.float32)
    cache = torch.randn(2, keys.length + 37, HEADS, 16)
    k, v = cache[:, :keys.length], cache.flip(1)[:, :keys.length]
    assert not k.is_contiguous()
    out = block_sparse_attention(q.detach(), k, v, mask)
    assert_close(out, reference(q, k, v, mask.dense())[0], torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_fused_rope_equals_rotating_first(dtype):
    layout = TokenLayout.teacher_forcing(2, 2, 4, 24)
    mask = AttentionMask(layout)
    cos, sin = rope_tables(layout, (2, 2), 16, 10_000.0, torch.device("cpu"))
    q, k, v = inputs(layout.length, layout.length, dtype)
    fused = block_sparse_attention(q, k, v, mask, rope=(cos, sin))
    rotated = block_sparse_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, mask)
    assert_close(fused, rotated, dtype)
    grad = torch.randn_like(fused)
    for g, w in zip(torch.autograd.grad(fused, (q, k, v), grad), torch.autograd.grad(rotated, (q, k, v), grad),
                    strict=True):
        assert_close(g, w, dtype)


def test_torch_compile_sees_one_op_and_no_graph_break():
    layout = TokenLayout.teacher_forcing(2, 2, 4, 24)
    mask = AttentionMask(layout)
    q, k, v = inputs(layout.length, layout.length, torch.float32, batch=1)

    def step(q, k, v):
        return (block_sparse_attention(q * 2, k, v, mask) * 3).sum()

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    for _ in range(3):
        loss = compiled(q, k, v)
        grads = torch.autograd.grad(loss, (q, k, v))
    assert counter.frame_count <= 2  # the first trace builds the span tables, the second finds them cached
    ops = [n.target for n in counter.graphs[-1].graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.wam.block_sparse_attention.default) == 1
    want = torch.autograd.grad(step(q, k, v), (q, k, v))
    torch.testing.assert_close(loss, step(q, k, v))
    for g, w in zip(grads, want, strict=True):
        torch.testing.assert_close(g, w)


def test_bad_inputs_are_clear_errors(monkeypatch):
    layout = TokenLayout.teacher_forcing(1, 2, 4, 24)
    mask = AttentionMask(layout)
    q, k, v = (t.detach() for t in inputs(layout.length, layout.length, torch.float32))
    with pytest.raises(ValueError, match="the mask describes"):
        block_sparse_attention(q[:, 1:], k[:, 1:], v[:, 1:], mask)
    with pytest.raises(ValueError, match="head size 24"):
        block_sparse_attention(*(torch.zeros(2, layout.length, 2, 24) for _ in range(3)), mask)
    with pytest.raises(ValueError, match="share one of"):
        block_sparse_attention(q, k.double(), v, mask)
    with pytest.raises(ValueError, match="batch must be 1"):
        block_sparse_attention(q, k, v, RaggedMask([mask, mask]))
    with pytest.raises(ValueError, match="RoPE tables"):
        block_sparse_attention(q, k, v, mask, rope=(torch.ones(3, 8), torch.ones(3, 8)))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):  # a shape not scheduled yet, so it is checked
        block_sparse_attention(q[:1], k[:1], v[:1], mask)


# -- the schedule -------------------------------------------------------------------------------------------

def covered_pairs(rows: torch.Tensor, tiles: torch.Tensor, config: PassConfig, allowed: torch.Tensor,
                  keys_major: bool) -> torch.Tensor:
    """How often a pass visits each token pair, from its rows and tiles; checks each tile on the way."""
    visits = torch.zeros(allowed.shape, dtype=torch.int32)
    for start, end, other_end, begin, mid, stop in rows.tolist():
        own = slice(start, min(start + config.block, end))
        for t in range(begin, stop):
            other = slice(tiles[t].item(), min(tiles[t].item() + config.tile, other_end))
            pair = (other, own) if keys_major else (own, other)
            visits[pair] += 1
            assert allowed[pair].any(), "a visited tile must hold an allowed pair"
            if t < mid:
                assert allowed[pair].all(), "a full tile must hold no forbidden pair"
                assert start + config.block <= end and tiles[t].item() + config.tile <= other_end, \
                    "a full tile must lie inside its segment: its loads are unmasked"
    return visits


@pytest.mark.parametrize("segments", [
    [TokenLayout.teacher_forcing(4, 2, 16, 24)],
    [TokenLayout.teacher_forcing(3, 2, 20, 48)],
    [TokenLayout.teacher_forcing(n, 2, 12, 24) for n in (2, 1, 3)],
    [inference_layouts(2, 2, 16, 24)],
], ids=["4chunks", "3chunks-48act", "ragged", "inference"])
def test_schedule_visits_every_allowed_tile_once_and_no_forbidden_one(segments):
    pairs = tuple(s if isinstance(s, tuple) else (s, s) for s in segments)
    configs = KernelConfigs(PassConfig(64, 32), PassConfig(32, 64), PassConfig(64, 16))
    schedule = build_schedule(pairs, configs, torch.device("cpu"))
    allowed = torch.zeros(schedule.q_len, schedule.k_len, dtype=torch.bool)  # block-diagonal over segments
    q0 = k0 = 0
    for queries, keys in pairs:
        allowed[q0:q0 + queries.length, k0:k0 + keys.length] = AttentionMask(queries, keys).dense()
        q0, k0 = q0 + queries.length, k0 + keys.length
    for name, keys_major in (("forward", False), ("dq", False), ("dkdv", True)):
        p = getattr(schedule, name)
        visits = covered_pairs(p.rows, p.tiles, getattr(configs, name), allowed, keys_major)
        assert (visits[allowed] == 1).all(), f"{name}: every allowed pair is visited exactly once"
        assert (visits[~allowed] <= 1).all()
        work = (p.rows[:, 5] - p.rows[:, 3]).tolist()
        assert work == sorted(work, reverse=True), "heaviest programs first"


def test_schedule_skips_most_tiles_of_the_14b_layout():
    """The DreamZero 14B sequence (4 chunks, 880 tokens per latent frame): the schedule visits about the
    mask's density of tiles, which is what makes the kernel cheaper than dense attention."""
    layout = TokenLayout.teacher_forcing(4, 2, 880, 24)
    configs = KernelConfigs(PassConfig(128, 64), PassConfig(128, 64), PassConfig(128, 64))
    schedule = build_schedule(((layout, layout),), configs, torch.device("cpu"))
    tiles = -(-layout.length // 128) * -(-layout.length // 64)
    density = layout.allowed_pairs() / layout.length**2
    visited = len(schedule.forward.tiles) / tiles
    assert density < visited < density + 0.05
    assert schedule.q_meta[0, -1] == TokenKind.STATE


# -- in the model ---------------------------------------------------------------------------------------------

def test_wam_training_step_with_triton_attention_matches_sdpa(tiny):
    """The tiny WAM on a 2-chunk sample: outputs and every parameter gradient equal the SDPA model's. Its
    first block rotates q/k before the kernel (the default), its second fuses RoPE into the kernel."""
    sample = dataclasses.replace(tiny.sample, num_chunks=2, latent_height=4)
    reference_model = randomized_model(tiny.arch, sample, attention="sdpa")
    model = randomized_model(tiny.arch, sample, attention="triton")
    assert len(model.blocks) == 2
    for block, fuse_rope in zip(model.blocks, (False, True), strict=True):
        assert isinstance(block.self_attn.kernel, TritonKernel) and not block.self_attn.kernel.fuses_rope
        block.self_attn.kernel.fuses_rope = fuse_rope
    batch = random_inputs(tiny.arch, sample, batch=2)
    outputs = []
    for m in (reference_model, model):
        out = m(batch)
        (out.video.square().mean() + out.actions.square().mean()).backward()
        outputs.append(out)
    torch.testing.assert_close(outputs[1].video, outputs[0].video, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(outputs[1].actions, outputs[0].actions, atol=1e-5, rtol=1e-4)
    for (name, p), ref in zip(model.named_parameters(), reference_model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, ref.grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("attention", ["sdpa", "triton"])
def test_compiled_checkpointed_blocks_trace_once_and_recompute_the_same_graph(tiny, tmp_path, attention):
    """As parallelize_wam does: each block compiled, then wrapped for activation checkpointing. The forms of the
    mask a kernel reads (span tables; SDPA's dense mask and its split of the queries) are built before the blocks
    (the kernel's `prepare`), so one graph with no break serves every block and every call, and the backward's
    recomputation replays the graph the forward ran (when the tables were built inside the first compiled call,
    recomputation hit a recompiled graph and failed; SDPA's split, built there, broke every block into several graphs)."""
    from torchtitan.distributed.activation_checkpoint import FullAC

    from wam.trainer.model.model import _attention_mask

    sample = dataclasses.replace(tiny.sample, num_chunks=2, latent_height=4)
    reference_model = randomized_model(tiny.arch, sample, attention=attention)
    model = randomized_model(tiny.arch, sample, attention=attention)
    counter = CompileCounterWithBackend("aot_eager")  # AOT autograd saves tensors as inductor's graphs do
    policy = FullAC.Config().build(dump_folder=str(tmp_path))
    for i, block in enumerate(model.blocks):
        block.compile(backend=counter)
        model.blocks.register_module(str(i), policy._wrap_block(block, base_fqn=f"blocks.{i}"))
    batch = random_inputs(tiny.arch, sample, batch=1)
    _attention_mask.cache_clear()  # the compiled model meets a fresh mask first
    for m in (model, reference_model):
        out = m(batch)
        (out.video.square().mean() + out.actions.square().mean()).backward()
    assert counter.frame_count == 1
    for (name, p), ref in zip(model.named_parameters(), reference_model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, ref.grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.slow
def test_fsdp2_training_with_triton_attention_matches_sdpa(tmp_path):
    """`wam train` on 2 processes (torchtitan, FSDP2 over gloo) with the Triton op inside every block: the
    losses follow the SDPA run's (different kernels: equal within float tolerance, not bit for bit)."""
    losses = {}
    for attention in ("sdpa", "triton"):
        config = write_run_config(tmp_path, attention, model={"preset": "tiny", "attention": attention},
                                  sample={"num_chunks": 1, "latent_height": 4},
                                  training={"steps": 2, "batch_size": 1, "warmup_steps": 1},
                                  checkpoint={"interval": 2})
        result = wam_cli("train", config)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        cfg = load_config(config)
        assert cfg.model.attention == attention
        losses[attention] = [r["loss"] for _, r in sorted(progress(cfg.run_dir).items())]
    assert len(losses["triton"]) == 2  # step 2's loss depends on step 1's gradients
    assert losses["triton"] == pytest.approx(losses["sdpa"], rel=1e-4)
