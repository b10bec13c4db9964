"""A Transformer-encoder sequence classifier whose attention runs on fastseq.

Token embedding + sinusoidal positional encoding + ``nn.TransformerEncoder`` (batch_first, padding mask) +
masked mean pooling + a linear head. ``fastseq.patch(model)`` swaps every ``nn.MultiheadAttention`` for
``fastseq.MultiheadAttention`` in place (same parameters), and keeps torch's inference fast path from bypassing
it. A few training steps on random data, then evaluation under ``torch.no_grad()``.

    python examples/transformer_classifier.py                      # backend "auto" (torch's kernels on CPU)
    python examples/transformer_classifier.py --backend triton --d-model 16 --heads 2 --seq-len 8 --batch 2
                                                                   # (on CPU: the Triton interpreter, slow)
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
from torch import nn

if "triton" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton on CPU tensors: must be set before importing fastseq

import fastseq  # noqa: E402


class PositionalEncoding(nn.Module):
    def __init__(self, d_model: int, max_len: int = 512) -> None:
        super().__init__()
        pos = torch.arange(max_len).unsqueeze(1)
        div = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, d_model)
        pe[:, 0::2] = torch.sin(pos * div)
        pe[:, 1::2] = torch.cos(pos * div)
        self.register_buffer("pe", pe)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, L, E)
        return x + self.pe[: x.size(1)]


class Classifier(nn.Module):
    def __init__(self, vocab: int, d_model: int, heads: int, layers: int, classes: int, dropout: float) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = PositionalEncoding(d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=2 * d_model, dropout=dropout,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, classes)
        self.scale = math.sqrt(d_model)

    def forward(self, tokens: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        x = self.pos(self.embed(tokens) * self.scale)
        x = self.encoder(x, src_key_padding_mask=padding)  # padding: True where there is no token
        keep = (~padding).unsqueeze(-1).to(x.dtype)
        return self.head((x * keep).sum(1) / keep.sum(1).clamp_min(1.0))


def random_batch(batch: int, seq_len: int, vocab: int, classes: int, device):
    tokens = torch.randint(1, vocab, (batch, seq_len), device=device)
    lengths = torch.randint(max(1, seq_len // 2), seq_len + 1, (batch,), device=device)
    padding = torch.arange(seq_len, device=device) >= lengths.unsqueeze(1)
    tokens = tokens.masked_fill(padding, 0)
    labels = tokens[:, 0] % classes  # a function of the tokens, so that there is something to learn
    return tokens, padding, labels


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="auto", choices=fastseq.BACKENDS)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=24)
    p.add_argument("--vocab", type=int, default=50)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    model = Classifier(args.vocab, args.d_model, args.heads, args.layers, args.classes, args.dropout).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)  # built before patching: it keeps working
    fastseq.patch(model, backend=args.backend)

    losses = []
    model.train()
    for step in range(args.steps):
        tokens, padding, labels = random_batch(args.batch, args.seq_len, args.vocab, args.classes, device)
        loss = nn.functional.cross_entropy(model(tokens, padding), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        print(f"step {step:3d}  loss {loss.item():.4f}")

    model.eval()
    with torch.no_grad():
        tokens, padding, labels = random_batch(args.batch, args.seq_len, args.vocab, args.classes, device)
        accuracy = (model(tokens, padding).argmax(-1) == labels).float().mean().item()
    print(f"eval accuracy {accuracy:.3f} (backend={args.backend!r})")
    return {"losses": losses, "accuracy": accuracy}


if __name__ == "__main__":
    main()
