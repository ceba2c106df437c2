"""Point classification sets for zero-shot evaluation: items ``{"point", "label", "instance_id"}``,
``classnames[label]`` the class's name. Readers for the formats users have:

- ModelNet40 as h5 files (``ply_data_{split}*.h5``: ``data`` (n, P, 3|6: xyz, or xyz and normals, which
  are dropped), ``label`` (n,) or (n, 1)),
  with the class list ``shape_names.txt`` and optionally ``{split}_files.txt`` naming the files;
- ModelNet40 as folders of clouds (.npy / .txt, one per object): either the list files
  ``modelnet40_{split}.txt`` (``airplane_0627`` -> ``airplane/airplane_0627.txt``) or
  ``<class>/<split>/<object>.npy``; class names from ``*shape_names.txt`` or the folder names;
- Objaverse-LVIS: a JSON of object id -> category (or Objaverse's category -> [object ids]) over a
  folder of per-object clouds; objects whose cloud file is missing are skipped and counted.

A cloud that cannot be used when an item is loaded (truncated, NaN...) is dropped and counted
(bad_samples.py): the metrics cover the rest.
"""
import glob
import logging
import os

import numpy as np
from torch.utils.data import Dataset

from lavis_point.data_io.clouds import CLOUD_EXTS, read_cloud
from lavis_point.datasets.bad_samples import collate_counting_skips, load_or_skip
from lavis_point.datasets.point_caption import read_json

log = logging.getLogger(__name__)
FOLDER_CLOUD_EXTS = (".npy", ".txt")


class PointClassificationDataset(Dataset):
    def __init__(self, clouds, labels, ids, classnames, vis_processor):
        if not (len(clouds) == len(labels) == len(ids)):
            raise ValueError(f"{len(clouds)} clouds, {len(labels)} labels and {len(ids)} ids: expected one each")
        self.clouds, self.labels, self.ids = clouds, [int(y) for y in labels], list(ids)
        self.classnames, self.vis_processor = list(classnames), vis_processor
        bad = [y for y in self.labels if not 0 <= y < len(self.classnames)]
        if bad:
            raise ValueError(f"labels {sorted(set(bad))[:10]} outside the {len(self.classnames)} class names")

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        # Zero-shot sets are only evaluated: a bad item is dropped, never replaced.
        return load_or_skip(self.load, i, len(self), False, self.describe)

    def load(self, i):
        cloud = np.asarray(self.clouds[i], dtype=np.float32)
        return {"point": self.vis_processor(cloud), "label": self.labels[i], "instance_id": self.ids[i]}

    def describe(self, i):
        paths = getattr(self.clouds, "paths", None)
        return f"item {i} (id {self.ids[i]!r}" + (f", {paths[i]})" if paths else ")")

    def collater(self, samples):
        return collate_counting_skips(samples)


class ArrayRows:
    """``clouds[i]`` is ``array[rows[i]]``: items over some rows of a (memory-mapped) (n, P, 6) array."""

    def __init__(self, array, rows):
        self.array, self.rows = array, list(rows)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.array[self.rows[i]]


class CloudFileList:
    """``clouds[i]`` reads ``paths[i]`` (any format ``read_cloud`` takes); ``xyz_only`` keeps the
    first three columns (ModelNet40's .txt clouds carry normals, not colours, in columns 4-6)."""

    def __init__(self, paths, xyz_only=False):
        self.paths, self.xyz_only = list(paths), xyz_only

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        cloud = read_cloud(self.paths[i])
        return cloud[:, :3] if self.xyz_only else cloud


def read_lines(path):
    """Non-empty stripped lines; a byte-order mark (Windows editors) is not part of the first."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None


def read_classnames(root, candidates=("shape_names.txt", "modelnet40_shape_names.txt")):
    for name in candidates:
        if os.path.isfile(os.path.join(root, name)):
            return read_lines(os.path.join(root, name))
    return None


def modelnet40_h5(root, split):
    """(clouds (n, P, 3) array: xyz only, labels, ids, classnames) from ModelNet40's h5 files."""
    import h5py

    classnames = read_classnames(root)
    if classnames is None:
        raise FileNotFoundError(f"{root}: no shape_names.txt (the class names, one per line)")
    listing = os.path.join(root, f"{split}_files.txt")
    if os.path.isfile(listing):  # entries are paths from the original archive: keep the file name
        files = [os.path.join(root, os.path.basename(p)) for p in read_lines(listing)]
    else:
        files = sorted(glob.glob(os.path.join(root, f"ply_data_{split}*.h5")))
    if not files:
        raise FileNotFoundError(f"{root}: no {split}_files.txt and no ply_data_{split}*.h5 files")
    clouds, labels = [], []
    for path in files:
        try:
            f = h5py.File(path, "r")
        except OSError as e:  # h5py's message names no file
            raise OSError(f"{path}: not a readable HDF5 file ({e})") from None
        with f:
            for key in ("data", "label"):
                if key not in f:
                    raise KeyError(f"{path}: no '{key}' dataset (has {sorted(f.keys())})")
            data, label = np.asarray(f["data"], dtype=np.float32), np.asarray(f["label"]).reshape(-1)
        if data.ndim != 3 or data.shape[2] not in (3, 6) or len(data) != len(label):
            raise ValueError(f"{path}: expected 'data' (n, P, 3 or 6) and n labels, got {data.shape} and "
                             f"{label.shape}")
        clouds.append(data[:, :, :3])  # columns 4-6, where present, are normals, not colours: white, as folders
        labels.append(label.astype(np.int64))
    clouds, labels = np.concatenate(clouds), np.concatenate(labels)
    ids = [f"{split}_{i:05d}" for i in range(len(labels))]
    return clouds, labels, ids, classnames


