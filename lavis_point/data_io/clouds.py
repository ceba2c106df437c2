"""One function reads a point cloud from any file we accept: ``read_cloud(path)``.

Formats, chosen by extension:
  .pkl / .pickle   a pickled numpy array (Cap3D), through the restricted unpickler (no code runs)
  .npy             a numpy array (never pickled objects)
  .npz             the array under "points" (or "point", "cloud", "pc", "xyz"), or the archive's only
                   array; (N, 3) points take an "rgb"/"colors"/"colours" array of the same length beside them
  .pts .xyz .txt   whitespace- or comma-separated rows "x y z [r g b]" (a leading point-count line is
                   skipped)
  .ply             a point cloud (vertices, optional colours) or, when it has faces, a mesh
  .obj .glb .gltf .off .stl   a mesh, sampled to ``mesh_points`` coloured surface points (meshes.py)

Every failure raises ``CloudReadError`` (a ``ValueError``), whose message starts with the file and says
what is wrong: unreadable, truncated, unsafe pickle, wrong shape, no points, NaN or infinite values.
"""
import json
import os

import numba
import numpy as np
import trimesh

from lavis_point.data_io import meshes, safe_pickle

PICKLE_EXTS = (".pkl", ".pickle")
TEXT_EXTS = (".pts", ".xyz", ".txt")
MESH_EXTS = (".ply", ".obj", ".glb", ".gltf", ".off", ".stl")
CLOUD_EXTS = PICKLE_EXTS + (".npy", ".npz") + TEXT_EXTS + MESH_EXTS
NPZ_KEYS = ("points", "point", "cloud", "pc")


# rgb is 0-255 when stored as integers, or when its largest value exceeds this. A little over 1 is 0-1
# colour that overshoots (interpolation, rounding) and is clipped: with a cut at 1 one such value made
# the whole cloud black. A 0-255 cloud with nothing above 1.5 is black either way.
RGB_255_ABOVE = 1.5


class PointCloudError(ValueError):
    """A cloud that cannot be used; the message says what is wrong."""


class CloudReadError(PointCloudError):
    """A file that cannot be read as a cloud. ``path`` and ``reason`` are kept for reports."""

    def __init__(self, path, reason):
        self.path, self.reason = str(path), str(reason)
        super().__init__(f"{self.path}: {self.reason}")


def check_cloud(array) -> np.ndarray:
    """A float32 (N, 3) or (N, 6) array of finite numbers, or ``PointCloudError`` saying why not."""
    a = np.asarray(array)
    if a.ndim != 2 or a.shape[1] not in (3, 6):
        raise PointCloudError(f"expected an (N, 3) or (N, 6) array of points, got shape {a.shape}")
    if a.shape[0] == 0:
        raise PointCloudError("the cloud has no points")
    if not (np.issubdtype(a.dtype, np.number) or a.dtype == bool) or np.iscomplexobj(a):
        raise PointCloudError(f"expected real numbers, got dtype {a.dtype}")
    a = a.astype(np.float32, order="C")
    if not np.isfinite(a).all():  # over the flat array: fast; rows are counted only for the error
        raise PointCloudError(f"{int((~np.isfinite(a).all(axis=1)).sum())} points have NaN or infinite values")
    return a


def as_cloud(array) -> np.ndarray:
    """Validate and convert to float32 (N, 6): xyz, then rgb in [0, 1] (white when there is none;
    rgb stored as 0-255 is recognised by its integer dtype or its maximum, see ``RGB_255_ABOVE``)."""
    integers = np.asarray(array).dtype.kind in "iu"
    a = check_cloud(array)
    out = np.empty((len(a), 6), np.float32)
    _with_colour(a, out, integers)
    return out


# Compiled: numpy's ufuncs and reductions over (N, 6) rows or their (N, 3) halves run an inner loop
# of 3 or 6 values each, about 100 us per ufunc for an 8192-point cloud, which made validating a
# cloud cost more than reading it.
@numba.njit(cache=True, nogil=True)
def _with_colour(a, out, integers):
    """out = a's xyz and rgb in [0, 1]: a's rgb divided by 255 when it was stored as ``integers`` or its
    largest value exceeds ``RGB_255_ABOVE``, then clipped (float32, as numpy computes ``rgb / 255.0`` and
    ``np.clip``), or white when a is (N, 3)."""
    n, width = a.shape
    lo, hi = np.float32(0), np.float32(1)
    if width == 3:
        for i in range(n):
            out[i, 0], out[i, 1], out[i, 2] = a[i, 0], a[i, 1], a[i, 2]
            out[i, 3], out[i, 4], out[i, 5] = hi, hi, hi
        return
    r, g, b = a[0, 3], a[0, 4], a[0, 5]  # one running maximum per channel: the loop vectorises
    for i in range(n):
        r, g, b = max(r, a[i, 3]), max(g, a[i, 4]), max(b, a[i, 5])
    if integers or max(r, g, b) > RGB_255_ABOVE:  # two loops, so that 0-1 colours skip the (slow) division
        div = np.float32(255)
        for i in range(n):
            out[i, 0], out[i, 1], out[i, 2] = a[i, 0], a[i, 1], a[i, 2]
            for c in range(3, 6):
                out[i, c] = min(hi, max(lo, a[i, c] / div))  # lo first: -0 becomes 0, as in np.clip
    else:
        for i in range(n):
            out[i, 0], out[i, 1], out[i, 2] = a[i, 0], a[i, 1], a[i, 2]
            for c in range(3, 6):
                out[i, c] = min(hi, max(lo, a[i, c]))


