"""Everything that runs the model: the WAM, flow matching, data, kernels, torchtitan integration, serving."""
