"""Frozen umT5 text encoder (transformers `UMT5EncoderModel`) and its tokenizers.

Weights load from a local path or an fsspec URI, never from a hub: a Hugging Face folder (config.json +
safetensors, tokenizer files alongside), or Wan's `models_t5_umt5-xxl-enc-bf16.pth`, whose key names are
mapped onto transformers' UMT5. Presets without tokenizer files (tiny) use a byte-level tokenizer.
Features past a prompt's real length are zeroed, as Wan does before its text embedding.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

from wam.platform.errors import ConfigError
from wam.platform.storage import localize

UMT5_CONFIGS = {
    "umt5-xxl": dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64),
    "tiny": dict(vocab_size=259, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4),
}


def umt5_config(name: str) -> UMT5Config:
    if name not in UMT5_CONFIGS:
        raise ConfigError(f"unknown text encoder {name!r}; available: {', '.join(UMT5_CONFIGS)}")
    return UMT5Config(**UMT5_CONFIGS[name], relative_attention_num_buckets=32, relative_attention_max_distance=128,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False, layer_norm_epsilon=1e-6)


class ByteTokenizer:
    """UTF-8 bytes offset by 3 (pad 0, eos 1, unk 2), as ByT5 does; needs no files."""

    pad_id, eos_id, offset = 0, 1, 3
    vocab_size = 256 + 3

    def __call__(self, prompts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.full((len(prompts), max_length), self.pad_id, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            tokens = [b + self.offset for b in prompt.encode("utf-8")][: max_length - 1] + [self.eos_id]
            ids[i, : len(tokens)] = torch.tensor(tokens)
        return ids, ids.ne(self.pad_id)


class HFTokenizer:
    """A tokenizer saved next to the weights (umT5's SentencePiece), padded/truncated to max_length."""

    def __init__(self, path: Path):
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)

    def __call__(self, prompts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=max_length,
                             add_special_tokens=True, return_tensors="pt")
        return out.input_ids, out.attention_mask.bool()


# Wan's T5 encoder names -> transformers UMT5EncoderModel names.
_WAN_T5_KEYS = [
    (r"token_embedding\.weight", "shared.weight"),
    (r"blocks\.(\d+)\.norm1\.weight", r"encoder.block.\1.layer.0.layer_norm.weight"),
    (r"blocks\.(\d+)\.attn\.([qkvo])\.weight", r"encoder.block.\1.layer.0.SelfAttention.\2.weight"),
    (r"blocks\.(\d+)\.pos_embedding\.embedding\.weight",
     r"encoder.block.\1.layer.0.SelfAttention.relative_attention_bias.weight"),
    (r"blocks\.(\d+)\.norm2\.weight", r"encoder.block.\1.layer.1.layer_norm.weight"),
    (r"blocks\.(\d+)\.ffn\.gate\.0\.weight", r"encoder.block.\1.layer.1.DenseReluDense.wi_0.weight"),
    (r"blocks\.(\d+)\.ffn\.fc1\.weight", r"encoder.block.\1.layer.1.DenseReluDense.wi_1.weight"),
    (r"blocks\.(\d+)\.ffn\.fc2\.weight", r"encoder.block.\1.layer.1.DenseReluDense.wo.weight"),
    (r"norm\.weight", "encoder.final_layer_norm.weight"),
]


def wan_t5_to_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Wan T5-encoder state dict to UMT5EncoderModel names; unknown keys are an error."""
    out, unknown = {}, []
    for key, value in state_dict.items():
        for pattern, replacement in _WAN_T5_KEYS:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, replacement, key)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"not a Wan umT5 encoder checkpoint: unexpected keys {unknown[:8]}")
    out["encoder.embed_tokens.weight"] = out["shared.weight"]
    return out


class TextEncoder(nn.Module):
    """Prompts -> (B, text_len, d_model) features, zero past each prompt's length."""

    def __init__(self, model: UMT5EncoderModel, tokenizer, text_len: int):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.text_len = text_len

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> torch.Tensor:
        ids, mask = self.tokenizer(prompts, self.text_len)
        device = self.model.shared.weight.device
        hidden = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        return hidden.float() * mask.to(device).unsqueeze(-1)


def load_text_encoder(name: str, text_len: int, path: str | None = None, tokenizer_path: str | None = None,
                      seed: int = 0, dtype: torch.dtype = torch.float32) -> TextEncoder:
    """`path`: a Hugging Face folder or a Wan `.pth` (local or fsspec URI); None builds random weights from
    `seed` (tiny preset / tests only). `tokenizer_path` defaults to the weights' folder; without tokenizer
    files the byte tokenizer is used, which only a model trained with it (tiny) understands."""
    config = umt5_config(name)
    tokenizer = ByteTokenizer() if config.vocab_size == ByteTokenizer.vocab_size else None
    if path is None:
        if name != "tiny":
            raise ConfigError(f"the {name} text encoder needs weights: set a path to a Hugging Face folder "
                              "or Wan's models_t5_umt5-xxl-enc-bf16.pth")
        torch.manual_seed(seed)
        model = UMT5EncoderModel(config)
    else:
        local = localize(path)
        if local.is_dir():
            model = UMT5EncoderModel.from_pretrained(str(local), local_files_only=True, torch_dtype=dtype)
            tokenizer_path = tokenizer_path or str(local)
        else:
            with torch.device("meta"):
                model = UMT5EncoderModel(config)
            state = wan_t5_to_hf(torch.load(local, map_location="cpu", weights_only=True, mmap=True))
            model.load_state_dict(state, strict=True, assign=True)
    if tokenizer_path is not None and any(localize(tokenizer_path).glob("*token*")):
        tokenizer = HFTokenizer(localize(tokenizer_path))
    if tokenizer is None:
        raise ConfigError(f"no tokenizer for {name}: pass tokenizer_path (a folder with the umT5 tokenizer files)")
    return TextEncoder(model.to(dtype), tokenizer, text_len)