def read_cloud(path, *, white_if_missing=False, mesh_points=8192, seed=0) -> np.ndarray:
    """The cloud in ``path``: float32 (N, 3) or (N, 6), rgb in [0, 1].

    ``white_if_missing=True`` always returns (N, 6), clouds without colour becoming white. Meshes are
    sampled to ``mesh_points`` points (deterministically for a given ``seed``) and always carry colour.
    """
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in CLOUD_EXTS:
        raise CloudReadError(path, f"unknown extension '{ext}'; expected one of {', '.join(CLOUD_EXTS)}")
    try:
        raw = _read_raw(path, ext, mesh_points, seed)
        cloud = as_cloud(raw)
    except CloudReadError:
        raise
    except FileNotFoundError:
        raise CloudReadError(path, "no such file") from None
    except safe_pickle.UnsafePickleError as e:
        raise CloudReadError(path, f"unsafe pickle: {e}") from None
    except (EOFError, safe_pickle.pickle.UnpicklingError) as e:
        raise CloudReadError(path, f"truncated or corrupt pickle ({type(e).__name__}: {e})") from None
    except PointCloudError as e:
        raise CloudReadError(path, str(e)) from None
    except Exception as e:  # any parser's failure on a bad file becomes one error that names the file
        raise CloudReadError(path, f"unreadable ({type(e).__name__}: {e})") from None
    if white_if_missing or raw.shape[1] == 6:
        return cloud
    return cloud[:, :3].copy()


def _read_raw(path, ext, mesh_points, seed) -> np.ndarray:
    if ext in PICKLE_EXTS:
        with open(path, "rb") as f:
            return safe_pickle.load_array(f)
    if ext == ".npy":
        return np.load(path, allow_pickle=False)
    if ext == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            return _npz_cloud(archive)
    if ext in TEXT_EXTS:
        return _read_text(path)
    return _read_geometry(path, mesh_points, seed)


def _npz_cloud(archive) -> np.ndarray:
    """The point array. Colours stored beside xyz-only points join them whatever the points' key: a
    "points" + "colors" archive used to come out white."""
    key = next((k for k in NPZ_KEYS + ("xyz",) if k in archive.files), None)
    if key is None:
        if len(archive.files) == 1:
            return archive[archive.files[0]]
        raise PointCloudError(f"no point array among {archive.files}; expected one of {NPZ_KEYS} or 'xyz'")
    points = archive[key]
    colour_key = next((k for k in ("rgb", "colors", "colours") if k in archive.files), None)
    if colour_key is None or points.ndim != 2 or points.shape[1] != 3:
        return points
    colour = archive[colour_key]
    if colour.ndim == 1:  # grey levels
        colour = np.repeat(colour[:, None], 3, axis=1)
    if len(colour) != len(points) or colour.ndim != 2 or colour.shape[1] not in (3, 4):
        raise PointCloudError(f"'{key}' holds {len(points)} points but '{colour_key}' is {colour.shape}: expected "
                              f"({len(points)}, 3) colours (or 4 with alpha, or one grey level each)")
    if colour.dtype.kind in "iu":  # 0-255 however dark: joined to float xyz the dtype would be lost
        colour = colour / 255.0
    return np.concatenate([points, colour[:, :3]], axis=1)  # alpha (trimesh writes RGBA) dropped


def _read_text(path) -> np.ndarray:
    with open(path, encoding="utf-8-sig") as f:  # a byte-order mark is not part of the first number
        lines = [line.replace(",", " ").split() for line in f if line.strip()]
    if lines and len(lines[0]) == 1 and len(lines) > 1:
        lines = lines[1:]  # a point-count header
    widths = {len(row) for row in lines}
    if len(widths) > 1:
        raise PointCloudError(f"rows have different numbers of values: {sorted(widths)}")
    try:
        return np.array(lines, dtype=np.float64).reshape(len(lines), -1)
    except ValueError as e:
        raise PointCloudError(f"a value is not a number ({e})") from None


def _check_gltf(path):
    """A .gltf is JSON text holding an object: trimesh reads anything else as a missing 'model.gltf'."""
    with open(path, "rb") as f:
        data = f.read()
    if not data.strip():
        raise PointCloudError("not a readable glTF: the file is empty")
    try:
        tree = json.loads(data)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise PointCloudError(f"not a readable glTF: not JSON ({e})") from None
    if not isinstance(tree, dict):
        raise PointCloudError(f"not a readable glTF: its JSON is a {type(tree).__name__}, not an object")


def _read_geometry(path, mesh_points, seed) -> np.ndarray:
    if path.lower().endswith(".gltf"):
        _check_gltf(path)
    try:
        geometry = trimesh.load(path)
    except FileNotFoundError as e:  # what the file refers to (a glTF's .bin buffer), not the file itself
        if not os.path.isfile(path):
            raise
        name = e.filename or (e.args[0] if e.args else "?")
        folder = os.path.dirname(os.path.abspath(path))
        raise PointCloudError(f"'{name}', a file it refers to, is missing (looked in {folder})") from None
    if isinstance(geometry, trimesh.PointCloud):
        xyz = np.asarray(geometry.vertices)
        colours = geometry.colors if geometry.colors is not None and len(geometry.colors) else None
        return xyz if colours is None else np.concatenate([xyz, np.asarray(colours)[:, :3] / 255.0], axis=1)
    parts = meshes.triangle_meshes(geometry)
    if not parts:
        raise PointCloudError(f"no triangles or points in the file (loaded a {type(geometry).__name__})")
    return meshes.sample_surface(parts, mesh_points, seed)
