"""Operators of fastseq (``torch.ops.fastseq.*``): schemas, fake implementations, autograd."""

from fastseq.ops import cells  # noqa: F401  (registers the cell operators)
from fastseq.ops import layers  # noqa: F401  (registers the layer operators)
from fastseq.ops import attention  # noqa: F401  (registers the attention operators)
