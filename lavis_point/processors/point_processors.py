"""Point processors: a raw cloud (N, 3) or (N, 6) array -> the (num_points, 6) tensor models take.

Channels out: xyz (unit-sphere normalised unless ``normalize: false``), rgb in [-1, 1] (white when the
cloud has none). Input rgb may be in [0, 1] or [0, 255] (detected by its maximum).
``point_train`` adds augmentation, each part switchable: scale, shift, rotation about the up (z)
axis, point dropout. ``point_eval`` is deterministic: the same cloud always gives the same tensor.
"""
import math

import numpy as np
import torch
from lavis.common.registry import registry
from lavis.processors.base_processor import BaseProcessor

from lavis_point.data_io.clouds import PointCloudError, as_cloud  # noqa: F401  (PointCloudError: re-exported)


def normalize_unit_sphere(xyz: np.ndarray) -> np.ndarray:
    centred = xyz - xyz.mean(axis=0)
    radius = np.sqrt((centred ** 2).sum(axis=1)).max()
    return centred / radius if radius > 0 else centred


def resample(cloud: np.ndarray, num_points: int, rng) -> np.ndarray:
    """Exactly ``num_points`` rows: a subset without replacement when there are enough, otherwise
    every point once plus repeats. ``rng=None`` picks evenly spaced rows (deterministic)."""
    n = cloud.shape[0]
    if n >= num_points:
        idx = np.linspace(0, n - 1, num_points).round().astype(np.int64) if rng is None \
            else rng.choice(n, num_points, replace=False)
    else:
        extra = np.arange(num_points - n) % n if rng is None else rng.integers(0, n, num_points - n)
        idx = np.concatenate([np.arange(n), extra])
    return cloud[idx]


class PointProcessor(BaseProcessor):
    def __init__(self, num_points=8192, normalize=True, scale=None, shift=0.0, rotate=False, dropout=0.0,
                 seed=None):
        self.num_points, self.normalize = num_points, normalize
        self.scale, self.shift, self.rotate, self.dropout = scale, shift, rotate, dropout
        self.seed = seed

    @property
    def augments(self):
        return bool(self.scale) or self.shift > 0 or self.rotate or self.dropout > 0

    def __call__(self, array) -> torch.Tensor:
        cloud = as_cloud(array)
        rng = self._rng()
        cloud = resample(cloud, self.num_points, rng)
        xyz = normalize_unit_sphere(cloud[:, :3]) if self.normalize else cloud[:, :3]
        if rng is not None:
            xyz = self._augment(xyz, rng)
        out = np.concatenate([xyz, cloud[:, 3:] * 2.0 - 1.0], axis=1)  # (num_points, 6)
        if rng is not None and self.dropout > 0:
            # Dropped points become copies of the first point, colour included (PointNet++'s trick):
            # the shape stays fixed.
            drop = rng.random(len(out)) < rng.uniform(0, self.dropout)
            out = np.where(drop[:, None], out[:1], out)
        return torch.from_numpy(out.astype(np.float32))

    def _rng(self):
        """None (deterministic), a generator from ``seed``, or, to augment without a seed, one seeded
        from numpy's global generator: the run seeds it (DataLoader seeds it per worker) and a resume
        restores it, so a seeded run augments the same way every time."""
        if self.seed is not None:
            return np.random.default_rng(self.seed)
        return np.random.default_rng(np.random.randint(2 ** 31)) if self.augments else None

    def _augment(self, xyz, rng):
        if self.rotate:
            a = rng.uniform(0, 2 * math.pi)
            c, s = math.cos(a), math.sin(a)
            xyz = xyz @ np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=np.float32).T
        if self.scale:
            xyz = xyz * rng.uniform(*self.scale)
        if self.shift > 0:
            xyz = xyz + rng.uniform(-self.shift, self.shift, size=3)
        return xyz

    @classmethod
    def from_config(cls, cfg=None):
        cfg = cfg or {}
        scale = cfg.get("scale", None)
        return cls(num_points=cfg.get("num_points", 8192), normalize=cfg.get("normalize", True),
                   scale=tuple(scale) if scale else None, shift=cfg.get("shift", 0.0),
                   rotate=cfg.get("rotate", False), dropout=cfg.get("dropout", 0.0), seed=cfg.get("seed", None))


@registry.register_processor("point_train")
class PointTrainProcessor(PointProcessor):
    """Defaults to GPT4Point-style augmentation: scale 0.8-1.25, shift +-0.1, rotation about z."""

    @classmethod
    def from_config(cls, cfg=None):
        cfg = dict(cfg or {})
        defaults = {"scale": [0.8, 1.25], "shift": 0.1, "rotate": True, "dropout": 0.0}
        return super().from_config({**defaults, **cfg})


@registry.register_processor("point_eval")
class PointEvalProcessor(PointProcessor):
    @classmethod
    def from_config(cls, cfg=None):
        cfg = dict(cfg or {})
        for key in ("scale", "shift", "rotate", "dropout"):
            if cfg.get(key):
                raise ValueError(f"point_eval is deterministic: '{key}' augmentation belongs in point_train")
        return super().from_config(cfg)
