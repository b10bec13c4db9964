"""An LSTM encoder-decoder with attention, on fastseq's kernels throughout.

Encoder: ``fastseq.LSTM`` over the (padded) source. Decoder: a ``fastseq.LSTMCell`` stepped over the target;
at each step its hidden state attends over the encoder outputs with ``fastseq.scaled_dot_product_attention``
(a boolean mask, True where a source position takes part), and the context feeds the next step (input
feeding). Task: reverse a random sequence. A few teacher-forced training steps, then greedy decoding.

    python examples/lstm_seq2seq_attention.py
    python examples/lstm_seq2seq_attention.py --backend triton --hidden 16 --seq-len 5 --batch 2
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

if "triton" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton on CPU tensors: must be set before importing fastseq

import fastseq  # noqa: E402

BOS, PAD = 1, 0


class Seq2Seq(nn.Module):
    def __init__(self, vocab: int, hidden: int, backend: str) -> None:
        super().__init__()
        self.backend = backend
        self.embed = nn.Embedding(vocab, hidden)
        self.encoder = fastseq.LSTM(hidden, hidden, batch_first=True, backend=backend)
        self.decoder = fastseq.LSTMCell(2 * hidden, hidden, backend=backend)
        self.query = nn.Linear(hidden, hidden)
        self.out = nn.Linear(2 * hidden, vocab)

    def encode(self, src: torch.Tensor):
        memory, (h, c) = self.encoder(self.embed(src))  # (N, S, H)
        keep = (src != PAD).unsqueeze(1)  # (N, 1, S): True where a source position takes part
        return memory, keep, (h[-1], c[-1])

    def step(self, token, state, context, memory, keep):
        h, c = self.decoder(torch.cat([self.embed(token), context], dim=-1), state)
        q = self.query(h).unsqueeze(1)  # (N, 1, H): one query per sequence (the batch is the "head" dim)
        context = fastseq.scaled_dot_product_attention(q, memory, memory, keep, backend=self.backend).squeeze(1)
        return self.out(torch.cat([h, context], dim=-1)), (h, c), context

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        memory, keep, state = self.encode(src)
        context = torch.zeros_like(state[0])
        logits = []
        for t in range(tgt_in.size(1)):
            out, state, context = self.step(tgt_in[:, t], state, context, memory, keep)
            logits.append(out)
        return torch.stack(logits, dim=1)

    @torch.no_grad()
    def greedy(self, src: torch.Tensor, length: int) -> torch.Tensor:
        memory, keep, state = self.encode(src)
        context = torch.zeros_like(state[0])
        token = torch.full((src.size(0),), BOS, dtype=torch.long, device=src.device)
        result = []
        for _ in range(length):
            out, state, context = self.step(token, state, context, memory, keep)
            token = out.argmax(-1)
            result.append(token)
        return torch.stack(result, dim=1)


def random_batch(batch: int, seq_len: int, vocab: int, device):
    src = torch.randint(2, vocab, (batch, seq_len), device=device)
    tgt = src.flip(1)
    src[0, -1] = PAD  # one padded source position: the attention mask is exercised
    tgt_in = torch.cat([torch.full_like(tgt[:, :1], BOS), tgt[:, :-1]], dim=1)
    return src, tgt_in, tgt


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="auto", choices=fastseq.BACKENDS)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=8)
    p.add_argument("--vocab", type=int, default=20)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    model = Seq2Seq(args.vocab, args.hidden, args.backend).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    model.train()
    for step in range(args.steps):
        src, tgt_in, tgt = random_batch(args.batch, args.seq_len, args.vocab, device)
        loss = nn.functional.cross_entropy(model(src, tgt_in).flatten(0, 1), tgt.flatten(), ignore_index=PAD)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        print(f"step {step:3d}  loss {loss.item():.4f}")

    model.eval()
    src, _, tgt = random_batch(args.batch, args.seq_len, args.vocab, device)
    accuracy = (model.greedy(src, args.seq_len) == tgt).float().mean().item()
    print(f"greedy token accuracy {accuracy:.3f} (backend={args.backend!r})")
    return {"losses": losses, "accuracy": accuracy}


if __name__ == "__main__":
    main()
