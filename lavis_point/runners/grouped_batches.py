"""Training batches made of a few groups of alike items (``run.batch_group_by``).

A contrastive loss learns only what tells a batch's items apart. On the embedded set, a random batch
of 32 is told apart mostly by colour and size (8 x 3 values), so the point features learn those first
and shape (the hardest attribute for a random encoder) only slowly: after 100 stage-1 steps zero-shot
shape was at chance (0.125). Batches built from 4 groups that share colour and size, 8 items each,
leave shape as what separates most pairs: 0.44 after the same 100 steps (the README has the runs;
the embedded stage 1 now takes batches of 16 as 2 such groups of 8).
The grouping fields are annotation fields named in the YAML; nothing here knows about shapes.
Within such a group, clouds differ only in shape (and pose), so no batch asks the losses to tell
sizes apart. ``batch_group_by`` may therefore list several groupings, e.g. ``[[color, size],
[color]]``: each epoch's items are dealt at random into equal shares, one per grouping, and the
chunks of all shares are shuffled together, so batches hold both kinds of hard negatives.

Every item is used at most once per epoch: each group is shuffled and cut into chunks of
``batch_size / groups_per_batch`` items, remainders are pooled and cut the same way, and the chunks
are shuffled and joined into batches. Under torchrun every rank builds the same batches from
(seed, epoch), as DistributedSampler does, and takes every world-size-th one; in one process the
order comes from torch's random state, as a shuffling DataLoader's does, so a resumed run (which
restores that state) continues with the same batches.
"""
import logging

import numpy as np
import torch
from torch.utils.data import Sampler


class GroupedBatchSampler(Sampler):
    """``group_ids``: one hashable id per item, or a list of such lists, one per grouping: then each
    epoch's items are dealt at random into as many equal shares, each share is grouped by its own
    grouping, and the chunks of all shares are shuffled together."""

    def __init__(self, group_ids, batch_size, groups_per_batch, num_replicas=1, rank=0, seed=None, epoch=0):
        if groups_per_batch < 1 or batch_size % groups_per_batch:
            raise ValueError(f"run.batch_groups_per_batch ({groups_per_batch}) must divide the batch size "
                             f"({batch_size})")
        self.batch_size, self.groups_per_batch = batch_size, groups_per_batch
        self.chunk = batch_size // groups_per_batch
        self.num_replicas, self.rank, self.seed, self.epoch = num_replicas, rank, seed, epoch
        groupings = group_ids if group_ids and isinstance(group_ids[0], list) else [group_ids]
        if len({len(ids) for ids in groupings}) != 1:
            raise ValueError(f"every grouping needs one id per item: got {[len(ids) for ids in groupings]}")
        self.codes = []  # per grouping: (items,) int codes, equal codes = one group
        for ids in groupings:
            codes = {}
            self.codes.append(np.array([codes.setdefault(g, len(codes)) for g in ids], dtype=np.int64))
        # Whole chunks of each group plus the pooled remainders cut into chunks: floor(items / chunk)
        # chunks, however the groups fall.
        self.num_batches = len(self.codes[0]) // self.chunk // groups_per_batch // num_replicas

    def __len__(self):
        return self.num_batches

    def set_epoch(self, epoch):
        self.epoch = epoch

    def _rng(self):
        if self.num_replicas > 1:  # every rank must build the same batches
            return np.random.default_rng([int(self.seed or 0), self.epoch])
        return np.random.default_rng(int(torch.randint(2 ** 62, ()).item()))

    def __iter__(self):
        rng = self._rng()
        self.epoch += 1  # LAVIS's IterLoader sets the epoch only on a DataLoader's plain sampler
        chunks, pool = [], []
        for codes, share in zip(self.codes, np.array_split(rng.permutation(len(self.codes[0])), len(self.codes))):
            share = share[np.argsort(codes[share], kind="stable")]  # groups contiguous, each in random order
            starts = np.flatnonzero(np.diff(codes[share], prepend=-1))
            for group in np.split(share, starts[1:]):
                cut = len(group) // self.chunk * self.chunk
                chunks += np.split(group[:cut], cut // self.chunk) if cut else []
                pool += group[cut:].tolist()
        pool = rng.permutation(np.array(pool, dtype=np.int64))
        cut = len(pool) // self.chunk * self.chunk
        chunks += np.split(pool[:cut], cut // self.chunk) if cut else []
        order = rng.permutation(len(chunks))
        per = self.groups_per_batch
        batches = [np.concatenate([chunks[j] for j in order[b * per:(b + 1) * per]])
                   for b in range(self.num_batches * self.num_replicas)]
        for batch in batches[self.rank::self.num_replicas]:
            yield batch.tolist()


def group_ids_of(dataset, fields):
    """One hashable group id per item of a training set (LAVIS's ConcatDataset or one dataset), from
    its annotations' ``fields``; a member without annotations, or an item without the fields, is one
    group of its own member. So is every item of a member whose annotations are not its items (as
    many annotations as items, item i described by annotation i): a QA set holds one annotation per
    cloud and asks ``num_items`` questions; which annotation an item uses is the dataset's business,
    and a grouping that guessed would be wrong or run past the end. That member's batches are then
    plain chunks of it, with a warning naming it, rather than an error that bars the mixed stage."""
    members = getattr(dataset, "datasets", [dataset])
    ids, found = [], False
    for m, member in enumerate(members):
        annotations = getattr(member, "annotations", None) or getattr(member, "annotation", None)
        if annotations is not None and len(annotations) != len(member):
            logging.warning("run.batch_group_by: member %d (%s) has %d annotations for %d items: its items "
                            "are not grouped by %s (one group of their own)", m, type(member).__name__,
                            len(annotations), len(member), list(fields))
            annotations = None
        if annotations is None:
            ids += [(m, None)] * len(member)
            continue
        for ann in annotations:
            key = tuple(ann.get(f) for f in fields) if isinstance(ann, dict) else None
            found |= key is not None and None not in key
            ids.append((m, key if key is not None and None not in key else None))
    if not found:
        raise ValueError(f"run.batch_group_by: no training annotation has the fields {list(fields)}")
    return ids
