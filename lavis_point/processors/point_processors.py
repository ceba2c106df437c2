"""Point processors: a raw cloud (N, 3) or (N, 6) array -> the (num_points, 6) tensor models take.

Channels out: xyz (unit-sphere normalised unless ``normalize: false``), rgb in [-1, 1] (white when the
cloud has none). Input rgb may be in [0, 1] or [0, 255] (detected by its maximum).
``point_train`` adds augmentation, each part switchable: scale, shift, rotation about the up (z)
axis, point dropout. ``point_eval`` is deterministic: the same cloud always gives the same tensor.

``processor.batch(clouds)`` does the same for a (B, N, 6) stack in one compiled pass per cloud
(datasets call it for a batch of shard rows); ``processor(cloud)`` is that path with B = 1, so one
item and a batch agree exactly when the draws agree (a seed, or no augmentation).
"""
import math

import numba
import numpy as np
import torch
from lavis.common.registry import registry
from lavis.processors.base_processor import BaseProcessor

from lavis_point.data_io.clouds import PointCloudError, as_cloud  # noqa: F401  (PointCloudError: re-exported)


def resample_index(n: int, num_points: int, rng) -> np.ndarray:
    """Rows giving exactly ``num_points``: a subset without replacement when there are enough, otherwise
    every point once plus repeats. ``rng=None`` picks evenly spaced rows (deterministic)."""
    if n >= num_points:
        return np.linspace(0, n - 1, num_points).round().astype(np.int64) if rng is None \
            else rng.choice(n, num_points, replace=False)
    extra = np.arange(num_points - n) % n if rng is None else rng.integers(0, n, num_points - n)
    return np.concatenate([np.arange(n), extra])


def resample(cloud: np.ndarray, num_points: int, rng) -> np.ndarray:
    return cloud[resample_index(cloud.shape[0], num_points, rng)]


