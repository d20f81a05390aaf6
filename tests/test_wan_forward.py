"""WamModel.wan_forward is Wan2.1's DiT: it agrees with diffusers' WanTransformer3DModel given the same
weights, and with the WAM's own KV-cached path where the two must coincide (the first frame at timestep 0)."""

import pytest
import torch
from diffusers import WanTransformer3DModel

from conftest import randomized_model, wan_i2v_keys

# Our (Wan2.1) module names -> diffusers', as in diffusers' convert_wan_transformer_to_diffusers. In a block,
# Wan's norm3 is the cross-attention norm (diffusers' norm2); the affine-free norms hold no parameters.
TOP_LEVEL = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
    "head.head": "proj_out",
}
IN_BLOCK = {
    **{f"self_attn.{p}": f"attn1.to_{p}" for p in "qkv"}, "self_attn.o": "attn1.to_out.0",
    "self_attn.norm_q": "attn1.norm_q", "self_attn.norm_k": "attn1.norm_k",
    **{f"cross_attn.{p}": f"attn2.to_{p}" for p in "qkv"}, "cross_attn.o": "attn2.to_out.0",
    "cross_attn.norm_q": "attn2.norm_q", "cross_attn.norm_k": "attn2.norm_k",
    "cross_attn.k_img": "attn2.add_k_proj", "cross_attn.v_img": "attn2.add_v_proj",
    "cross_attn.norm_k_img": "attn2.norm_added_k",
    "norm3": "norm2",
    "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
}


def diffusers_name(key: str) -> str:
    if key == "head.modulation":
        return "scale_shift_table"
    module, param = key.rsplit(".", 1)
    if module.startswith("blocks."):
        _, i, rest = key.split(".", 2)
        if rest == "modulation":
            return f"blocks.{i}.scale_shift_table"
        module, param = rest.rsplit(".", 1)
        return f"blocks.{i}.{IN_BLOCK[module]}.{param}"
    return f"{TOP_LEVEL[module]}.{param}"


def diffusers_twin(model) -> WanTransformer3DModel:
    """diffusers' Wan DiT of the same shape holding `model`'s Wan weights (every one of them: strict load)."""
    arch = model.arch
    wan = WanTransformer3DModel(
        patch_size=arch.patch, num_attention_heads=arch.num_heads, attention_head_dim=arch.head_dim,
        in_channels=arch.in_dim, out_channels=arch.out_dim, text_dim=arch.text_dim, freq_dim=arch.freq_dim,
        ffn_dim=arch.ffn_dim, num_layers=arch.num_layers, cross_attn_norm=arch.cross_attn_norm, eps=arch.eps,
        image_dim=arch.image_dim if arch.has_image_branch else None,
        added_kv_proj_dim=arch.dim if arch.has_image_branch else None,
        rope_max_seq_len=1024, qk_norm="rms_norm_across_heads",
    )
    ours = model.state_dict()
    keys = wan_i2v_keys(arch.dim, arch.ffn_dim, arch.num_layers, arch.in_dim, arch.out_dim, arch.text_dim,
                        arch.freq_dim, image_dim=arch.image_dim, image=arch.has_image_branch,
                        patch=arch.patch)
    wan.load_state_dict({diffusers_name(k): ours[k] for k in keys}, strict=True)
    return wan.eval()


