"""fastseq's drop-in subclasses of torch.nn modules."""

from fastseq.nn.cells import GRUCell, LSTMCell, RNNCell

__all__ = ["LSTMCell", "GRUCell", "RNNCell"]
