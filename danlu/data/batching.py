"""Batching tokenized texts: length buckets, padding to the longest in the batch, resumable order.

Short reviews padded to a fixed 128 waste most of the compute, so training batches are drawn
from pools of similar length. The order of an epoch is a pure function of (seed, epoch), so a
resumed run skips the batches it already saw and continues on exactly the same sequence.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class TextDataset:
    ids: list  # int32 arrays, one per example
    targets: np.ndarray | None  # int64 class ids or float32 values; None when unlabelled
    pad_id: int = 0

    def __len__(self):
        return len(self.ids)

    @property
    def lengths(self):
        return np.fromiter((len(x) for x in self.ids), dtype=np.int64, count=len(self.ids))


def batch_order(lengths, batch_size, seed=0, epoch=0, shuffle=True, bucket=True, pool_batches=50):
    """Lists of example indices, one list a batch, for one epoch.

    With `bucket`, examples are shuffled, cut into pools of `pool_batches` batches, sorted by
    length inside each pool, and the resulting batches shuffled again (as in torchtext's
    BucketIterator). Without `shuffle` (evaluation), examples are sorted by length outright.
    """
    n = len(lengths)
    if not shuffle:
        order = np.argsort(lengths, kind="stable") if bucket else np.arange(n)
        return [order[i : i + batch_size] for i in range(0, n, batch_size)]
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n)
    if bucket:
        pool = batch_size * pool_batches
        order = np.concatenate([
            chunk[np.argsort(lengths[chunk], kind="stable")] for chunk in np.array_split(order, max(1, -(-n // pool)))
        ])
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    if bucket:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def collate(dataset, index, pad_id, regression=False):
    """Pad the examples at `index` to the longest of them -> dict of tensors."""
    seqs = [dataset.ids[i] for i in index]
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    width = max(1, int(lengths.max()))
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = s
    batch = {
        "input_ids": torch.from_numpy(ids),  # (B, T)
        "attention_mask": torch.from_numpy(np.arange(width)[None, :] < lengths[:, None]),  # (B, T) True = real
        "index": torch.as_tensor(np.asarray(index, dtype=np.int64)),
    }
    if dataset.targets is not None:
        t = dataset.targets[index]
        batch["labels"] = torch.from_numpy(t.astype(np.float32 if regression else np.int64))
    return batch


def iterate(dataset, batch_size, pad_id, *, seed=0, epoch=0, shuffle=True, bucket=True, skip=0, regression=False):
    """Yield padded batches of one epoch, skipping the first `skip` (for resume)."""
    for index in batch_order(dataset.lengths, batch_size, seed, epoch, shuffle, bucket)[skip:]:
        yield collate(dataset, index, pad_id, regression)


def num_batches(dataset, batch_size):
    return -(-len(dataset) // batch_size)
