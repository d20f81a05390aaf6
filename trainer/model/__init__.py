"""The World Action Model (Wan2.1 DiT + DreamZero heads) and its frozen encoders."""

from wam.trainer.model.model import WamInputs, WamModel, WamOutputs
from wam.trainer.model.registry import build_model, model_config

__all__ = ["WamInputs", "WamModel", "WamOutputs", "build_model", "model_config"]
