"""The handoff contract: where a checkpoint's quantized model goes and the commands that make and serve it.

The operator (quantization Job, serving Deployment) and the local pipeline use the same functions, so
the two places agree on paths and arguments.
"""

from __future__ import annotations

from wam.platform.storage import join

SERVING_PORT = 8000


def quantized_uri(checkpoint_uri: str, step: int) -> str:
    """The NVFP4 model of `<checkpoint_uri>/step-<step>`, kept beside the checkpoints (outside the step
    folders, so checkpoint retention never removes a model that is being served)."""
    return join(checkpoint_uri, "nvfp4", f"step-{step}")


def quantize_command(checkpoint: str, out: str) -> list[str]:
    return ["wam", "quantize", checkpoint, "--out", out]


def serve_command(model: str, port: int = SERVING_PORT, host: str = "0.0.0.0") -> list[str]:
    return ["wam", "serve", model, "--host", host, "--port", str(port)]
