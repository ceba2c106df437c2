"""Dataset builders registered in LAVIS's registry."""
import os
import re

import numpy as np
import torch.distributed as dist
from lavis.common.dist_utils import is_dist_avail_and_initialized, is_main_process
from lavis.common.registry import registry
from lavis.datasets.builders.base_dataset_builder import BaseDatasetBuilder

from lavis_point.data_io.shards import ShardedClouds
from lavis_point.datasets import shapes
from lavis_point.datasets.packed import PackedEntries
from lavis_point.datasets.point_caption import PointCaptionDataset, read_jsonl
from lavis_point.paths import config_path


def caption_dataset(builder, points, annotations, split, source, vocabularies=None):
    """One split of a caption builder, with the dataset options every caption builder honours:
    ``prompt`` (items carry it, for stage 2 mixing captions with QA) and ``match_by`` (annotation fields
    that make items alike, ``PointCaptionDataset.set_match_by``). ``source`` names the annotations.
    The dataset holds them packed (``PackedEntries``): DataLoader workers then share them instead of
    each copying a dict per entry."""
    is_train = split == "train"
    kind = "train" if is_train else "eval"
    dataset = PointCaptionDataset(points, PackedEntries(annotations), builder.vis_processors[kind],
                                  builder.text_processors[kind], is_train)
    dataset.vocabularies, dataset.prompt = vocabularies, builder.config.get("prompt")
    if builder.config.get("match_by"):
        dataset.set_match_by(list(builder.config.match_by), source)
    return dataset


def read_index(path, sharded):
    """A shard index's entries, one per cloud, checked as they are read (errors name the file and the
    line): each needs ``id``, ``index`` (the cloud's row) and ``caption`` or ``captions``, and with
    numbered shards (``sharded``) ``shard``. Ids become strings (ints would reach the batch as a tensor);
    a lone ``captions`` string is one caption. Rows with one id and one cloud (LAVIS's one row per
    caption) become one entry with all their captions, in file order; one id for two clouds is an error."""
    entries, seen = {}, {}  # id -> entry; id -> (line, cloud)
    for line, row in read_jsonl(path, line_numbers=True):
        where = f"{path}:{line}: index entry"
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        required = ["id", "index"] + (["shard"] if sharded else [])
        missing = [k for k in required if row.get(k) in (None, "")]
        if missing:
            raise ValueError(f"{where}: no '{missing[0]}'" + (" (the numbered shard file holding the cloud)"
                                                                if missing[0] == "shard" else ""))
        index = row["index"]
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(f"{where}: 'index' must be the cloud's row (an integer >= 0), got {index!r}")
        if sharded and not isinstance(row["shard"], str):
            raise ValueError(f"{where}: 'shard' must be a file name, got {row['shard']!r}")
        captions = row.get("captions") or ([row["caption"]] if "caption" in row else None)
        if captions is None:
            raise ValueError(f"{where}: no caption ('caption', or a non-empty 'captions')")
        captions = list(captions) if isinstance(captions, list) else [captions]  # one string: one caption
        uid, cloud = str(row["id"]), (row["shard"] if sharded else None, index)
        if uid not in entries:
            entries[uid], seen[uid] = {**{k: v for k, v in row.items() if k != "caption"}, "id": uid,
                                       "captions": captions}, (line, cloud)
        elif seen[uid][1] == cloud:
            entries[uid]["captions"] += captions
        else:
            first, other = seen[uid]
            raise ValueError(f"{path}: id {uid!r} on lines {first} and {line} names two different clouds "
                             f"({describe_cloud(other)} and {describe_cloud(cloud)}); an id must name one cloud")
    return list(entries.values())


def describe_cloud(cloud):
    shard, index = cloud
    return f"{shard}[{index}]" if shard else f"row {index}"


def shard_datasets(builder, folder, splits, vocabularies=None):
    """Datasets over a folder of shards: ``{split}.jsonl`` (one entry per cloud: id, where its row is,
    caption or captions; ``read_index``) and either ``{split}_points.npy`` ((n, P, 6), memory-mapped) or
    the numbered shards scripts/convert_points.py writes (data_io/shards.py)."""
    datasets = {}
    for split in splits:
        points_path = os.path.join(folder, f"{split}_points.npy")
        index_path = os.path.join(folder, f"{split}.jsonl")
        sharded = not os.path.isfile(points_path)
        if not sharded:
            points = np.load(points_path, mmap_mode="r", allow_pickle=False)
        elif os.path.isfile(index_path):
            points = ShardedClouds(folder, split)
        elif os.path.isdir(folder) and any(re.fullmatch(re.escape(split) + r"_points_\d{5}\.json", n)
                                           for n in os.listdir(folder)):
            # chunk records (data_io/shards.py shard_name) without an index: an interrupted conversion
            raise FileNotFoundError(f"{index_path}: missing: the conversion of split '{split}' into {folder} did "
                                    "not finish; rerun scripts/convert_points.py with the same arguments (it "
                                    "resumes)")
        else:
            raise FileNotFoundError(f"{points_path}: no point shard for split '{split}' (nor an index "
                                    f"{split}.jsonl of numbered shards)")
        datasets[split] = caption_dataset(builder, points, read_index(index_path, sharded), split, index_path,
                                          vocabularies)
    return datasets


@registry.register_builder("point_caption_shards")
class PointCaptionShardsBuilder(BaseDatasetBuilder):
    """Any point-caption set already in our shard format (``build_info.storage``: the folder,
    ``build_info.splits``: which splits to read). Real data (Cap3D, Objaverse) lands here."""

    train_dataset_cls = eval_dataset_cls = PointCaptionDataset
    DATASET_CONFIG_DICT = {"default": config_path("datasets/point_caption_shards/defaults.yaml")}

    def build_datasets(self):
        info = self.config.build_info
        folder = os.path.expandvars(os.path.expanduser(str(info.storage)))
        self.build_processors()
        return shard_datasets(self, folder, list(info.splits))


@registry.register_builder("shapes_point_caption")
class ShapesPointCaptionBuilder(BaseDatasetBuilder):
    """The embedded default: procedural coloured shapes with templated captions, generated by our
    code on first use into the cache (``build_info.root``, else $LAVIS_POINT_CACHE, else
    ~/.cache/lavis_point). The test split holds shape x colour pairs never seen in training.
    ``build_info.sizes`` says what is generated, ``build_info.splits`` (default: every size) what is read."""

    train_dataset_cls = eval_dataset_cls = PointCaptionDataset
    DATASET_CONFIG_DICT = {"default": config_path("datasets/shapes/defaults.yaml")}

    def build_datasets(self):
        info = self.config.build_info
        params = {"seed": info.get("seed", 0), "num_points": info.get("num_points", 8192),
                  "sizes": dict(info.sizes), "num_refs": info.get("num_refs", 5)}
        splits = list(info.get("splits") or params["sizes"])  # as the sibling builders; default: every size
        missing = [s for s in splits if s not in params["sizes"]]
        if missing:
            raise ValueError(f"datasets.shapes_point_caption.build_info.splits names '{missing[0]}', which "
                             f"build_info.sizes {params['sizes']} lacks")
        if is_main_process():  # one process writes the cache; the others wait, then read it
            shapes.ensure_embedded_dataset(info.get("root"), **params)
        if is_dist_avail_and_initialized():
            dist.barrier()
        folder = shapes.ensure_embedded_dataset(info.get("root"), **params)
        self.build_processors()
        vocabularies = {"shape": list(shapes.SHAPES), "color": list(shapes.COLORS), "size": list(shapes.SIZES)}
        return shard_datasets(self, folder, splits, vocabularies)
