"""Cloud and mesh files for data tests, written by our code: good ones in every format we read, and
bad ones (truncated, NaN, wrong shape, a pickle holding another object, a pickle that runs code)."""
import json
import os
import pickle

import numpy as np
import trimesh
from PIL import Image
from trimesh.visual import TextureVisuals
from trimesh.visual.material import PBRMaterial, SimpleMaterial

SQUARE = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], dtype=np.float64)
SQUARE_FACES = np.array([[0, 1, 2], [0, 2, 3]])


class CreatesFileWhenUnpickled:
    """Unpickling this calls ``open(marker, "w")``: if the marker exists, a reader executed the file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def coloured_cloud(n=4096, seed=0):
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.normal(size=(n, 3)), rng.random((n, 3))], axis=1).astype(np.float32)


def write_pickle(path, value, protocol=4):
    with open(path, "wb") as f:
        pickle.dump(value, f, protocol=protocol)
    return str(path)


def truncate(path, keep=0.5):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])
    return str(path)


def vertex_coloured_square(path, rgba=(255, 0, 0, 255)):
    mesh = trimesh.Trimesh(SQUARE, SQUARE_FACES, vertex_colors=np.tile(rgba, (4, 1)), process=False)
    mesh.export(path)
    return str(path)


def textured_square(path):
    """A unit square whose texture is red on its left half (x < 0.5) and blue on its right."""
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    image[:, :4], image[:, 4:] = (255, 0, 0), (0, 0, 255)
    visual = TextureVisuals(uv=SQUARE[:, :2], material=PBRMaterial(baseColorTexture=Image.fromarray(image)))
    trimesh.Trimesh(SQUARE, SQUARE_FACES, visual=visual, process=False).export(path)
    return str(path)


def material_coloured_square(path, rgba=(0, 255, 0, 255)):
    visual = TextureVisuals(material=SimpleMaterial(diffuse=rgba))
    trimesh.Trimesh(SQUARE, SQUARE_FACES, visual=visual, process=False).export(path)
    return str(path)


def plain_mesh(path):
    trimesh.creation.box().export(path)
    return str(path)


def mixed_folder(folder, marker):
    """A folder of clouds as a converter meets them, and GPT4Point-style annotations for it.
    Returns (annotation path, {id: expected float32 (N, 6) cloud} for the good ones, {id: reason
    fragment} for the bad ones)."""
    os.makedirs(folder, exist_ok=True)
    good, bad = {}, {}
    for i in range(5):
        good[f"pkl{i}"] = coloured_cloud(2048, seed=i)
        write_pickle(os.path.join(folder, f"pkl{i}.pkl"), good[f"pkl{i}"], protocol=2 + i % 4)
    good["npy0"] = coloured_cloud(2048, seed=10)
    np.save(os.path.join(folder, "npy0.npy"), good["npy0"])
    xyz_only = coloured_cloud(2048, seed=11)[:, :3]
    np.save(os.path.join(folder, "white0.npy"), xyz_only)
    good["white0"] = np.concatenate([xyz_only, np.ones_like(xyz_only)], axis=1)
    vertex_coloured_square(os.path.join(folder, "mesh0.ply"))
    good["mesh0"] = None  # sampled: checked by colour and plane, not bit for bit
    truncate(write_pickle(os.path.join(folder, "truncated.pkl"), coloured_cloud(2048, seed=20)))
    bad["truncated"] = "truncated"
    write_pickle(os.path.join(folder, "notarray.pkl"), {"points": [1, 2, 3]})
    bad["notarray"] = "holds a dict"
    write_pickle(os.path.join(folder, "evil.pkl"), CreatesFileWhenUnpickled(marker))
    bad["evil"] = "io.open"
    nan_cloud = coloured_cloud(2048, seed=21)
    nan_cloud[5, 1] = np.nan
    write_pickle(os.path.join(folder, "nan.pkl"), nan_cloud)
    bad["nan"] = "NaN"
    bad["absent"] = "no cloud file"
    names = {i: next(n for n in os.listdir(folder) if os.path.splitext(n)[0] == i) for i in good.keys() | bad.keys()
             if i != "absent"}
    names["absent"] = "absent.pkl"
    annotations = [{"point": names[i], "caption": f"a thing called {i}"} for i in sorted(names)]
    path = os.path.join(os.path.dirname(folder), "annotations.json")
    with open(path, "w") as f:
        json.dump(annotations, f)
    return path, good, bad
