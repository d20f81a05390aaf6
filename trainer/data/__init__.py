"""Training data: sources of samples and the rank-sharded, resumable loader torchtitan's Trainer consumes."""
