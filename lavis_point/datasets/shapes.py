"""Procedural "embedded default" point-text dataset of coloured 3D shapes.

Every cloud is a surface sample of one of 8 geometrically distinct shape
families, painted one of 8 colours, at one of 3 sizes, described by templated
captions.  It is fully determined by a seed, needs no download, and is small
enough that a tiny point encoder trains on a CPU in minutes, so a training run
on it must push retrieval/captioning metrics far above chance.

Clouds are deliberately NOT normalised to the unit sphere here: size is a
caption attribute, and rescaling every cloud to radius 1 would erase it.  The
generator instead keeps every point inside the unit sphere itself, and the
processor config for this dataset disables unit-sphere normalisation.

8 of the 64 shape-colour pairs are held out: train/val never contain them and
test contains only them, so test measures compositional generalisation.
"""
import hashlib
import json
import os
import re

import numpy as np

VERSION = 1
SHAPES = ("cube", "sphere", "cylinder", "cone", "torus", "pyramid", "cross", "helix")
COLORS = {
    "red": (0.9, 0.1, 0.1), "green": (0.1, 0.75, 0.2), "blue": (0.1, 0.25, 0.95),
    "yellow": (0.95, 0.9, 0.1), "purple": (0.55, 0.15, 0.75), "orange": (1.0, 0.5, 0.05),
    "white": (0.95, 0.95, 0.95), "black": (0.05, 0.05, 0.05),
}
SIZES = {"small": 0.45, "medium": 0.7, "large": 0.95}
TEMPLATES = (
    "a {size} {color} {shape}",
    "a {color} {shape} of {size} size",
    "there is a {size} {shape} coloured {color}",
    "a 3d model of a {size} {color} {shape}",
    "a point cloud of a {size} {color} {shape}",
    "this {shape} is {color} and {size}",
    "a {size} {shape} painted {color}",
    "the object is a {color} {shape}, {size} in size",
    "an object shaped like a {shape}, {size} and {color}",
    "a {color} {shape}; its size is {size}",
)
SPLITS = ("train", "val", "test")
DEFAULT_SPLIT_SIZES = {"train": 3072, "val": 256, "test": 256}
_HELDOUT_OFFSET = 3  # held-out colour index = (shape index + 3) % 8
_MAX_EXTENT = 0.99  # headroom so float16 rounding never lands a point outside |p| <= 1
_TILT = np.deg2rad(15.0)


# --- canonical shapes: surface samples centred near the origin, extent ~[-1, 1] ---
def _planar(o, e1, e2, tri, n, rng):
    """Area-weighted sample of parallelograms/triangles given as corner + two edges."""
    o, e1, e2, tri = (np.asarray(a, dtype=np.float64) for a in (o, e1, e2, tri))
    area = np.linalg.norm(np.cross(e1, e2), axis=1) * np.where(tri > 0, 0.5, 1.0)
    k = np.searchsorted(np.cumsum(area) / area.sum(), rng.random(n), side="right")
    k = np.minimum(k, len(area) - 1)
    u, v = rng.random(n), rng.random(n)
    fold = (tri[k] > 0) & (u + v > 1)  # reflect into the lower triangle to stay uniform
    u, v = np.where(fold, 1 - u, u), np.where(fold, 1 - v, v)
    return o[k] + u[:, None] * e1[k] + v[:, None] * e2[k]


def _weighted_angle(k, n, rng):
    """Angles with density proportional to 1 + k cos(a): the area element of tubes."""
    grid = np.linspace(0, 2 * np.pi, 2049)
    cdf = (grid + k * np.sin(grid)) / (2 * np.pi)
    return np.interp(rng.random(n), cdf, grid)


def _disc_or_side(n, rng, p_side, side, cap):
    """Choose per point between a lateral-surface and a cap sampler, vectorised."""
    is_side = rng.random(n) < p_side
    return np.where(is_side[:, None], side(n), cap(n))


