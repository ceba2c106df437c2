"""Cap3D / Objaverse point-caption data: annotation readers and the ``cap3d_point_caption`` builder.

Annotations (``read_annotations``), by extension:
  .json   GPT4Point's list of {"point": <cloud path>, "caption": <text>} (also "uid"/"id", "captions")
  .csv    Cap3D's captions: rows ``uid,caption`` (no header, or a header naming uid and caption)
  .jsonl  one such object per line (our shard index is one)
Entries are grouped by object id (a cloud's file stem when no id is given), keeping every caption.

Clouds come either from shards made by scripts/convert_points.py (fast: contiguous, memory-mapped) or
straight from a folder of per-object files (.pkl .npy .npz .ply ...; read with ``read_cloud``).
"""
import csv
import logging
import os

from lavis.common.registry import registry
from lavis.datasets.builders.base_dataset_builder import BaseDatasetBuilder

from lavis_point.data_io.clouds import CLOUD_EXTS, read_cloud
from lavis_point.datasets.builders import caption_dataset, shard_datasets
from lavis_point.datasets.point_caption import PointCaptionDataset, read_json, read_jsonl
from lavis_point.paths import config_path


def read_annotations(path) -> list:
    """[{"id", "point" (a path as written, or None), "captions": [...]}], one per object, in file order."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".csv":
        rows = _read_csv(path)
    elif ext == ".jsonl":
        rows = read_jsonl(path)
    elif ext == ".json":
        rows = read_json(path)
        if isinstance(rows, dict) and isinstance(rows.get("annotations"), list):
            rows = rows["annotations"]
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON list of {{'point', 'caption'}} objects, got "
                             f"{type(rows).__name__}")
    else:
        raise ValueError(f"{path}: unknown annotation format '{ext}'; expected .json, .jsonl or .csv")
    grouped, numbers = {}, {}  # id -> entry; id -> number of the entry it was first read from
    for number, row in enumerate(rows, 1):
        entry = _entry(row, f"{path}: entry {number}")
        kept = grouped.setdefault(entry["id"], entry)
        numbers.setdefault(entry["id"], number)
        if kept is entry:
            continue
        if kept["point"] and entry["point"] and kept["point"] != entry["point"]:
            raise ValueError(f"{path}: entries {numbers[entry['id']]} and {number} both have id '{entry['id']}' "
                             f"but name different clouds ('{kept['point']}' and '{entry['point']}'); one id must "
                             f"name one cloud: give each entry its own 'uid'")
        kept["captions"].extend(entry["captions"])
    return list(grouped.values())


def _entry(row, where):
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object with 'point' and 'caption', got {type(row).__name__}")
    captions = row.get("captions") or ([row["caption"]] if row.get("caption") is not None else [])
    captions = [captions] if isinstance(captions, str) else captions  # one caption, not its characters
    if not captions or not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise ValueError(f"{where}: no caption text ('caption' or 'captions')")
    point = row.get("point") or row.get("path")
    uid = next((row[k] for k in ("uid", "id") if row.get(k) not in (None, "")), None)  # 0 is an id
    uid = uid if uid is not None else (object_id(point) if point else None)
    if uid is None:
        raise ValueError(f"{where}: neither 'point' nor 'uid' names the object")
    return {"id": str(uid), "point": point, "captions": list(captions)}


def _read_csv(path):
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: a leading byte-order mark is dropped
            table = [row for row in csv.reader(f) if row]
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if table and [c.strip().lower() for c in table[0][:2]] in (["uid", "caption"], ["id", "caption"]):
        table = table[1:]
    for number, row in enumerate(table, 1):
        if len(row) < 2:
            raise ValueError(f"{path}: row {number}: expected 'uid,caption', got {row}")
    return [{"uid": row[0].strip(), "caption": ",".join(row[1:]).strip()} for row in table]


def object_id(point_path) -> str:
    """An object's id from its cloud's path: the file name without extension (Cap3D's uid)."""
    name = os.path.basename(str(point_path))
    stem, ext = os.path.splitext(name)
    return stem if ext.lower() in CLOUD_EXTS else name


def index_cloud_files(folder) -> dict:
    """object id -> paths of the cloud files under ``folder`` with that id (searched recursively, in
    sorted order; more than one path: the id is ambiguous)."""
    found = {}
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for name in sorted(names):
            if os.path.splitext(name)[1].lower() in CLOUD_EXTS:
                found.setdefault(object_id(name), []).append(os.path.join(root, name))
    return found


def locate_clouds(entries, folder):
    """(entries with "path" set, entries whose cloud file was not found). A "point" is taken relative to
    ``folder`` (or as given, when absolute); failing that the object is looked up by id in ``folder``.
    An id that several files share names none of them: that entry is missing, with a "reason"."""
    by_id, located, missing = None, [], []
    for entry in entries:
        point = entry.get("point")
        path = os.path.join(folder, point) if point else None
        if path is not None and os.path.isfile(path):
            located.append({**entry, "path": path})
            continue
        by_id = index_cloud_files(folder) if by_id is None else by_id
        paths = by_id.get(entry["id"], [])
        if len(paths) == 1:
            located.append({**entry, "path": paths[0]})
        elif paths:
            shown = ", ".join(os.path.relpath(p, folder) for p in paths[:3]) + (", ..." if len(paths) > 3 else "")
            missing.append({**entry, "reason": f"{len(paths)} files in {folder} are named '{entry['id']}' "
                                               f"({shown}); give the annotation a 'point' path to say which"})
        else:
            missing.append(entry)
    return located, missing


class CloudFiles:
    """``clouds[entry]`` -> the float32 (N, 6) cloud in ``entry["path"]`` (one file read per item)."""

    def __getitem__(self, entry):
        return read_cloud(entry["path"], white_if_missing=True)


def resolve(root, path) -> str:
    path = os.path.expandvars(os.path.expanduser(str(path)))
    return path if os.path.isabs(path) else os.path.join(root, path)


@registry.register_builder("cap3d_point_caption")
class Cap3DPointCaptionBuilder(BaseDatasetBuilder):
    """Cap3D point-caption pairs (train / val / test). ``build_info.root`` ($LAVIS_POINT_CAP3D by
    default) holds the data; ``source: shards`` reads ``build_info.shards`` (converted, fast),
    ``source: files`` reads ``build_info.annotations[split]`` over the cloud files in
    ``build_info.clouds`` (no conversion, one file per item)."""

    train_dataset_cls = eval_dataset_cls = PointCaptionDataset
    DATASET_CONFIG_DICT = {"default": config_path("datasets/cap3d/defaults.yaml")}

    def build_datasets(self):
        info = self.config.build_info
        root = os.path.expandvars(os.path.expanduser(str(info.root)))
        splits = list(info.splits)
        self.build_processors()
        if info.source == "shards":
            return shard_datasets(self, resolve(root, info.shards), splits)
        if info.source != "files":
            raise ValueError(f"datasets.cap3d_point_caption.build_info.source: expected 'shards' or 'files', "
                             f"got '{info.source}'")
        folder = resolve(root, info.clouds)
        return {split: self._files_dataset(resolve(root, info.annotations[split]), folder, split)
                for split in splits}

    def _files_dataset(self, annotation_path, folder, split):
        located, missing = locate_clouds(read_annotations(annotation_path), folder)
        if missing:  # a counted skip: the run goes on without them and says how many
            first = missing[0]
            logging.warning(f"{annotation_path}: {len(missing)} of {len(located) + len(missing)} objects have "
                            f"no cloud file in {folder} that is theirs alone (first: '{first['id']}': "
                            f"{first.get('reason', 'no such file')}); skipped")
        if not located:
            raise FileNotFoundError(f"{annotation_path}: none of its objects has a cloud file in {folder}")
        return caption_dataset(self, CloudFiles(), located, split, annotation_path)
