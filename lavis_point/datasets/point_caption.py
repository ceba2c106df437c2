"""Map-style point-text datasets over clouds and their annotations. ``points`` is an (n, P, 6) array
(a memory-mapped shard; entries' ``index`` picks the row) or a reader looked up by the whole entry
(``ShardedClouds`` over many shards, ``CloudFiles`` over one file per cloud).

A bad sample (unreadable cloud, no usable caption) is skipped and counted, never a crash mid-epoch:
see bad_samples.py."""
import hashlib
import json
from array import array

import numpy as np
from torch.utils.data import Dataset

from lavis_point.data_io.shards import rows_in_file_order
from lavis_point.datasets.bad_samples import BAD_SAMPLE_ERRORS, collate_counting_skips, load_or_skip
from lavis_point.datasets.batching import batch_tensor, collate


def read_jsonl(path, line_numbers=False):
    """The objects of a JSON Lines file (blank lines skipped); with ``line_numbers``, (line number, object)
    pairs, for messages."""
    rows = []
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")  # a leading byte-order mark
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_no}: malformed JSON line: {e}") from e
                rows.append((line_no, row) if line_numbers else row)
    return rows


def read_json(path):
    """A whole JSON file; errors name the file and where it breaks."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return json.loads(data.decode("utf-8-sig"))  # -sig: a leading byte-order mark is dropped
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON: {e}") from None


def usable(caption) -> bool:
    """Text a tokenizer can take: a string that is valid Unicode (byte-level BPE encodes UTF-8, which
    refuses lone surrogates) and not empty once processed (checked by the caller)."""
    if not isinstance(caption, str):
        return False
    try:
        caption.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def match_key(kind, values) -> int:
    """The ``match_id`` of items alike by ``kind`` (an annotation field list, or "id") with these
    values: a 63-bit hash, the same in every process and every dataset, so that items of concatenated
    datasets are alike exactly when their values are (numbering per dataset made unrelated items of
    two datasets share an id)."""
    text = json.dumps([kind, values], default=str)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


class PointCaptionDataset(Dataset):
    """Items: {"point": (P', 6) tensor, "text_input": caption, "instance_id": id, "match_id": int}.
    ``match_id`` says which items describe the same thing: the same object id, or after
    ``set_match_by`` the same annotation fields. Every item carries it, so that LAVIS's ConcatDataset
    (which keeps only the keys all items of a batch have) never drops it from some batches only.

    Training draws one of an entry's ``captions`` at random (or its ``caption``); evaluation uses the
    first. ``references`` gives every caption per id for caption metrics; ``vocabularies`` (set by
    a builder whose annotations carry attributes) enables attribute accuracy."""

    vocabularies = None
    # The dataset config's ``prompt``, else None (the model's prompt). Every item carries it: mixed with
    # data that has a prompt per item (QA), LAVIS's ConcatDataset keeps only the keys every item has.
    prompt = None
    def __init__(self, points, annotations, vis_processor, text_processor, is_train):
        self.points, self.annotations = points, annotations
        self.vis_processor, self.text_processor, self.is_train = vis_processor, text_processor, is_train
        # Once here, before DataLoader workers fork, not per item (~3 us each on the loading path); an
        # int64 array, which workers share (a list's int objects would be copied into each).
        self.match_ids = array("q", (match_key("id", ann.get("id")) for ann in annotations))

    def set_match_by(self, fields, name="dataset"):
        """Items whose annotations agree on ``fields`` describe the same thing (the embedded set's
        captions say only shape, colour and size): each item's ``match_id`` is ``match_key`` of those
        fields' values. Stage 1 counts such pairs as positives in its contrastive loss and never draws
        them as matching negatives. ``name``: the dataset, for the error when an annotation lacks a field."""
        fields, ids = list(fields), []
        for k, ann in enumerate(self.annotations):
            missing = [f for f in fields if f not in ann]
            if missing:
                raise ValueError(f"{name}: match_by {fields}: annotation {k} (id {ann.get('id')!r}) "
                                 f"has no {missing}")
            ids.append(match_key(fields, [ann[f] for f in fields]))
        self.match_ids = array("q", ids)

    def __len__(self):
        return len(self.annotations)

    def captions_of(self, ann):
        return ann.get("captions") or [ann["caption"]]

    def __getitem__(self, i):
        return load_or_skip(self.load, i, len(self), self.is_train, self.describe)

    def __getitems__(self, indices):
        """A batch at once (torch's DataLoader calls this with a batch's indices): the processor's
        kernel reads the batch's clouds where they lie (shard rows straight from the memory map, in
        file order; files still one by one) into one batch tensor, whose rows become the items'
        points (``batching.collate`` hands the tensor back whole). What cannot go that way (a read
        error, a bad cloud, no usable caption) goes through the per-item path, which skips it as
        ``__getitem__`` does."""
        batch_from = getattr(self.vis_processor, "batch_from", None)
        if batch_from is None:
            return [self[i] for i in indices]
        anns = [self.annotations[i] for i in indices]
        try:
            points, finite = batch_from(self.parts_of(anns), len(anns),
                                        out=batch_tensor((len(anns), self.vis_processor.num_points, 6)))
        except BAD_SAMPLE_ERRORS:
            return [self[i] for i in indices]
        items = []
        for k, (i, point) in enumerate(zip(indices, points.unbind(0))):  # unbind: the row views in one call
            point = point if finite[k] else None
            items.append(load_or_skip(lambda j: self.load(j, *((point, anns[k]) if j == i else ())), i,
                                      len(self), self.is_train, self.describe))
        return items

    def load(self, i, point=None, ann=None):
        """Item i; ``point``: its processed cloud when a batch made it already, ``ann``: its annotation
        when read already."""
        ann = self.annotations[i] if ann is None else ann
        caption = self.caption_of(ann)
        if point is None:
            point = self.vis_processor(np.asarray(self.cloud_of(ann)))  # float16 rows: the processor converts
        return {"point": point, "text_input": caption, "instance_id": ann["id"], "match_id": self.match_ids[i],
                "prompt": self.prompt}

    def caption_of(self, ann):
        """The item's processed caption. Training: one of the usable captions at random, uniformly
        (a draw among all of them, then, only if that one is unusable, a draw among the usable ones:
        with every caption usable, one caption processed, and no draw when there is only one);
        evaluation: the first usable one. ValueError when none is usable."""
        captions = self.captions_of(ann)
        if self.is_train:
            caption = self.processed(captions[np.random.randint(len(captions)) if len(captions) > 1 else 0])
            if not caption:
                usable = [c for c in map(self.processed, captions) if c]
                caption = usable[np.random.randint(len(usable))] if usable else ""
        else:
            caption = next((c for c in map(self.processed, captions) if c), "")
        if caption:
            return caption
        raise ValueError(f"no usable caption (empty, whitespace only, not text or not valid Unicode): "
                         f"{captions!r:.200}")

    def processed(self, caption):
        """The processed caption, or "" when there is no usable text."""
        return self.text_processor(caption).strip() if usable(caption) else ""

    def describe(self, i):
        """Where item i comes from, for messages: its id and its file or shard row."""
        ann = self.annotations[i] if 0 <= i < len(self.annotations) else {}
        where = ann.get("path") or (f"{ann['shard']}[{ann.get('index')}]" if "shard" in ann else None)
        return f"item {i} (id {ann.get('id')!r}" + (f", {where})" if where else ")")

    def cloud_of(self, ann):
        return self.points[ann["index"]] if isinstance(self.points, np.ndarray) else self.points[ann]

    def parts_of(self, anns):
        """Where the clouds of many entries lie, as ``batch_from`` takes them: [(clouds, rows,
        positions)], shard rows grouped by shard file in file order; per-object files read one by one,
        each its own part (differing sizes: ValueError from the processor)."""
        if isinstance(self.points, np.ndarray):
            return [rows_in_file_order(self.points, [ann["index"] for ann in anns], range(len(anns)))]
        if hasattr(self.points, "parts"):
            return self.points.parts(anns)
        return [(np.asarray(self.cloud_of(ann))[None], [0], [k]) for k, ann in enumerate(anns)]

    def collater(self, samples):
        return collate_counting_skips(samples, collate)

    @property
    def references(self):
        """id -> its usable captions, processed: the model's input (retrieval ranks these)."""
        return {ann["id"]: [c for c in map(self.processed, self.captions_of(ann)) if c] for ann in self.annotations}

    @property
    def ground_truth(self):
        """id -> the same captions as the annotations wrote them (caption metrics score against these)."""
        return {ann["id"]: [c for c in self.captions_of(ann) if self.processed(c)] for ann in self.annotations}

    @property
    def attributes(self):
        """id -> {attribute: word} where annotations carry them (the embedded set), else None."""
        keys = [k for k in ("shape", "color", "size") if k in self.annotations[0]] if self.annotations else []
        return {ann["id"]: {k: ann[k] for k in keys} for ann in self.annotations} if keys else None
