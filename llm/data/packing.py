"""Packing variable-length examples into full rows: best-fit-decreasing bins, document ids per row.

`best_fit_decreasing(lengths, capacity)` puts items into as few bins of ``capacity`` tokens as it can: longest item
first (ties: the earlier item), each into the bin it fills best (least space left; ties: the bin opened first), a new
bin when none has room. Deterministic and seed-free: the rows depend only on the examples and their order, so every
rank, every world size and every resumed run packs the same rows (the sampler then shuffles rows, seeded, as it
shuffles examples unpacked). BFD is within 11/9 of the optimal number of bins (plus a constant) and wastes a few
percent of the tokens on realistic length mixes.

`PackedExamples` is the data set of packed rows: each item is (input_ids, labels, document_ids), the row's
examples concatenated, document ids 0, 1, ... per example. `PackCollate` right-pads a batch of rows to the full row
length: pad labels are ignored and the pads form one more document of their own, so no real token attends to them
and none of them attends to a real token (`DecoderModel(..., document_ids=...)`, `llm.models.masks`). Labels are each
example's own (next-token targets inside the example, the last input's target its own last token), so packing
changes no target: with the document mask every example's loss and gradients are the ones it gets alone.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["PackCollate", "PackedExamples", "best_fit_decreasing"]


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of item indices (each bin's items in packing order) whose lengths sum to at most ``capacity``."""
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    too_long = [i for i, n in enumerate(lengths) if n > capacity or n < 1]
    if too_long:
        i = too_long[0]
        raise ValueError(f"item {i} has length {lengths[i]}, outside 1..{capacity}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    spaces: list[int] = []  # sorted distinct free spaces that some open bin has
    by_space: dict[int, list[int]] = {}  # free space -> heap of bin numbers with exactly that space
    for item in order:
        n = lengths[item]
        at = bisect.bisect_left(spaces, n)
        if at == len(spaces):  # no open bin has room: open one
            number, space = len(bins), capacity
            bins.append([])
        else:
            space = spaces[at]
            number = heapq.heappop(by_space[space])
            if not by_space[space]:
                del by_space[space]
                spaces.pop(at)
        bins[number].append(item)
        left = space - n
        if left:
            if left not in by_space:
                by_space[left] = []
                bisect.insort(spaces, left)
            heapq.heappush(by_space[left], number)
    return bins


class PackedExamples(Dataset):
    """Examples (input_ids, labels) packed into rows of at most ``capacity`` tokens; items are
    (input_ids, labels, document_ids), 1-D int64 of the row's length."""

    def __init__(self, examples: Sequence[tuple[np.ndarray, np.ndarray]], capacity: int) -> None:
        self.capacity = capacity
        self.bins = best_fit_decreasing([len(ids) for ids, _ in examples], capacity)
        self.rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        for members in self.bins:
            ids = np.concatenate([examples[i][0] for i in members])
            labels = np.concatenate([examples[i][1] for i in members])
            docs = np.repeat(np.arange(len(members), dtype=np.int64), [len(examples[i][0]) for i in members])
            self.rows.append((ids, labels, docs))
        self.num_examples = len(examples)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.rows[index]

    def fill(self) -> float:
        """Share of the rows' ``capacity`` tokens that hold an example (1.0: no padding at all)."""
        return sum(len(ids) for ids, _, _ in self.rows) / max(1, len(self.rows) * self.capacity)


class PackCollate:
    """Right-pads packed rows to ``length`` (None: the batch's longest): (input_ids, labels, document_ids), each
    (B, T) int64. The data module pads to the full ``seq_len``: one shape for every batch, which a compiled model
    and FlexAttention's kernels (compiled per shape) want."""

    def __init__(self, pad_id: int, ignore_index: int, length: int | None = None) -> None:
        self.pad_id, self.ignore_index, self.length = pad_id, ignore_index, length

    def __call__(self, rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, ...]:
        length = max(len(ids) for ids, _, _ in rows)
        if self.length is not None:
            if length > self.length:
                raise ValueError(f"a packed row of {length} tokens is longer than {self.length}")
            length = self.length
        input_ids = np.full((len(rows), length), self.pad_id, dtype=np.int64)  # (B, T)
        labels = np.full((len(rows), length), self.ignore_index, dtype=np.int64)  # (B, T)
        document_ids = np.empty((len(rows), length), dtype=np.int64)  # (B, T)
        for r, (ids, lab, docs) in enumerate(rows):
            n = len(ids)
            input_ids[r, :n], labels[r, :n], document_ids[r, :n] = ids, lab, docs
            document_ids[r, n:] = docs[-1] + 1 if n else 0  # the padding: a document of its own
        return torch.from_numpy(input_ids), torch.from_numpy(labels), torch.from_numpy(document_ids)
