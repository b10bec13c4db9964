"""fastseq: fused recurrent and attention kernels behind drop-in torch.nn modules."""
