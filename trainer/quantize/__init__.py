"""NVFP4 quantization of complete training checkpoints, and loading the result for serving."""
