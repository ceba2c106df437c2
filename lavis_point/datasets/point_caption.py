"""Map-style point-text datasets over clouds and their annotations. ``points`` is an (n, P, 6) array
(a memory-mapped shard; entries' ``index`` picks the row) or a reader looked up by the whole entry
(``ShardedClouds`` over many shards, ``CloudFiles`` over one file per cloud)."""
import json

import numpy as np
from torch.utils.data import Dataset
from torch.utils.data.dataloader import default_collate


def read_jsonl(path):
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_no}: malformed JSON line: {e}") from e
    return rows


class PointCaptionDataset(Dataset):
    """Items: {"point": (P', 6) tensor, "text_input": caption, "instance_id": id}.

    Training draws one of an entry's ``captions`` at random (or its ``caption``); evaluation uses the
    first. ``references`` gives every caption per id for caption metrics; ``vocabularies`` (set by
    a builder whose annotations carry attributes) enables attribute accuracy."""

    vocabularies = None
    # Set from the dataset config's ``prompt`` when captions are mixed with data that has a prompt per
    # item (QA): LAVIS's ConcatDataset keeps only the keys every item has, so captions carry one too.
    prompt = None

    def __init__(self, points, annotations, vis_processor, text_processor, is_train):
        self.points, self.annotations = points, annotations
        self.vis_processor, self.text_processor, self.is_train = vis_processor, text_processor, is_train

    def __len__(self):
        return len(self.annotations)

    def captions_of(self, ann):
        return ann.get("captions") or [ann["caption"]]

    def __getitem__(self, i):
        ann = self.annotations[i]
        captions = self.captions_of(ann)
        caption = captions[np.random.randint(len(captions))] if self.is_train else captions[0]
        cloud = np.asarray(self.cloud_of(ann), dtype=np.float32)
        item = {"point": self.vis_processor(cloud), "text_input": self.text_processor(caption),
                "instance_id": ann["id"]}
        if self.prompt is not None:
            item["prompt"] = self.prompt
        return item

    def cloud_of(self, ann):
        return self.points[ann["index"]] if isinstance(self.points, np.ndarray) else self.points[ann]

    def collater(self, samples):
        return default_collate(samples)

    @property
    def references(self):
        return {ann["id"]: [self.text_processor(c) for c in self.captions_of(ann)] for ann in self.annotations}

    @property
    def attributes(self):
        """id -> {attribute: word} where annotations carry them (the embedded set), else None."""
        keys = [k for k in ("shape", "color", "size") if k in self.annotations[0]] if self.annotations else []
        return {ann["id"]: {k: ann[k] for k in keys} for ann in self.annotations} if keys else None