def test_wan_forward_equals_diffusers_wan_transformer(tiny):
    arch = tiny.arch
    assert arch.i2v_concat and arch.has_image_branch  # the I2V model: both extra inputs are exercised
    model = randomized_model(arch, tiny.sample)  # every weight random: no zero-initialised head hides errors
    wan = diffusers_twin(model)
    g = torch.Generator().manual_seed(0)
    b, z, frames, h, w = 2, arch.latent_channels, 3, 4, 6
    latents = torch.randn(b, z, frames, h, w, generator=g)
    i2v_cond = torch.randn(b, 4 + z, frames, h, w, generator=g)
    # diffusers splits its cross-attention context at a hard-coded 512 text tokens (umT5's padded length)
    text = torch.randn(b, 512, arch.text_dim, generator=g)
    image = torch.randn(b, arch.image_tokens, arch.image_dim, generator=g)

    def max_abs_diff(timestep: torch.Tensor) -> float:
        with torch.no_grad():
            ours = model.wan_forward(latents, timestep, text, image, i2v_cond)
            # Wan's I2V pipeline hands the transformer the latents already concatenated with the condition
            hidden = torch.cat([latents, i2v_cond], dim=1)  # (B, z + 4 + z, T, h, w)
            reference = wan(hidden, timestep, text, image, return_dict=False)[0]
        assert ours.dtype == torch.float32 and ours.shape == latents.shape
        assert reference.abs().mean() > 1  # outputs are not trivially zero
        return (ours - reference).abs().max().item()

    # The only difference is diffusers' timestep sinusoid, computed in fp32 where Wan2.1 (and we) use float64:
    # exact at t = 0, where the two agree bitwise (measured 0.0); 1.3e-5 at these timesteps (and 0.0 with
    # diffusers' sinusoid in float64, checked by hand), against outputs of mean magnitude 3.
    at_zero, at_t = max_abs_diff(torch.zeros(b)), max_abs_diff(torch.tensor([137.25, 861.5]))
    print(f"\nwan_forward vs diffusers: max abs diff {at_zero:.2e} at t = 0, {at_t:.2e} at t = 137.25, 861.5")
    assert at_zero < 1e-6
    assert at_t < 1e-4


def test_wan_forward_of_the_first_frame_at_timestep_0_is_what_observe_writes(tiny):
    """The KV-cached path's first frame sees only itself at timestep 0: the keys and values every block
    computes for it must be those of plain Wan on that single frame at t = 0."""
    arch, sample = tiny.arch, tiny.sample
    model = randomized_model(arch, sample)
    g = torch.Generator().manual_seed(1)
    b, z, h, w = 2, arch.latent_channels, sample.latent_height, sample.latent_width
    first = torch.randn(b, z, 1, h, w, generator=g)
    i2v_cond = torch.randn(b, 4 + z, sample.window_frames, h, w, generator=g)
    text = torch.randn(b, arch.text_len, arch.text_dim, generator=g)
    image = torch.randn(b, arch.image_tokens, arch.image_dim, generator=g)

    def self_attention_kv(run) -> list[torch.Tensor]:
        captured = []
        hooks = [linear.register_forward_hook(lambda module, args, out: captured.append(out))
                 for block in model.blocks for linear in (block.self_attn.k, block.self_attn.v)]
        try:
            with torch.no_grad():
                run()
        finally:
            for hook in hooks:
                hook.remove()
        return captured

    def observe() -> None:
        cache = model.new_cache(b, sample.num_chunks, sample.frames_per_chunk, sample.actions_per_chunk,
                                (h, w))
        model.set_conditioning(cache, text, image, i2v_cond)
        model.observe(cache, first)

    cached = self_attention_kv(observe)
    plain = self_attention_kv(lambda: model.wan_forward(first, torch.zeros(b), text, image,
                                                        i2v_cond[:, :, :1]))
    assert len(cached) == len(plain) == 2 * arch.num_layers
    diff = max((p - c).abs().max().item() for p, c in zip(plain, cached, strict=True))
    print(f"\nfirst frame, wan_forward vs observe: max abs diff of self-attention k/v {diff:.2e}")
    assert diff < 1e-6  # measured 0.0: the same operations on the same tokens


def test_wan_forward_input_errors_say_what_is_wrong(tiny):
    arch = tiny.arch
    model = randomized_model(arch, tiny.sample)
    latents = torch.randn(2, arch.latent_channels, 3, 4, 4)
    text = torch.randn(2, arch.text_len, arch.text_dim)
    image = torch.randn(2, arch.image_tokens, arch.image_dim)
    i2v_cond = torch.randn(2, 4 + arch.latent_channels, 3, 4, 4)
    t = torch.full((2,), 500.0)
    with pytest.raises(ValueError, match="i2v_cond"):
        model.wan_forward(latents, t, text, image)
    with pytest.raises(ValueError, match="CLIP image tokens"):
        model.wan_forward(latents, t, text, None, i2v_cond)
    with pytest.raises(ValueError, match=r"one timestep per sample, shape \(2,\)"):
        model.wan_forward(latents, t[:, None], text, image, i2v_cond)
    with pytest.raises(ValueError, match="i2v_cond has 1 latent frames"):
        model.wan_forward(latents, t, text, image, i2v_cond[:, :, :1])
