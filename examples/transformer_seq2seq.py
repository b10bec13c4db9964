"""``nn.Transformer`` sequence-to-sequence (learn to reverse a sequence) with its attention on fastseq.

Encoder self-attention with a source padding mask, decoder self-attention with a causal mask
(``generate_square_subsequent_mask``, ``tgt_is_causal=True``), and decoder-to-encoder cross-attention, all
``fastseq.MultiheadAttention`` after ``fastseq.patch(model)``. A few teacher-forced training steps on random
data, then greedy decoding under ``torch.no_grad()``.

    python examples/transformer_seq2seq.py
    python examples/transformer_seq2seq.py --backend triton --d-model 16 --heads 2 --seq-len 6 --batch 2
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

BOS, PAD = 1, 0


def positional(length: int, d_model: int, device) -> torch.Tensor:
    pos = torch.arange(length, device=device).unsqueeze(1)
    div = torch.exp(torch.arange(0, d_model, 2, device=device) * (-math.log(10000.0) / d_model))
    pe = torch.zeros(length, d_model, device=device)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)
    return pe


class Seq2Seq(nn.Module):
    def __init__(self, vocab: int, d_model: int, heads: int, layers: int, dropout: float) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.transformer = nn.Transformer(d_model, heads, num_encoder_layers=layers, num_decoder_layers=layers,
                                          dim_feedforward=2 * d_model, dropout=dropout, batch_first=True)
        self.out = nn.Linear(d_model, vocab)
        self.d_model = d_model

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) * math.sqrt(self.d_model)
        return x + positional(tokens.size(1), self.d_model, tokens.device)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        src_padding = src == PAD
        causal = nn.Transformer.generate_square_subsequent_mask(tgt_in.size(1), device=src.device)
        h = self.transformer(self._embed(src), self._embed(tgt_in), tgt_mask=causal, tgt_is_causal=True,
                             src_key_padding_mask=src_padding, memory_key_padding_mask=src_padding)
        return self.out(h)

    @torch.no_grad()
    def greedy(self, src: torch.Tensor, length: int) -> torch.Tensor:
        tgt = torch.full((src.size(0), 1), BOS, dtype=torch.long, device=src.device)
        for _ in range(length):
            nxt = self(src, tgt)[:, -1].argmax(-1, keepdim=True)
            tgt = torch.cat([tgt, nxt], dim=1)
        return tgt[:, 1:]


def random_batch(batch: int, seq_len: int, vocab: int, device):
    src = torch.randint(2, vocab, (batch, seq_len), device=device)
    src[0, -1] = PAD  # one padded position: the padding masks are exercised
    tgt = src.flip(1)
    tgt_in = torch.cat([torch.full_like(tgt[:, :1], BOS), tgt[:, :-1]], dim=1)
    return src, tgt_in, tgt


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="auto", choices=fastseq.BACKENDS)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=10)
    p.add_argument("--vocab", type=int, default=20)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    model = fastseq.patch(Seq2Seq(args.vocab, args.d_model, args.heads, args.layers, args.dropout).to(device),
                          backend=args.backend)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    model.train()
    for step in range(args.steps):
        src, tgt_in, tgt = random_batch(args.batch, args.seq_len, args.vocab, device)
        logits = model(src, tgt_in)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=PAD)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        print(f"step {step:3d}  loss {loss.item():.4f}")

    model.eval()
    src, _, tgt = random_batch(args.batch, args.seq_len, args.vocab, device)
    pred = model.greedy(src, args.seq_len)
    accuracy = (pred == tgt).float().mean().item()
    print(f"greedy token accuracy {accuracy:.3f} (backend={args.backend!r})")
    return {"losses": losses, "accuracy": accuracy}


if __name__ == "__main__":
    main()
