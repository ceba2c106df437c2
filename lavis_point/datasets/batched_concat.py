"""Batched reads through LAVIS's ConcatDataset.

LAVIS wraps every training set in its ConcatDataset (one or many), which has no ``__getitems__``, so
torch's DataLoader would fetch item by item and a dataset's batched read (``PointCaptionDataset``:
one processor kernel call reads the batch's shard rows into one batch tensor) would never run in
training. ``with_batched_reads`` gives the wrapper one: each member dataset gets its share of the
batch in one call, and the items come back in the batch's order.
"""
import bisect

from lavis.datasets.datasets.base_dataset import ConcatDataset


class BatchedConcatDataset(ConcatDataset):
    def __getitems__(self, indices):
        shares = {}  # member dataset -> [(position in the batch, index in the member)]
        for k, i in enumerate(indices):
            member = bisect.bisect_right(self.cumulative_sizes, i)
            shares.setdefault(member, []).append((k, i - (self.cumulative_sizes[member - 1] if member else 0)))
        items = [None] * len(indices)
        for member, share in shares.items():
            dataset, local = self.datasets[member], [j for _, j in share]
            fetched = dataset.__getitems__(local) if hasattr(dataset, "__getitems__") else [dataset[j] for j in local]
            for (k, _), item in zip(share, fetched):
                items[k] = item
        return items


def with_batched_reads(dataset):
    """LAVIS's ConcatDataset made a ``BatchedConcatDataset`` over the same members; anything else as is."""
    return BatchedConcatDataset(dataset.datasets) if type(dataset) is ConcatDataset else dataset
