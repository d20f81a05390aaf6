"""Everything that runs the model: the WAM, flow matching, data, kernels, torchtitan integration, serving."""

from wam.trainer import quiet  # noqa: F401  (known-harmless third-party messages, filtered before any import)