# Only reassociation and FMA contraction: the sums vectorise, and NaN/inf still reach them, which is
# how a batch finds clouds to send back through the validating per-item path. Centring, radius and
# transform are float64: a float32 cloud may span float32's whole range, where differences and
# squares would overflow or underflow in float32.
@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _transform(x, start, normalize, matrix, offset, out, sums):
    """x (B, N, 6) float32 -> out (B, N, 6): xyz centred and scaled to the unit sphere (if
    ``normalize``), then @ matrix[b] + offset[b]; rgb (0-255 when its maximum exceeds 1) clipped to
    [0, 1] and mapped to [-1, 1]; rows rolled so that out[b, 0] is x[b, start[b]].
    sums (B, 6) float64: each channel's sum (non-finite = bad cloud).
    Three passes over one cloud at a time, so the second and third read it from cache."""
    n = x.shape[1]
    lo, hi = np.float32(0), np.float32(1)
    for b in range(x.shape[0]):
        s0 = s1 = s2 = s3 = s4 = s5 = 0.0
        peak = np.float32(-np.inf)
        for i in range(n):
            s0 += x[b, i, 0]
            s1 += x[b, i, 1]
            s2 += x[b, i, 2]
            s3 += x[b, i, 3]
            s4 += x[b, i, 4]
            s5 += x[b, i, 5]
            peak = max(peak, max(x[b, i, 3], max(x[b, i, 4], x[b, i, 5])))
        sums[b, 0], sums[b, 1], sums[b, 2], sums[b, 3], sums[b, 4], sums[b, 5] = s0, s1, s2, s3, s4, s5
        mx, my, mz, inv = (s0 / n, s1 / n, s2 / n, 1.0) if normalize else (0.0, 0.0, 0.0, 1.0)
        if normalize:
            r2 = 0.0
            for i in range(n):
                dx, dy, dz = x[b, i, 0] - mx, x[b, i, 1] - my, x[b, i, 2] - mz
                r2 = max(r2, dx * dx + dy * dy + dz * dz)
            if r2 > 0:
                inv = 1.0 / math.sqrt(r2)
        # xyz @ (inv * matrix) + offset, in float64; the matrix in scalars, so the loop keeps them in registers
        a = matrix[b].astype(np.float64) * inv
        a00, a01, a02, a10, a11, a12, a20, a21, a22 = a[0, 0], a[0, 1], a[0, 2], a[1, 0], a[1, 1], a[1, 2], \
            a[2, 0], a[2, 1], a[2, 2]
        t0, t1, t2 = np.float64(offset[b, 0]), np.float64(offset[b, 1]), np.float64(offset[b, 2])
        # input row i goes to output row i - start[b], wrapped: two runs of consecutive rows
        for first, last, to in ((start[b], n, 0), (0, start[b], n - start[b])):
            for i in range(first, last):
                o = i - first + to
                dx, dy, dz = x[b, i, 0] - mx, x[b, i, 1] - my, x[b, i, 2] - mz
                out[b, o, 0] = dx * a00 + dy * a10 + dz * a20 + t0
                out[b, o, 1] = dx * a01 + dy * a11 + dz * a21 + t1
                out[b, o, 2] = dx * a02 + dy * a12 + dz * a22 + t2
            if peak > 1:  # rgb stored as 0-255
                for i in range(first, last):
                    for c in range(3, 6):
                        out[b, i - first + to, c] = min(max(x[b, i, c] / np.float32(255), lo), hi) * np.float32(2) - hi
            else:  # no division in the common case
                for i in range(first, last):
                    for c in range(3, 6):
                        out[b, i - first + to, c] = min(max(x[b, i, c], lo), hi) * np.float32(2) - hi


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
        a = np.asarray(array)
        if a.ndim == 2 and a.shape[1] == 6 and a.shape[0] > 0 and a.dtype.kind == "f":
            out, finite = self.batch(a[None])
            if finite[0]:
                return out[0]
        cloud = as_cloud(array)  # validates (errors say why) and makes (N, 6) float32
        return self._process(cloud[None], self._rng(), 1)[0]

    def batch(self, clouds):
        """(B, N, 6) clouds (float16 or float32) -> ((B, num_points, 6) tensor, finite (B,) bool).
        Each cloud gets its own draws. A cloud with NaN or inf comes out as garbage with
        ``finite[b] = False``: send it through ``processor(cloud)`` for the error."""
        clouds = np.asarray(clouds)
        if clouds.ndim != 3 or clouds.shape[2] != 6 or clouds.shape[1] == 0:
            raise PointCloudError(f"expected a (B, N, 6) batch of clouds, got shape {clouds.shape}")
        if clouds.dtype == np.float16:  # torch converts with the CPU's half-precision instructions
            clouds = torch.from_numpy(np.require(clouds, requirements="W")).float().numpy()  # (a map is read-only)
        clouds = np.ascontiguousarray(clouds, dtype=np.float32)
        sums = np.empty((len(clouds), 6))
        out = self._process(clouds, self._rng(), len(clouds), sums)
        # the kernel's sums cover every point only when no resampling came first
        finite = np.isfinite(sums).all(axis=1) if clouds.shape[1] == self.num_points \
            else np.isfinite(clouds).all(axis=(1, 2))
        return out, finite

    def _process(self, x, rng, count, sums=None):
        """x (B, N, 6) float32 -> (B, num_points, 6). With a seed every cloud gets the seed's draws,
        as when each is processed alone."""
        draws = self._draws(rng, x.shape[1], 1 if self.seed is not None else count)
        if self.seed is not None:
            draws = {k: None if v is None else np.ascontiguousarray(np.broadcast_to(v, (count,) + v.shape[1:]))
                     for k, v in draws.items()}
        if draws["rows"] is not None:
            x = x[np.arange(count)[:, None], draws["rows"]]  # (B, num_points, 6)
        out = np.empty(x.shape, np.float32)
        start = np.zeros(count, np.int64) if draws["start"] is None else draws["start"]
        _transform(x, start, self.normalize, draws["matrix"], draws["offset"], out,
                   np.empty((count, 6)) if sums is None else sums)
        out = torch.from_numpy(out)
        if draws["drop"] is not None:
            # Dropped points become copies of the first point, colour included (PointNet++'s trick):
            # the shape stays fixed.
            out = torch.where(torch.from_numpy(np.ascontiguousarray(draws["drop"]))[..., None], out[:, :1], out)
        return out

    def _draws(self, rng, n, count):
        """Every random choice for ``count`` clouds of n points, each its own: resampling (rows, or
        for n == num_points the row to start from), the xyz matrix and offset, dropped points."""
        start = rows = drop = None
        if rng is not None and n == self.num_points:
            # No subset to draw: the same points, rolled to start at a random row. Order reaches the
            # model through point 0 (FPS starts there, dropout copies it) and the lowest-index rule
            # that breaks FPS and kNN ties; the roll makes both random per pass without the cost of
            # a full shuffle (whose other orders the model cannot tell apart except at ties).
            start = rng.integers(0, n, count)
        elif n != self.num_points:
            rows = np.stack([resample_index(n, self.num_points, rng) for _ in range(count)])
        matrix = np.broadcast_to(np.eye(3, dtype=np.float32), (count, 3, 3))
        offset = np.zeros((count, 3), np.float32)
        if rng is not None:
            if self.rotate:
                a = rng.uniform(0, 2 * math.pi, count)
                c, s, zero, one = np.cos(a), np.sin(a), np.zeros(count), np.ones(count)
                # rows are applied as xyz @ matrix: the transpose of the rotation [[c, -s, 0], [s, c, 0], ...]
                matrix = np.stack([np.stack([c, s, zero], -1), np.stack([-s, c, zero], -1),
                                   np.stack([zero, zero, one], -1)], 1).astype(np.float32)
            if self.scale:
                matrix = matrix * rng.uniform(*self.scale, count).astype(np.float32)[:, None, None]
            if self.shift > 0:
                offset = rng.uniform(-self.shift, self.shift, (count, 3)).astype(np.float32)
            if self.dropout > 0:
                drop = rng.random((count, self.num_points)) < rng.uniform(0, self.dropout, count)[:, None]
        return {"start": start, "rows": rows, "matrix": np.ascontiguousarray(matrix), "offset": offset,
                "drop": drop}

    def _rng(self):
        """None (deterministic), a generator from ``seed``, or, to augment without a seed, one seeded
        from numpy's global generator: the run seeds it (DataLoader seeds it per worker) and a resume
        restores it, so a seeded run augments the same way every time."""
        if self.seed is not None:
            return np.random.default_rng(self.seed)
        return np.random.default_rng(np.random.randint(2 ** 31)) if self.augments else None

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
