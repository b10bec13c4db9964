"""fastseq's drop-in subclasses of torch.nn modules."""

from fastseq.nn.attention import MultiheadAttention
from fastseq.nn.cells import GRUCell, LSTMCell, RNNCell
from fastseq.nn.layers import GRU, LSTM, RNN

__all__ = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "MultiheadAttention"]
