"""What the benchmark measures: case specifications and the named presets.

A :class:`Spec` names one measurement: an operator family (``lstm_cell`` … ``sdpa``), its sizes, dtype, mode
(``fwd``: forward without autograd; ``bwd``: the backward alone, over a recorded forward; ``fwd+bwd``: both) and
options (layers, directions, packing; attention's causal flag, mask, key/value heads, dropout). A preset is a
function of the device type returning the list of specs.

Sizes of the recurrences: ``batch`` (B), ``hidden`` (H, also the input size), ``steps`` (T: the decoder loop's
length for a cell, the sequence length for a layer). Sizes of attention: ``batch``, ``heads``, ``q_len`` (L),
``kv_len`` (S), ``head_dim`` (E = Ev).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

CELL_OPS = ("lstm_cell", "gru_cell", "rnn_cell")
LAYER_OPS = ("lstm_layer", "gru_layer", "rnn_layer")
ATTENTION_OPS = ("sdpa",)
OPS = CELL_OPS + LAYER_OPS + ATTENTION_OPS
MODES = ("fwd", "bwd", "fwd+bwd")
DTYPES = ("float32", "float16", "bfloat16")

# Short names of the sizes in labels and tables.
SIZE_LABELS = {"batch": "B", "hidden": "H", "steps": "T", "heads": "heads", "q_len": "L", "kv_len": "S",
               "head_dim": "E"}


@dataclass(frozen=True)
class Spec:
    """One benchmark case."""

    op: str
    sizes: tuple[tuple[str, int], ...]
    dtype: str
    mode: str
    options: tuple[tuple[str, object], ...] = field(default=())

    def size(self, key: str, default: int | None = None) -> int | None:
        return dict(self.sizes).get(key, default)

    def option(self, key: str, default=None):
        return dict(self.options).get(key, default)

    @property
    def shape(self) -> str:
        """The sizes and options in a few characters, e.g. ``B=8 H=256 T=64 L=2 bi``."""
        parts = [f"{SIZE_LABELS.get(k, k)}={v}" for k, v in self.sizes]
        o = dict(self.options)
        if o.get("layers", 1) != 1:
            parts.append(f"layers={o['layers']}")
        parts += [name for name in ("bidirectional", "packed", "causal") if o.get(name)]
        if o.get("mask", "none") != "none":
            parts.append(f"mask={o['mask']}")
        if o.get("kv_heads", self.size("heads")) != self.size("heads"):
            parts.append(f"kv_heads={o['kv_heads']}")
        if o.get("dropout"):
            parts.append(f"dropout={o['dropout']}")
        return " ".join(parts)

    @property
    def label(self) -> str:
        return f"{self.op} {self.shape} {self.mode} {self.dtype}"


def cell(op: str, batch: int, hidden: int, steps: int, dtype: str, mode: str) -> Spec:
    """A decoder loop: ``op``'s cell stepped ``steps`` times, its state fed back (input size = ``hidden``)."""
    return Spec(op, (("batch", batch), ("hidden", hidden), ("steps", steps)), dtype, mode)


def layer(op: str, batch: int, hidden: int, steps: int, dtype: str, mode: str, *, layers: int = 1,
          bidirectional: bool = False, packed: bool = False) -> Spec:
    """A whole layer over a sequence of ``steps`` (input size = ``hidden``); ``packed``: a PackedSequence with
    lengths spread over [steps/4, steps]."""
    return Spec(op, (("batch", batch), ("hidden", hidden), ("steps", steps)), dtype, mode,
                (("layers", layers), ("bidirectional", bidirectional), ("packed", packed)))


def attention(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int, dtype: str, mode: str, *,
              causal: bool = False, mask: str = "none", kv_heads: int | None = None, dropout: float = 0.0) -> Spec:
    """Scaled dot-product attention. ``mask``: "none", "bool" (random, every row keeps a key), "float" (an
    additive bias), or "padding" (the last half of the keys masked out for every query); ``kv_heads``: fewer
    key/value heads than query heads (GQA)."""
    return Spec("sdpa", (("batch", batch), ("heads", heads), ("q_len", q_len), ("kv_len", kv_len),
                         ("head_dim", head_dim)), dtype, mode,
                (("causal", causal), ("mask", mask), ("kv_heads", kv_heads or heads), ("dropout", dropout)))