def _cube(n, rng):
    eye, faces = np.eye(3), []
    for a in range(3):
        b, c = eye[(a + 1) % 3], eye[(a + 2) % 3]
        faces += [(s * eye[a] - b - c, 2 * b, 2 * c, 0) for s in (-1, 1)]
    return _planar(*zip(*faces), n, rng)


def _sphere(n, rng):
    p = rng.standard_normal((n, 3))
    return p / np.linalg.norm(p, axis=1, keepdims=True)


def _ring(n, rng, radius, z):
    t, r = rng.uniform(0, 2 * np.pi, n), radius * np.sqrt(rng.random(n))
    return np.stack([r * np.cos(t), r * np.sin(t), np.broadcast_to(z, (n,))], 1)


def _cylinder(n, rng, r=0.5):
    def side(m):
        t = rng.uniform(0, 2 * np.pi, m)
        return np.stack([r * np.cos(t), r * np.sin(t), rng.uniform(-1, 1, m)], 1)
    caps = lambda m: _ring(m, rng, r, rng.choice([-1.0, 1.0], m))  # noqa: E731
    return _disc_or_side(n, rng, 2 * r * 2 / (2 * r * 2 + 2 * r * r), side, caps)


def _cone(n, rng, r=0.6, h=2.0):
    def side(m):  # sqrt: lateral area grows linearly with distance from the apex
        d, t = np.sqrt(rng.random(m)), rng.uniform(0, 2 * np.pi, m)
        return np.stack([r * d * np.cos(t), r * d * np.sin(t), 1 - h * d], 1)
    lateral, base = r * np.hypot(r, h), r * r
    return _disc_or_side(n, rng, lateral / (lateral + base), side, lambda m: _ring(m, rng, r, 1 - h))


def _torus(n, rng, big=0.7, small=0.3):
    t, phi = rng.uniform(0, 2 * np.pi, n), _weighted_angle(small / big, n, rng)
    rho = big + small * np.cos(phi)
    return np.stack([rho * np.cos(t), rho * np.sin(t), small * np.sin(phi)], 1)


def _pyramid(n, rng, w=0.9, bottom=-0.6, top=0.6):
    base = [(-w, -w, bottom), (w, -w, bottom), (w, w, bottom), (-w, w, bottom)]
    base, apex = np.array(base), np.array([0.0, 0.0, top])
    tris = [(base[i], base[(i + 1) % 4] - base[i], apex - base[i], 1) for i in range(4)]
    tris.append((base[0], base[1] - base[0], base[3] - base[0], 0))
    return _planar(*zip(*tris), n, rng)


def _cross(n, rng, w=0.3):
    # Only the exterior of the union of three bars: each of the 6 arms contributes
    # an end cap and 4 sides; the faces of the shared central cube are all covered.
    eye, quads = np.eye(3), []
    for a in range(3):
        b, c = eye[(a + 1) % 3], eye[(a + 2) % 3]
        for s in (-1, 1):
            quads.append((s * eye[a] - w * b - w * c, 2 * w * b, 2 * w * c, 0))
            for p, q in ((b, c), (c, b)):
                quads += [(s * w * eye[a] + t * w * p - w * q, s * (1 - w) * eye[a], 2 * w * q, 0)
                          for t in (-1, 1)]
    return _planar(*zip(*quads), n, rng)


def _helix(n, rng, big=0.65, tube=0.13, turns=3):
    span = 2 * np.pi * turns
    rise = 2.0 / span  # dz per radian so the spring spans z in [-1, 1]
    speed, curv = np.hypot(big, rise), big / (big ** 2 + rise ** 2)
    t = rng.uniform(0, span, n)
    phi = _weighted_angle(-curv * tube, n, rng)  # outer side of the coil has more area
    cos, sin = np.cos(t), np.sin(t)
    centre = np.stack([big * cos, big * sin, rise * t - 1], 1)
    normal = np.stack([-cos, -sin, np.zeros(n)], 1)
    binormal = np.stack([rise * sin, -rise * cos, np.full(n, big)], 1) / speed
    return centre + tube * (np.cos(phi)[:, None] * normal + np.sin(phi)[:, None] * binormal)


