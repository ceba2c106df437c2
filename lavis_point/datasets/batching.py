"""Batches built whole: a dataset's ``__getitems__`` processes a batch's clouds straight into one
(B, P, 6) tensor and hands out its rows as the items' "point" (views, no copy); ``collate`` gives
that tensor back instead of stacking the rows into a new one. Items stay plain dicts, so LAVIS's
ConcatDataset collater (which rebuilds each item with the keys all share) and bad-sample
substitutes (rows of other tensors, stacked as before) work unchanged.
"""
import math
from collections.abc import Mapping

import torch
from torch.utils.data import Dataset, get_worker_info
from torch.utils.data.dataloader import default_collate


class PerItem(Dataset):
    """A dataset with ``__getitems__`` hidden: a DataLoader then fetches item by item (how training
    read before batched reads; tests and scripts/bench_data.py compare the two)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[i]


def batch_tensor(shape) -> torch.Tensor:
    """An uninitialised float32 tensor for a whole batch. In a DataLoader worker it is allocated in
    shared memory, as default_collate allocates the batches it stacks there, so that passing the
    batch to the main process copies nothing."""
    if get_worker_info() is None:
        return torch.empty(shape)
    return torch.empty(0).set_(torch.UntypedStorage._new_shared(4 * math.prod(shape)), 0, tuple(shape))


def whole_of(rows):
    """The tensor whose rows ``rows`` are, all of them in order and nothing else (so returning it
    equals stacking them), or None. Decided from storage and addresses: no data is read. A row whose
    data starts where row k of ``rows[0]``'s storage starts lies in that storage, since the storage
    holds exactly len(rows) rows."""
    first = rows[0]
    if not isinstance(first, torch.Tensor) or not first.is_contiguous():
        return None
    storage, numel = first.untyped_storage(), first.numel()
    nbytes = numel * first.element_size()
    if storage.nbytes() != nbytes * len(rows) or first.storage_offset() != 0:
        return None
    base, dtype, shape = storage.data_ptr(), first.dtype, first.shape
    for k, row in enumerate(rows):
        if not (isinstance(row, torch.Tensor) and row.data_ptr() == base + k * nbytes and row.dtype == dtype
                and row.shape == shape and row.is_contiguous()):
            return None
    return first.as_strided((len(rows),) + tuple(shape), (numel,) + first.stride(), 0)


def collate(samples):
    """default_collate for a list of dict items, except that a key whose values are the rows of one
    tensor (a batch ``__getitems__`` made) gets that tensor back instead of a stacked copy, and a key
    with a None among its values (a prompt: "the model's") stays a list."""
    if not isinstance(samples[0], Mapping):
        return default_collate(samples)
    batch = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        whole = whole_of(values)
        batch[key] = whole if whole is not None else values if any(v is None for v in values) else default_collate(values)
    return batch