def _grid(*axes):
    return itertools.product(*axes)


# ---------------------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------------------


def _tiny(device: str) -> list[Spec]:
    """Seconds on any machine: for the tests."""
    specs = [cell(op, 2, 8, 3, "float32", m) for op in CELL_OPS for m in ("fwd", "fwd+bwd")]
    specs += [layer(op, 2, 8, 4, "float32", m) for op in LAYER_OPS for m in ("fwd", "fwd+bwd")]
    specs += [attention(1, 2, 8, 8, 8, "float32", m) for m in ("fwd", "fwd+bwd")]
    return specs


def _quick(device: str) -> list[Spec]:
    """The default: about a minute on a 2-core CPU. The decoder loops and layers at the sizes of issue 6's
    CPU targets, forward, and training at batch 1; one attention case."""
    dtypes = ("float32",) if device == "cpu" else ("float32", "bfloat16")
    specs = []
    for dtype, op, (b, h), mode in _grid(dtypes, CELL_OPS, ((1, 128), (8, 512)), ("fwd", "fwd+bwd")):
        if mode == "fwd" or b == 1:  # training at B = 8 (seconds a case on CPU): preset cpu-targets
            specs.append(cell(op, b, h, 32, dtype, mode))
    for dtype, op, b, mode in _grid(dtypes, LAYER_OPS, (1, 8), ("fwd", "fwd+bwd")):
        if mode == "fwd" or b == 1:
            specs.append(layer(op, b, 256, 64, dtype, mode))
    for dtype, mode in _grid(dtypes, ("fwd", "fwd+bwd")):
        specs.append(attention(2, 4, 256, 256, 64, dtype if device != "cpu" else "float32", mode, causal=True))
    return specs