_SAMPLERS = {"cube": _cube, "sphere": _sphere, "cylinder": _cylinder, "cone": _cone,
             "torus": _torus, "pyramid": _pyramid, "cross": _cross, "helix": _helix}


def _random_pose(rng):
    heading = rng.uniform(0, 2 * np.pi)
    axis = np.array([np.cos(heading), np.sin(heading), 0.0])  # tilt about a horizontal axis
    ang, yaw = rng.uniform(0, _TILT), rng.uniform(0, 2 * np.pi)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    tilt = np.eye(3) + np.sin(ang) * k + (1 - np.cos(ang)) * k @ k
    rz = np.array([[np.cos(yaw), -np.sin(yaw), 0], [np.sin(yaw), np.cos(yaw), 0], [0, 0, 1]])
    return rz @ tilt


def sample_cloud(shape, color, size, rng, num_points=8192):
    """One coloured surface cloud, float32 (num_points, 6): xyz then rgb in [0, 1]."""
    xyz = _SAMPLERS[shape](num_points, rng) * rng.uniform(0.9, 1.1, 3)
    xyz -= (xyz.min(0) + xyz.max(0)) / 2
    radius = SIZES[size]
    xyz *= radius / np.linalg.norm(xyz, axis=1).max()
    xyz = xyz @ _random_pose(rng).T
    direction = rng.standard_normal(3)
    xyz += direction / np.linalg.norm(direction) * rng.uniform(0, min(0.1, _MAX_EXTENT - radius))
    base = np.clip(np.asarray(COLORS[color]) + rng.uniform(-0.05, 0.05, 3), 0, 1)
    rgb = np.clip(base + rng.uniform(-0.02, 0.02, (num_points, 3)), 0, 1)
    return np.concatenate([xyz, rgb], 1).astype(np.float32)


# --- captions and splits ---
def _fill(template, shape, color, size):
    return re.sub(r"\ba (?=[aeiou])", "an ", template.format(shape=shape, color=color, size=size))


def canonical_caption(shape, color, size):
    return _fill(TEMPLATES[0], shape, color, size)


def make_captions(shape, color, size, rng, k):
    """k captions from k distinct templates (references for caption metrics)."""
    if not 1 <= k <= len(TEMPLATES):
        raise ValueError(f"need 1 <= k <= {len(TEMPLATES)}, got {k}")
    return [_fill(TEMPLATES[i], shape, color, size) for i in rng.choice(len(TEMPLATES), k, replace=False)]


def make_caption(shape, color, size, rng):
    return make_captions(shape, color, size, rng, 1)[0]


def heldout_combinations():
    colors = list(COLORS)
    return {(s, colors[(i + _HELDOUT_OFFSET) % len(colors)]) for i, s in enumerate(SHAPES)}


def _plan(split, n, rng):
    """(shape, colour, size) triples, balanced over shapes, colours and sizes.

    Block k holds every shape once with colour offset d_k (so every colour once)
    and size (s + k) % 3; as gcd(#offsets, 3) == 1, one cycle of blocks covers
    every allowed triple exactly once, and whole blocks keep prefixes balanced.
    """
    offsets = [_HELDOUT_OFFSET] if split == "test" else \
        [d for d in range(len(COLORS)) if d != _HELDOUT_OFFSET]
    colors, sizes, cycle = list(COLORS), list(SIZES), len(offsets) * len(SIZES)
    items = []
    while len(items) < n:
        for k in rng.permutation(cycle):
            items += [(SHAPES[s], colors[(s + offsets[k % len(offsets)]) % len(colors)],
                       sizes[(s + k) % len(sizes)]) for s in rng.permutation(len(SHAPES))]
    items = items[:n]
    return [items[i] for i in rng.permutation(n)]


