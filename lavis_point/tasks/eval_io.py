"""What the understanding tasks share around evaluation: gathering per-rank results (every sample
once) and writing ``metrics.json`` in the run folder, as the captioning task does."""
import json
import os

import torch.distributed as dist
from lavis.common.dist_utils import get_world_size, is_dist_avail_and_initialized
from lavis.common.registry import registry


def all_gather_objects(obj):
    """[rank 0's obj, rank 1's obj, ...] on every rank; [obj] in a single process."""
    if not is_dist_avail_and_initialized():
        return [obj]
    gathered = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def first_per_key(rows, key):
    """Rows with the first occurrence of each ``row[key]``: a DistributedSampler pads the last batch
    of some ranks with repeated samples, which must be counted once."""
    seen, out = set(), []
    for row in rows:
        if row[key] not in seen:
            seen.add(row[key])
            out.append(row)
    return out


def write_metrics(split_name, metrics):
    """Merge ``{split_name: metrics}`` into the run folder's metrics.json (main process only)."""
    path = os.path.join(registry.get_path("output_dir"), "metrics.json")
    everything = {}
    if os.path.isfile(path):
        with open(path) as f:
            everything = json.load(f)
    everything[split_name] = metrics
    with open(path, "w") as f:
        json.dump(everything, f, indent=2)
    return path
