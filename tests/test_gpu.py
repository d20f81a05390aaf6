"""GPU-only checks (marked `gpu`; they run wherever CUDA exists): compiled flex_attention and the Triton
kernels, forward and backward, against the dense-mask SDPA reference; the bf16 model on the GPU."""

import pytest
import torch

from wam.platform.layout import TokenLayout
from wam.trainer.model import WamInputs, build_model, model_config
from wam.trainer.model.attention import FlexKernel, SDPAKernel, TritonKernel
from wam.trainer.model.mask import AttentionMask

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-3), (torch.bfloat16, 3e-2)])
def test_compiled_flex_forward_and_backward_match_dense_sdpa(dtype, tol):
    layout = TokenLayout.teacher_forcing(4, 2, 64, 24)
    mask = AttentionMask(layout)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, layout.length, 4, 64, device="cuda", dtype=dtype, generator=g).requires_grad_()
               for _ in range(3))
    grad = torch.randn(1, layout.length, 4, 64, device="cuda", dtype=dtype, generator=g)
    results = []
    for kernel in (SDPAKernel(SDPAKernel.Config()), FlexKernel(FlexKernel.Config()),
                   TritonKernel(TritonKernel.Config())):
        out = kernel(q, k, v, mask)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
        results.append((out, dq, dk, dv))
    for other in results[1:]:
        for ref, got in zip(results[0], other, strict=True):
            assert ((got.float() - ref.float()).norm() / ref.float().norm()).item() < tol


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunks, actions", [(1, 24), (4, 24), (4, 48)])
def test_triton_kernels_at_the_14b_head_size_match_sdpa(dtype, chunks, actions, monkeypatch):
    """head_dim 128 (the 14B's), real tile sizes, 96 tokens per latent frame; out, lse, grads. One case tunes
    (compiles and times every tile candidate, then runs the fastest); the others run the default tiles, so the GPU
    check's pytest section compiles the ten candidates once rather than per dtype and times them once per run."""
    from wam.trainer.kernels import block_sparse_attention

    if (dtype, chunks, actions) != (torch.bfloat16, 4, 24):
        monkeypatch.setenv("WAM_ATTENTION_TUNING", "off")

    layout = TokenLayout.teacher_forcing(chunks, 2, 96, actions)
    mask = AttentionMask(layout)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, layout.length, 4, 128, device="cuda", dtype=dtype, generator=g).requires_grad_()
               for _ in range(3))
    out, lse = block_sparse_attention(q, k, v, mask, return_lse=True)
    qf, kf, vf = (t.detach().float().transpose(1, 2).requires_grad_() for t in (q, k, v))
    dense = mask.dense("cuda")
    ref = torch.nn.functional.scaled_dot_product_attention(qf, kf, vf, attn_mask=dense)
    scores = (qf @ kf.transpose(-1, -2) / 128**0.5).masked_fill(~dense, float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1).detach(), atol=2e-2, rtol=2e-2)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref.transpose(1, 2), (qf, kf, vf), grad.float())
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
    assert rel(out, ref.transpose(1, 2)) < 1e-2
    for a, b in zip(got, want, strict=True):
        assert rel(a, b.transpose(1, 2)) < 2e-2


@pytest.mark.parametrize("attention", ["flex", "triton"])
def test_bf16_training_step_on_gpu(tiny, attention):
    model = build_model(model_config(tiny.arch, tiny.sample, attention=attention), device="cuda", dtype=torch.bfloat16)
    batch = WamInputs.random(tiny.arch, tiny.sample, batch=2, device="cuda")
    out = model(batch)
    (out.video.square().mean() + out.actions.square().mean()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("attention", ["flex", "triton"])
def test_kv_cache_matches_full_forward_on_gpu(tiny, attention):
    arch, sample = tiny.arch, tiny.sample
    model = build_model(model_config(arch, sample, attention=attention), device="cuda").eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=(p.numel() / p.shape[0]) ** -0.5 if p.ndim > 1 else 0.1)
    batch = WamInputs.random(arch, sample, batch=1, device="cuda")
    f = sample.frames_per_chunk
    with torch.no_grad():
        full = model(batch)
        cache = model.new_cache(1, sample.num_chunks, f, sample.actions_per_chunk,
                                (sample.latent_height, sample.latent_width))
        model.set_conditioning(cache, batch.text, batch.image, batch.i2v_cond)
        model.observe(cache, batch.video[:, :, :1])
        for c in range(sample.num_chunks):
            out = model.predict(cache, batch.noisy_video[:, :, c * f:(c + 1) * f], batch.noisy_actions[:, c],
                                batch.state[:, c], batch.video_t[:, c], batch.action_t[:, c])
            torch.testing.assert_close(out.actions, full.actions[:, c], atol=1e-3, rtol=1e-3)
            model.observe(cache, batch.video[:, :, 1 + c * f:1 + (c + 1) * f], chunk=c)


def test_dali_decodes_h264_with_nvdec(tmp_path):
    """DALI's GPU decoder reads the codecs its CPU decoder cannot, and agrees with torchcodec."""
    pytest.importorskip("nvidia.dali", reason="DALI is not installed (it cannot travel to a borrowed GPU machine)")
    pytest.importorskip("torchcodec", reason="torchcodec is not installed")
    import numpy as np

    from wam.trainer.data.decode import DaliDecoder, TorchCodecDecoder
    from wam.trainer.data.lerobot import LeRobotDataset
    from wam.trainer.data.synth_dataset import CAMERAS, SynthOptions, read_frame_index, synthesize

    for codec in ("h264", "av1"):
        root = synthesize(tmp_path / codec, SynthOptions(episodes=2, codec=codec, height=180, width=320))
        segment = LeRobotDataset(str(root)).episodes[1].videos[CAMERAS[1]]
        indices = [segment.first_frame + 3 * j for j in range(17)]
        gpu = DaliDecoder("mixed").decode(segment.path, indices)
        cpu = TorchCodecDecoder().decode(segment.path, indices)
        assert [read_frame_index(f) for f in gpu] == [3 * j for j in range(17)]
        assert np.abs(gpu.astype(float) - cpu.astype(float)).mean() < 5