# --- on-disk build ---
def _atomic_text(path, text):
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _build_split(root, split, n, seed, num_points, num_refs):
    rng = np.random.default_rng([seed, SPLITS.index(split)])  # independent of other splits
    points = os.path.join(root, f"{split}_points.npy")
    tmp = os.path.join(root, f".{split}_points.npy.{os.getpid()}.tmp")
    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, num_points, 6))
    lines = []
    for i, (shape, color, size) in enumerate(_plan(split, n, rng)):
        arr[i] = sample_cloud(shape, color, size, rng, num_points)
        caps = make_captions(shape, color, size, rng, num_refs)
        lines.append(json.dumps({"id": f"{split}_{i:05d}", "index": i, "shape": shape, "color": color,
                                 "size": size, "caption": caps[0], "captions": caps}))
    arr.flush()
    del arr  # release the mapping before the rename
    os.replace(tmp, points)
    text = "".join(line + "\n" for line in lines)
    _atomic_text(os.path.join(root, f"{split}.jsonl"), text)
    return {"num": n, "points": os.path.basename(points), "annotations": f"{split}.jsonl",
            "annotations_sha256": hashlib.sha256(text.encode()).hexdigest()}


def embedded_params(seed=0, num_points=8192, sizes=None, num_refs=5):
    """The parameters that determine the data, in one canonical form (manifest and folder name)."""
    sizes = dict(DEFAULT_SPLIT_SIZES if sizes is None else sizes)
    unknown = set(sizes) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown splits {sorted(unknown)}; expected a subset of {SPLITS}")
    return {"seed": int(seed), "num_points": int(num_points), "num_refs": int(num_refs),
            "sizes": {k: int(v) for k, v in sorted(sizes.items())}}


def build_embedded_dataset(root, seed=0, num_points=8192, sizes=None, num_refs=5):
    """Write {split}_points.npy / {split}.jsonl / manifest.json into root; skip if up to date."""
    root = os.fspath(root)
    params = embedded_params(seed, num_points, sizes, num_refs)
    manifest_path = os.path.join(root, "manifest.json")
    try:
        with open(manifest_path, encoding="utf-8") as f:
            old = json.load(f)
        if old.get("version") == VERSION and old.get("params") == params and all(
                os.path.exists(os.path.join(root, s[key])) for s in old["splits"].values()
                for key in ("points", "annotations")):
            return root
    except (OSError, ValueError, KeyError, TypeError):
        pass
    os.makedirs(root, exist_ok=True)
    try:
        os.remove(manifest_path)  # a half-finished rebuild must never look valid
    except FileNotFoundError:
        pass
    splits = {s: _build_split(root, s, params["sizes"][s], params["seed"], params["num_points"],
                              params["num_refs"]) for s in SPLITS if s in params["sizes"]}
    manifest = {"version": VERSION, "params": params, "splits": splits, "shapes": list(SHAPES),
                "colors": list(COLORS), "sizes": list(SIZES),
                "heldout": sorted(map(list, heldout_combinations()))}
    _atomic_text(manifest_path, json.dumps(manifest, indent=2))
    return root


def embedded_folder(root=None, **params):
    """<root>/shapes_v1_<8 hex of the parameters>: each parameter set has its own folder, so a run
    with other parameters (a smoke test, a concurrent job) never rebuilds the one another run reads.

    root defaults to $LAVIS_POINT_CACHE, else ~/.cache/lavis_point.
    """
    from lavis_point.paths import cache_root

    key = json.dumps(embedded_params(**params), sort_keys=True, separators=(",", ":"))
    name = f"shapes_v{VERSION}_{hashlib.sha256(key.encode()).hexdigest()[:8]}"
    return os.path.join(os.path.expanduser(os.fspath(root or cache_root())), name)


def ensure_embedded_dataset(root=None, **params):
    """Build (if needed) into embedded_folder(root, **params) and return that folder."""
    folder = embedded_folder(root, **params)
    build_embedded_dataset(folder, **params)
    return folder
