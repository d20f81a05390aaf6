"""The platform's Triton kernels: block-sparse flash attention over the joint video-action sequence."""

from wam.trainer.kernels.op import RaggedMask, block_sparse_attention

__all__ = ["RaggedMask", "block_sparse_attention"]