def modelnet40_folder(root, split):
    """(CloudFileList, labels, ids, classnames) from a folder of per-object clouds."""
    listing = os.path.join(root, f"modelnet40_{split}.txt")
    if os.path.isfile(listing):
        names = read_lines(listing)
        classnames = read_classnames(root) or sorted({n.rsplit("_", 1)[0] for n in names})
        paths = [find_cloud(os.path.join(root, n.rsplit("_", 1)[0], n)) for n in names]
        labels = [class_index(classnames, n.rsplit("_", 1)[0], listing) for n in names]
        return CloudFileList(paths, xyz_only=True), labels, names, classnames
    classnames = read_classnames(root) or sorted(
        d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d, split)))
    paths, labels, empty = [], [], []
    for label, name in enumerate(classnames):
        files = sorted(p for p in glob.glob(os.path.join(root, name, split, "*"))
                       if p.lower().endswith(FOLDER_CLOUD_EXTS))
        paths += files
        labels += [label] * len(files)
        if not files:
            empty.append(name)
    if not paths:
        raise FileNotFoundError(f"{root}: no modelnet40_{split}.txt and no <class>/{split}/*.npy|*.txt clouds")
    if empty:  # a misspelt class or folder would otherwise vanish from the accuracy unseen
        log.warning("%s: %d classes have no %s clouds (no %s): %s", root, len(empty), split,
                    os.path.join("<class>", split, "*.npy|*.txt"), empty[:10])
    ids = [os.path.splitext(os.path.relpath(p, root))[0] for p in paths]
    return CloudFileList(paths, xyz_only=True), labels, ids, classnames


def find_cloud(stem):
    for ext in FOLDER_CLOUD_EXTS:
        if os.path.isfile(stem + ext):
            return stem + ext
    raise FileNotFoundError(f"{stem}: no cloud file with extension {' or '.join(FOLDER_CLOUD_EXTS)}")


def class_index(classnames, name, source):
    if name not in classnames:
        raise ValueError(f"{source}: class '{name}' is not among the {len(classnames)} class names")
    return classnames.index(name)


def read_lvis_annotations(path):
    """{object id: category} from a JSON of id -> category or of category -> [ids]."""
    data = read_json(path)
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: expected a JSON object of object id -> category (or category -> [ids])")
    if all(isinstance(v, str) for v in data.values()):
        return dict(data)
    if all(isinstance(v, list) for v in data.values()):
        return {uid: category for category, uids in data.items() for uid in uids}
    raise ValueError(f"{path}: values must be all category strings or all lists of object ids")


def objaverse_lvis(annotations, points_dir, path_template="{uid}.npy"):
    """(CloudFileList, labels, ids, classnames, number skipped): objects without a cloud file are
    skipped and counted."""
    category_of = read_lvis_annotations(annotations)
    classnames = sorted(set(category_of.values()))
    index = {c: i for i, c in enumerate(classnames)}
    paths, labels, ids, missing = [], [], [], []
    for uid, category in sorted(category_of.items()):
        path = os.path.join(points_dir, path_template.format(uid=uid))
        if not path.lower().endswith(CLOUD_EXTS):
            raise ValueError(f"path_template {path_template!r} gives {path}: not a cloud file extension")
        if not os.path.isfile(path):
            missing.append(uid)
            continue
        paths.append(path)
        labels.append(index[category])
        ids.append(uid)
    if missing:
        log.warning("Objaverse-LVIS: skipped %d of %d objects without a cloud file in %s (e.g. %s)",
                    len(missing), len(category_of), points_dir, missing[:3])
    if not paths:
        raise FileNotFoundError(f"{points_dir}: none of the {len(category_of)} objects of {annotations} has a "
                                f"cloud file ({path_template})")
    return CloudFileList(paths), labels, ids, classnames, len(missing)
