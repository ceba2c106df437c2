"""Builders for the understanding tasks: zero-shot classification sets (ModelNet40, Objaverse-LVIS,
the embedded shapes) and point QA sets (a QA JSON, the embedded shapes). Retrieval reads any
point-caption builder (``shapes_point_caption``, ``point_caption_shards``, ...)."""
import os

import numpy as np
import torch.distributed as dist
from lavis.common.dist_utils import is_dist_avail_and_initialized, is_main_process
from lavis.common.registry import registry
from lavis.datasets.builders.base_dataset_builder import BaseDatasetBuilder

from lavis_point.datasets import shapes
from lavis_point.datasets.classification import (
    ArrayRows,
    PointClassificationDataset,
    modelnet40_folder,
    modelnet40_h5,
    objaverse_lvis,
)
from lavis_point.datasets.point_caption import read_jsonl
from lavis_point.datasets.qa import CloudFiles, PointQADataset, ShapesQADataset, read_qa_annotations
from lavis_point.paths import config_path


def expand(path):
    return os.path.expandvars(os.path.expanduser(str(path)))


def embedded_split(info, split):
    """(memory-mapped clouds, annotations) of one split of the embedded shapes, generated on first use
    with the same parameters as ``shapes_point_caption`` (so both read one cache)."""
    params = {"seed": info.get("seed", 0), "num_points": info.get("num_points", 8192),
              "sizes": dict(info.sizes), "num_refs": info.get("num_refs", 5)}
    if split not in params["sizes"]:
        raise ValueError(f"build_info.splits names '{split}', which build_info.sizes {params['sizes']} lacks")
    if is_main_process():  # one process writes the cache; the others wait, then read it
        shapes.ensure_embedded_dataset(info.get("root"), **params)
    if is_dist_avail_and_initialized():
        dist.barrier()
    folder = shapes.ensure_embedded_dataset(info.get("root"), **params)
    points = np.load(os.path.join(folder, f"{split}_points.npy"), mmap_mode="r", allow_pickle=False)
    return points, read_jsonl(os.path.join(folder, f"{split}.jsonl"))


class SplitBuilder(BaseDatasetBuilder):
    """Builds ``build_info.splits`` with ``make(split, is_train)``."""

    def build_datasets(self):
        self.build_processors()
        return {split: self.make(split, split == "train") for split in self.config.build_info.splits}

    def processors(self, is_train):
        key = "train" if is_train else "eval"
        return self.vis_processors[key], self.text_processors[key]


@registry.register_builder("modelnet40")
class ModelNet40Builder(SplitBuilder):
    """ModelNet40 (``type: h5`` for the ply_data_*.h5 files, ``type: folder`` for per-object clouds)
    in ``build_info.storage``."""

    train_dataset_cls = eval_dataset_cls = PointClassificationDataset
    DATASET_CONFIG_DICT = {"h5": config_path("datasets/modelnet40/h5.yaml"),
                           "folder": config_path("datasets/modelnet40/folder.yaml")}

    def make(self, split, is_train):
        info = self.config.build_info
        readers = {"h5": modelnet40_h5, "folder": modelnet40_folder}
        if info.format not in readers:
            raise ValueError(f"datasets.modelnet40.build_info.format: expected 'h5' or 'folder', got {info.format!r}")
        clouds, labels, ids, classnames = readers[info.format](expand(info.storage), split)
        return PointClassificationDataset(clouds, labels, ids, classnames, self.processors(is_train)[0])


@registry.register_builder("objaverse_lvis")
class ObjaverseLVISBuilder(SplitBuilder):
    """Objaverse-LVIS: ``build_info.annotations`` (object id -> category JSON) over the clouds in
    ``build_info.points_dir`` named by ``build_info.path_template``."""

    train_dataset_cls = eval_dataset_cls = PointClassificationDataset
    DATASET_CONFIG_DICT = {"default": config_path("datasets/objaverse_lvis/defaults.yaml")}

    def make(self, split, is_train):
        info = self.config.build_info
        clouds, labels, ids, classnames, skipped = objaverse_lvis(
            expand(info.annotations), expand(info.points_dir), info.get("path_template", "{uid}.npy"))
        dataset = PointClassificationDataset(clouds, labels, ids, classnames, self.processors(is_train)[0])
        dataset.num_skipped = skipped
        return dataset


@registry.register_builder("shapes_point_classification")
class ShapesPointClassificationBuilder(SplitBuilder):
    """The embedded shapes as a classification set: the class is ``build_info.attribute`` (shape
    family by default; color and size work too)."""

    train_dataset_cls = eval_dataset_cls = PointClassificationDataset
    DATASET_CONFIG_DICT = {"default": config_path("datasets/shapes_classification/defaults.yaml")}
    VOCABULARIES = {"shape": list(shapes.SHAPES), "color": list(shapes.COLORS), "size": list(shapes.SIZES)}

    def make(self, split, is_train):
        info = self.config.build_info
        attribute = info.get("attribute", "shape")
        if attribute not in self.VOCABULARIES:
            raise ValueError(f"build_info.attribute: expected one of {sorted(self.VOCABULARIES)}, got {attribute!r}")
        points, annotations = embedded_split(info, split)
        classnames = self.VOCABULARIES[attribute]
        return PointClassificationDataset(
            ArrayRows(points, [a["index"] for a in annotations]),
            [classnames.index(a[attribute]) for a in annotations], [a["id"] for a in annotations],
            classnames, self.processors(is_train)[0])


@registry.register_builder("shapes_point_qa")
class ShapesPointQABuilder(SplitBuilder):
    """The embedded shapes with questions about ``build_info.question_types`` (color, shape, size).
    Its train split can be mixed into stage 2 beside ``shapes_point_caption`` (see
    projects/embedded/stage2.yaml); ``build_info.num_train_items`` sets how many QA items an epoch has."""

    train_dataset_cls = eval_dataset_cls = PointQADataset
    DATASET_CONFIG_DICT = {"default": config_path("datasets/shapes_qa/defaults.yaml")}

    def make(self, split, is_train):
        info = self.config.build_info
        points, annotations = embedded_split(info, split)
        return ShapesQADataset(points, annotations, *self.processors(is_train), is_train,
                               list(info.get("question_types", ["color", "shape", "size"])),
                               prompt=self.config.get("prompt", "Question: {} Answer: "),
                               num_items=info.get("num_train_items"), seed=info.get("seed", 0))


@registry.register_builder("point_qa")
class PointQABuilder(SplitBuilder):
    """Any point QA set: ``build_info.annotations.<split>`` (a QA JSON or JSON Lines file); cloud
    paths in it are relative to ``build_info.points_root`` (default: the annotation file's folder)."""

    train_dataset_cls = eval_dataset_cls = PointQADataset
    DATASET_CONFIG_DICT = {"default": config_path("datasets/point_qa/defaults.yaml")}

    def make(self, split, is_train):
        info = self.config.build_info
        if split not in info.annotations:
            raise ValueError(f"datasets.point_qa.build_info.annotations has no file for split '{split}'")
        path = expand(info.annotations[split])
        root = expand(info.points_root) if info.get("points_root") else os.path.dirname(path)
        return PointQADataset(CloudFiles(), read_qa_annotations(path, root), *self.processors(is_train), is_train,
                              prompt=self.config.get("prompt", "Question: {} Answer: "))