def _full(device: str) -> list[Spec]:
    """The grid the plots are made of: every family over batch, hidden size and length."""
    dtypes = ("float32",) if device == "cpu" else ("float32", "bfloat16")
    specs = []
    for dtype, op, b, h, mode in _grid(dtypes, CELL_OPS, (1, 8, 64), (128, 256, 512, 1024), ("fwd", "fwd+bwd")):
        specs.append(cell(op, b, h, 32, dtype, mode))
    for dtype, op, b, h, t, mode in _grid(dtypes, LAYER_OPS, (1, 8, 64), (64, 256, 512), (64, 256),
                                          ("fwd", "fwd+bwd")):
        specs.append(layer(op, b, h, t, dtype, mode))
    for dtype, op, mode in _grid(dtypes, ("lstm_layer", "gru_layer"), ("fwd", "fwd+bwd")):
        specs.append(layer(op, 8, 256, 200, dtype, mode, layers=2, bidirectional=True))
        specs.append(layer(op, 8, 256, 200, dtype, mode, packed=True))
    att_dtypes = ("float32",) if device == "cpu" else ("bfloat16", "float16", "float32")
    lengths = (128, 512, 1024) if device == "cpu" else (512, 1024, 2048, 4096, 8192)
    for dtype, n, e, causal, mode in _grid(att_dtypes, lengths, (64, 128), (False, True), ("fwd", "fwd+bwd")):
        specs.append(attention(max(1, 8192 // n), 8, n, n, e, dtype, mode, causal=causal))
    for dtype in att_dtypes:
        n = lengths[1]
        specs.append(attention(4, 8, n, n, 64, dtype, "fwd", mask="padding"))
        specs.append(attention(4, 8, n, n, 64, dtype, "fwd+bwd", mask="bool"))
        specs.append(attention(4, 8, n, n, 64, dtype, "fwd", kv_heads=2))
        specs.append(attention(4, 8, n, n, 72, dtype, "fwd"))
        specs.append(attention(4, 8, n, n, 64, dtype, "fwd+bwd", dropout=0.1))
        for s in (lengths[-1], 4 * lengths[-1]):  # decoding: one query against a long cache
            specs.append(attention(8, 8, 1, s, 128, dtype, "fwd"))
    return specs


def _fastrnns(device: str) -> list[Spec]:
    """PyTorch's own RNN benchmark default (benchmarks/fastrnns): seqLength 100, miniBatch 64, input and hidden
    512, one layer."""
    dtypes = ("float32",) if device == "cpu" else ("float32", "bfloat16")
    return [layer(op, 64, 512, 100, dtype, mode)
            for dtype, op, mode in _grid(dtypes, ("lstm_layer", "gru_layer"), ("fwd", "fwd+bwd"))]


def _flashrnn(device: str) -> list[Spec]:
    """FlashRNN's chart: batch 16, sequence 1024, hidden 768, one layer."""
    dtypes = ("float32",) if device == "cpu" else ("bfloat16", "float32")
    return [layer(op, 16, 768, 1024, dtype, mode)
            for dtype, op, mode in _grid(dtypes, ("lstm_layer", "gru_layer"), ("fwd", "fwd+bwd"))]


def _fa3(device: str) -> list[Spec]:
    """The FlashAttention-3 paper's grid: 16k tokens in all (batch = 16384 / L), hidden 2048 (heads = 2048 / E),
    head sizes 64, 128, 256, causal and not, forward and forward+backward."""
    dtypes = ("float32",) if device == "cpu" else ("bfloat16", "float16")
    specs = []
    for dtype, e, n, causal, mode in _grid(dtypes, (64, 128, 256), (512, 1024, 2048, 4096, 8192, 16384),
                                           (False, True), ("fwd", "fwd+bwd")):
        specs.append(attention(16384 // n, 2048 // e, n, n, e, dtype, mode, causal=causal))
    return specs


def _cpu_targets(device: str) -> list[Spec]:
    """Issue 6's CPU targets: cell decode loops at (B, H) = (1, 128) and (8, 512); GRU layers; LSTM layers at
    B ∈ {1, 8}, T = 200, H = 256, one and two layers, bidirectional. float32, inference and training."""
    specs = []
    for op, (b, h), mode in _grid(CELL_OPS, ((1, 128), (8, 512)), ("fwd", "fwd+bwd")):
        specs.append(cell(op, b, h, 32, "float32", mode))
    for op, b, layers, mode in _grid(("lstm_layer", "gru_layer"), (1, 8), (1, 2), ("fwd", "fwd+bwd")):
        specs.append(layer(op, b, 256, 200, "float32", mode, layers=layers, bidirectional=True))
    return specs


def _gpu(device: str) -> list[Spec]:
    """What benchmarks/gpu_check.sh runs on a GPU in a few minutes: decoder loops (eager and CUDA graph),
    layers padded and packed, attention at the FA3 paper's head sizes and a decode case."""
    specs = []
    for dtype, op, b, h, mode in _grid(("bfloat16", "float32"), CELL_OPS, (1, 64), (128, 1024),
                                       ("fwd", "fwd+bwd")):
        specs.append(cell(op, b, h, 32, dtype, mode))
    for dtype, op, b, h, packed, mode in _grid(("bfloat16", "float32"), ("lstm_layer", "gru_layer"), (1, 32),
                                               (128, 512), (False, True), ("fwd", "fwd+bwd")):
        specs.append(layer(op, b, h, 256, dtype, mode, layers=2, bidirectional=True, packed=packed))
    for dtype, e, n, causal, mode in _grid(("bfloat16",), (64, 128), (1024, 4096), (False, True),
                                           ("fwd", "fwd+bwd")):
        specs.append(attention(16384 // n, 2048 // e, n, n, e, dtype, mode, causal=causal))
    specs.append(attention(8, 16, 1, 16384, 128, "bfloat16", "fwd"))
    specs.append(attention(4, 16, 1024, 1024, 128, "bfloat16", "fwd+bwd", mask="padding"))
    return specs


PRESETS = {
    "quick": _quick,
    "full": _full,
    "fastrnns": _fastrnns,
    "flashrnn": _flashrnn,
    "fa3": _fa3,
    "cpu-targets": _cpu_targets,
    "gpu": _gpu,
    "tiny": _tiny,
}


def preset(name: str, device: str) -> list[Spec]:
    """The specs of preset ``name`` for ``device`` ("cpu" or "cuda")."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name](device)


def describe_presets() -> str:
    """One line per preset: its name and the first line of its docstring."""
    return "\n".join(f"  {name:<12} {fn.__doc__.strip().splitlines()[0]}" for name, fn in PRESETS.items())
