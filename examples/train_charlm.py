"""Train a small character-level transformer on Python standard-library source code.

The corpus is a fixed, sorted list of pure-Python standard-library modules read from the local
installation, so it needs no download and is identical on machines with the same Python version.
Adam, AdamW and Shampoo (synchronous and asynchronous inverse roots) train the same model from
the same initialization on the same batches; NG+ joins automatically when torch_shampoo has it.

    python examples/train_charlm.py            # ~1 minute on an idle 2-core CPU (66 s)
    python examples/train_charlm.py --steps 2000 --d-model 256 --layers 4 --seq-len 256 --batch 32
"""

from __future__ import annotations

import argparse
import hashlib
import platform
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import Batch, RunResult, Task, comparison_parser, run_comparison
from torch import Tensor, nn

CORPUS_FILES = (
    "argparse.py",
    "collections/__init__.py",
    "contextlib.py",
    "dataclasses.py",
    "fractions.py",
    "functools.py",
    "heapq.py",
    "json/decoder.py",
    "json/encoder.py",
    "pprint.py",
    "random.py",
    "statistics.py",
    "string.py",
    "textwrap.py",
)
VAL_FRACTION = 0.1
DEFAULT_LRS = {"sgd": 0.3, "adam": 1e-2, "adamw": 1e-2, "shampoo": 1e-2, "ngplus": 1e-3}
NGPLUS_DAMPING = None  # the library's default
DEFAULT_STEPS = 300
METHODS = ("adam", "adamw", "shampoo-sync", "shampoo-async", "soap", "ngplus")


def load_corpus() -> tuple[str, str]:
    """Train and validation text: the first 90% / last 10% of each corpus file."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train_parts, val_parts = [], []
    for name in CORPUS_FILES:
        text = (root / name).read_text(encoding="utf-8").replace("\r\n", "\n")
        cut = int(len(text) * (1 - VAL_FRACTION))
        train_parts.append(text[:cut])
        val_parts.append(text[cut:])
    return "".join(train_parts), "".join(val_parts)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: causal self-attention and a GELU MLP."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model)
        )

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.n_heads, d // self.n_heads).unbind(2)
        att = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    """Decoder-only transformer over characters with learned positional embeddings."""

    def __init__(self, vocab: int, d_model: int, n_layers: int, n_heads: int, seq_len: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        self.blocks = nn.Sequential(*(Block(d_model, n_heads) for _ in range(n_layers)))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, idx: Tensor) -> Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.head(self.ln(self.blocks(self.tok(idx) + self.pos(pos))))


def windows(data: Tensor, starts: Tensor, seq_len: int) -> Batch:
    """Input/target pairs of length seq_len starting at the given offsets."""
    offsets = starts[:, None] + torch.arange(seq_len + 1)
    chunk = data[offsets]
    return chunk[:, :-1], chunk[:, 1:]


def build_task(
    d_model: int = 128,
    layers: int = 2,
    heads: int = 4,
    seq_len: int = 64,
    batch: int = 16,
    val_batches: int = 8,
) -> Task:
    """The character-LM task: random training windows, fixed evenly spaced validation windows."""
    train_text, val_text = load_corpus()
    vocab = sorted(set(train_text + val_text))
    index = {c: i for i, c in enumerate(vocab)}
    train_data = torch.tensor([index[c] for c in train_text])
    val_data = torch.tensor([index[c] for c in val_text])
    n_val = val_batches * batch
    val_starts = torch.linspace(0, len(val_data) - seq_len - 2, n_val).long()
    eval_batches = [
        windows(val_data, val_starts[i : i + batch], seq_len) for i in range(0, n_val, batch)
    ]

    def batches(seed: int) -> Iterator[Batch]:
        gen = torch.Generator().manual_seed(seed)
        while True:
            starts = torch.randint(len(train_data) - seq_len - 1, (batch,), generator=gen)
            yield windows(train_data, starts, seq_len)

    def build_model() -> nn.Module:
        return CharTransformer(len(vocab), d_model, layers, heads, seq_len)

    return Task("charlm", build_model, batches, eval_batches)


def corpus_summary() -> str:
    """Size, vocabulary and checksum of the corpus, to confirm it matches across machines."""
    train_text, val_text = load_corpus()
    digest = hashlib.sha256((train_text + val_text).encode()).hexdigest()[:12]
    vocab = len(set(train_text + val_text))
    sizes = f"{len(train_text)} train / {len(val_text)} val chars"
    source = f"{len(CORPUS_FILES)} stdlib files of Python {platform.python_version()}"
    return f"corpus: {source}, {sizes}, vocab {vocab}, sha256 {digest}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = comparison_parser(
        __doc__,
        steps=DEFAULT_STEPS,
        lrs=DEFAULT_LRS,
        ngplus_damping=NGPLUS_DAMPING,
        out="outputs/charlm.png",
    )
    parser.add_argument("--d-model", type=int, default=128, help="embedding width")
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks")
    parser.add_argument("--heads", type=int, default=4, help="attention heads")
    parser.add_argument("--seq-len", type=int, default=64, help="context length in characters")
    parser.add_argument("--batch", type=int, default=16, help="sequences per step")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[RunResult]:
    """Compare optimizers on the character LM; returns the per-method results."""
    args = parse_args(argv)
    task = build_task(args.d_model, args.layers, args.heads, args.seq_len, args.batch)
    print(corpus_summary())
    title = (
        f"char-LM on stdlib source: d_model={args.d_model}, layers={args.layers}, "
        f"seq_len={args.seq_len}, batch={args.batch}, seed={args.seed}"
    )
    return run_comparison(args, task, METHODS, show_accuracy=False, title=title)


if __name__ == "__main__":
    main()
