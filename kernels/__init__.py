"""Triton kernels of fastseq, one family per file (shipped as ``fastseq.kernels``)."""
