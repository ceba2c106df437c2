"""Bad samples at training time: one unreadable cloud or empty caption must not end a week-long run.

A dataset's ``__getitem__`` goes through ``load_or_skip``. When loading item i fails with a data error
(a bad or missing file, a missing shard, NaN points, an empty caption...), the failure is logged with
the sample and the reason, and
- in training another item takes its place, chosen from (i, attempt) so reruns agree and no random
  stream moves: batches keep their size, which DDP and the gathered contrastive loss need (every
  rank contributes the same number of rows, so no rank ever waits on a smaller or empty batch);
- in evaluation the item is dropped: metrics must not count a cloud twice.
Every item carries the failures it met under ``"skipped"``. ``collate_counting_skips`` drops the
dropped items, collates the rest and puts all failures of the batch in ``batch["skipped"]``; the
task's loops pop it, count, and report the total (summed over ranks) at the end of the epoch.
"""
import errno
import logging

import numpy as np
from torch.utils.data.dataloader import default_collate

log = logging.getLogger(__name__)

# What bad data raises (CloudReadError and PointCloudError are ValueErrors). Anything else, a
# TypeError say, is a bug in our code and stops the run.
BAD_SAMPLE_ERRORS = (ValueError, OSError, KeyError, IndexError, EOFError)
# This many failures in a row means the data set is broken (a missing mount, say), not one sample.
MAX_ATTEMPTS = 20


def load_or_skip(load, i, num_items, is_train, describe):
    """``load(i)`` with ``"skipped": [failures]`` added; on a data error, a substitute (training) or
    an item holding only its failures (evaluation). ``describe(i)`` names item i in messages."""
    failures = []
    for attempt in range(MAX_ATTEMPTS):
        try:
            item = load(i)
        except BAD_SAMPLE_ERRORS as e:
            if isinstance(e, OSError) and e.errno in (errno.EMFILE, errno.ENFILE):
                raise  # the process ran out of files, not the sample: skipping would drop every later cloud
            failures.append(f"{describe(i)}: {e}")
            log.warning("bad sample %s", failures[-1])
            if not is_train:
                return {"skipped": failures}
            i = int(np.random.default_rng([i, attempt]).integers(num_items))
            continue
        item["skipped"] = failures
        return item
    raise RuntimeError(f"{MAX_ATTEMPTS} bad samples in a row: the data set, not one sample, is broken. "
                       f"First ones: {failures[:3]}")


def collate_counting_skips(samples, collate=default_collate):
    """Items -> one batch with ``batch["skipped"]``: the failures met while loading it (a list of
    strings). Items that hold only failures are dropped; a batch of only those is ``{"skipped": ...}``."""
    failures = [f for s in samples for f in s.pop("skipped", ())]
    kept = [s for s in samples if s]
    batch = collate(kept) if kept else {}
    batch["skipped"] = failures
    return batch
