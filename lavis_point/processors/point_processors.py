"""Point processors: a raw cloud (N, 3) or (N, 6) array -> the (num_points, 6) tensor models take.

Channels out: xyz (unit-sphere normalised unless ``normalize: false``), rgb in [-1, 1] (white when the
cloud has none). Input rgb may be in [0, 1] or [0, 255] (detected by its maximum).
``point_train`` adds augmentation, each part switchable: scale, shift, rotation about the up (z)
axis, point dropout. ``point_eval`` is deterministic: the same cloud always gives the same tensor.

``processor.batch(clouds)`` does the same for a (B, N, 6) stack, one compiled kernel call per batch;
``processor.batch_from(parts, count)`` takes the batch's clouds where they lie (rows of memory-mapped
float16 shards: the kernel reads and converts them straight into the batch tensor, no copy before).
Shards converted with statistics (``cloud_statistics``: centre, radius, colour range per cloud) are
processed in one pass per cloud, in float32; without them (older shards, per-object files) in three,
which find the statistics first and transform in float64. The two agree to float32 rounding (rgb
exactly).
``processor(cloud)`` is that path with B = 1, so one item and a batch agree exactly when the draws
agree (a seed, or no augmentation).
"""
import math

import numba
import numpy as np
import torch
from lavis.common.registry import registry
from lavis.processors.base_processor import BaseProcessor
from llvmlite import binding as llvm_binding
from llvmlite import ir as llvm_ir
from numba import types
from numba.extending import intrinsic, overload

from lavis_point.data_io.clouds import RGB_255_ABOVE, PointCloudError, as_cloud  # noqa: F401  (re-exported)


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


@intrinsic
def _float32_from_bits(typingctx, bits):
    """The float32 whose bit pattern is the uint32 ``bits``."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], llvm_ir.FloatType())
    return types.float32(types.uint32), codegen


@intrinsic
def _float32_from_half(typingctx, bits):
    """The float32 value of the float16 whose bits are ``bits``: one hardware conversion (F16C)."""
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], llvm_ir.HalfType()), llvm_ir.FloatType())
    return types.float32(types.uint16), codegen


# The hardware conversion where numba compiles for this CPU and it has one (x86 since 2012); otherwise
# (numba told to target a generic CPU, say) the bit arithmetic below, which gives the same values.
_HARDWARE_HALF = numba.config.CPU_NAME is None and bool(llvm_binding.get_host_cpu_features().get("f16c"))


def _as_float32(value):
    """A stored value as float32 (compiled only: see its overload)."""
    raise NotImplementedError


@overload(_as_float32)
def _as_float32_overload(value):
    if value == types.uint16 and _HARDWARE_HALF:  # float16 bits: numba has no float16 on the CPU
        return lambda value: _float32_from_half(value)
    if value == types.uint16:
        def from_half(value):
            h = np.uint32(value)
            bits = (h & np.uint32(0x7FFF)) << np.uint32(13)  # exponent and mantissa in float32's places
            f = _float32_from_bits(bits) * np.float32(2.0 ** 112)  # rebias the exponent; exact, subnormals too
            if (h & np.uint32(0x7C00)) == np.uint32(0x7C00):  # inf and NaN keep their payload
                f = _float32_from_bits(bits | np.uint32(0x7F800000))
            return -f if h & np.uint32(0x8000) else f
        return from_half
    return lambda value: np.float32(value)


# Only reassociation and FMA contraction: the sums vectorise, and NaN/inf still reach them, which is
# how a batch finds clouds to send back through the validating per-item path. The three-pass kernel's
# centring, radius and transform are float64: a float32 cloud may span float32's whole range, where
# differences and squares would overflow or underflow in float32. The one-pass kernel's are float32:
# its input is float16 (|x| <= 65504) and its statistics are given, so there are no squares and no
# difference can overflow; it differs from the three passes by float32 rounding only.
_FASTMATH = {"reassoc", "contract"}


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _copy_counting(src, dst, sums, peaks):
    """dst[k] = src[k] as float32 over flat rows of 6 channels; sums[k % 48] += it (float64) and
    peaks[k % 48] = max. Blocks of 48 values (8 points) keep the loop one vectorisable stream."""
    m = src.shape[0]
    full = m - m % 48
    src_blocks, dst_blocks = src[:full].reshape((full // 48, 48)), dst[:full].reshape((full // 48, 48))
    for r in range(src_blocks.shape[0]):
        for k in range(48):
            v = _as_float32(src_blocks[r, k])
            dst_blocks[r, k] = v
            sums[k] += v
            peaks[k] = max(peaks[k], v)
    for k in range(full, m):
        v = _as_float32(src[k])
        dst[k] = v
        sums[k - full] += v
        peaks[k - full] = max(peaks[k - full], v)


@numba.njit(cache=True, nogil=True)
def _channel_sums(block_sums, block_peaks, sums):
    """The 48 lanes of ``_copy_counting`` -> sums[c] per channel; returns the rgb peak."""
    peak = np.float32(-np.inf)
    for c in range(6):
        total = 0.0
        for k in range(c, 48, 6):
            total += block_sums[k]
            if c >= 3:
                peak = max(peak, block_peaks[k])
        sums[c] = total
    return peak


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _radius2(y, mx, my, mz):
    """The largest squared distance of y's (n, 6) xyz rows from (mx, my, mz), in float64."""
    r2 = 0.0
    for i in range(y.shape[0]):
        dx, dy, dz = y[i, 0] - mx, y[i, 1] - my, y[i, 2] - mz
        r2 = max(r2, dx * dx + dy * dy + dz * dz)
    return r2


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _map_rows(src, dst, mx, my, mz, a, t, colour):
    """dst = src's flat rows of 6 (float16 as uint16 bits) transformed: xyz centred on (mx, my, mz)
    then @ a (3 x 3, the scale folded in) + t; rgb * colour clipped to [0, 1] and mapped to [-1, 1]. All
    float32 (see _FASTMATH): a third faster than float64, whose interleaved rows vectorise half as wide.
    Each value read once and written once; returns the float32 sum of what was read (non-finite: the
    source held NaN or inf; finite float16 cannot overflow it)."""
    lo, hi = np.float32(0), np.float32(1)
    a00, a01, a02, a10, a11, a12, a20, a21, a22 = a[0, 0], a[0, 1], a[0, 2], a[1, 0], a[1, 1], a[1, 2], \
        a[2, 0], a[2, 1], a[2, 2]
    t0, t1, t2 = t[0], t[1], t[2]
    total = np.float32(0)
    for i in range(dst.shape[0] // 6):  # flat indices 6 * i: a stride LLVM can see, so the loop vectorises
        k = 6 * i
        x, y, z = _as_float32(src[k]), _as_float32(src[k + 1]), _as_float32(src[k + 2])
        r, g, b = _as_float32(src[k + 3]), _as_float32(src[k + 4]), _as_float32(src[k + 5])
        total += (x + y) + (z + r) + (g + b)
        dx, dy, dz = x - mx, y - my, z - mz
        dst[k] = dx * a00 + dy * a10 + dz * a20 + t0
        dst[k + 1] = dx * a01 + dy * a11 + dz * a21 + t1
        dst[k + 2] = dx * a02 + dy * a12 + dz * a22 + t2
        dst[k + 3] = min(max(r * colour, lo), hi) * np.float32(2) - hi
        dst[k + 4] = min(max(g * colour, lo), hi) * np.float32(2) - hi
        dst[k + 5] = min(max(b * colour, lo), hi) * np.float32(2) - hi
    return total


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _map_in_place(dst, mx, my, mz, a, t, colour):
    """``_map_rows(dst, dst, ...)`` without the sum, written for one array: with two, LLVM's check
    that they do not overlap fails and it runs the scalar loop (a third slower)."""
    lo, hi = np.float32(0), np.float32(1)
    a00, a01, a02, a10, a11, a12, a20, a21, a22 = a[0, 0], a[0, 1], a[0, 2], a[1, 0], a[1, 1], a[1, 2], \
        a[2, 0], a[2, 1], a[2, 2]
    t0, t1, t2 = t[0], t[1], t[2]
    for i in range(dst.shape[0] // 6):
        k = 6 * i
        dx, dy, dz = dst[k] - mx, dst[k + 1] - my, dst[k + 2] - mz
        dst[k] = dx * a00 + dy * a10 + dz * a20 + t0
        dst[k + 1] = dx * a01 + dy * a11 + dz * a21 + t1
        dst[k + 2] = dx * a02 + dy * a12 + dz * a22 + t2
        dst[k + 3] = min(max(dst[k + 3] * colour, lo), hi) * np.float32(2) - hi
        dst[k + 4] = min(max(dst[k + 4] * colour, lo), hi) * np.float32(2) - hi
        dst[k + 5] = min(max(dst[k + 5] * colour, lo), hi) * np.float32(2) - hi


@numba.njit(cache=True, nogil=True)
def _affine(matrix, offset, inv):
    """(matrix * inv in float64, offset in float64): what ``_map_rows`` applies."""
    t = np.empty(3)
    for c in range(3):
        t[c] = np.float64(offset[c])
    return matrix.astype(np.float64) * inv, t


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _transform(x, rows, dest, start, normalize, matrix, offset, out, sums):
    """Cloud x[rows[j]] -> out[dest[j]] for each j; x (M, N, 6) float32, or float16 as its uint16 bits
    (read straight from a memory-mapped shard: no copy, no conversion pass), out (B, N, 6) float32.
    xyz centred and scaled to the unit sphere (if ``normalize``), then @ matrix[b] + offset[b]; rgb
    (0-255 when its maximum exceeds RGB_255_ABOVE) clipped to [0, 1] and mapped to [-1, 1]; rows rolled so that
    out[b, 0] is the cloud's row start[b]. sums (B, 6) float64: each channel's sum (non-finite = bad
    cloud). Three passes per cloud, for clouds whose statistics are not known (``_transform_known``):
    the first reads the source into out while summing, the second finds the radius, the third
    transforms in place; the last two stay in cache."""
    n = x.shape[1]
    block_sums, block_peaks = np.empty(48), np.empty(48, np.float32)
    for j in range(len(rows)):
        b, s = dest[j], start[dest[j]]
        src, y = x[rows[j]].reshape(-1), out[b]
        dst = y.reshape(-1)
        block_sums[:] = 0.0
        block_peaks[:] = -np.inf
        # source row i goes to output row i - s, wrapped: two runs of consecutive rows
        _copy_counting(src[6 * s:], dst[:6 * (n - s)], block_sums, block_peaks)
        _copy_counting(src[:6 * s], dst[6 * (n - s):], block_sums, block_peaks)
        peak = _channel_sums(block_sums, block_peaks, sums[b])
        mx, my, mz, inv = (sums[b, 0] / n, sums[b, 1] / n, sums[b, 2] / n, 1.0) if normalize else (0.0, 0.0, 0.0, 1.0)
        if normalize:
            r2 = _radius2(y, mx, my, mz)
            if r2 > 0:
                inv = 1.0 / math.sqrt(r2)
        a, t = _affine(matrix[b], offset[b], inv)
        colour = np.float32(1) / np.float32(255) if peak > RGB_255_ABOVE else np.float32(1)  # rgb 0-255, or 0-1
        _map_in_place(dst, mx, my, mz, a, t, colour)


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _transform_known(x, rows, dest, start, normalize, matrix, offset, out, sums, stats):
    """``_transform`` in one pass, for float16 clouds whose statistics the conversion stored
    (stats[rows[j]]: centre, radius, rgb 0-255 flag, as ``cloud_statistics`` computes them): each value
    is read from the shard, transformed and written once, in float32 (rgb as in ``_transform``, xyz
    within float32 rounding of it). sums[b, :] = the sum of every value read, so NaN or inf still marks
    the cloud bad (the statistics, made from the clean cloud, cannot)."""
    n = x.shape[1]
    for j in range(len(rows)):
        b, s, known = dest[j], start[dest[j]], stats[rows[j]]
        src, dst = x[rows[j]].reshape(-1), out[b].reshape(-1)
        mx, my, mz, inv = (known[0], known[1], known[2], 1.0) if normalize else (0.0, 0.0, 0.0, 1.0)
        if normalize and known[3] > 0:
            inv = 1.0 / known[3]
        a, t = _affine(matrix[b], offset[b], inv)  # float64, then each rounded once to float32
        mx, my, mz, a, t = np.float32(mx), np.float32(my), np.float32(mz), a.astype(np.float32), t.astype(np.float32)
        colour = np.float32(1) / np.float32(255) if known[4] > 0 else np.float32(1)
        total = _map_rows(src[6 * s:], dst[:6 * (n - s)], mx, my, mz, a, t, colour)
        total += _map_rows(src[:6 * s], dst[6 * (n - s):], mx, my, mz, a, t, colour)
        sums[b, :] = total


STATISTICS = ("centre x", "centre y", "centre z", "radius", "rgb 0-255")


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _statistics(x, stats):
    n = x.shape[1]
    y = np.empty((n, 6), np.float32)
    block_sums, block_peaks, sums = np.empty(48), np.empty(48, np.float32), np.empty(6)
    for j in range(x.shape[0]):
        block_sums[:] = 0.0
        block_peaks[:] = -np.inf
        _copy_counting(x[j].reshape(-1), y.reshape(-1), block_sums, block_peaks)
        peak = _channel_sums(block_sums, block_peaks, sums)
        mx, my, mz = sums[0] / n, sums[1] / n, sums[2] / n
        stats[j, 0], stats[j, 1], stats[j, 2] = mx, my, mz
        stats[j, 3] = math.sqrt(_radius2(y, mx, my, mz))
        stats[j, 4] = 1.0 if peak > RGB_255_ABOVE else 0.0


def cloud_statistics(clouds) -> np.ndarray:
    """(n, P, 6) float16 clouds -> (n, 5) float64: each cloud's xyz centre (the mean), its radius about
    that centre and 1.0 if its rgb is 0-255 (peak > RGB_255_ABOVE) else 0.0 (columns: ``STATISTICS``), computed by
    the kernel's own passes from the float16 values as stored, so that ``_transform_known`` gives what
    ``_transform`` gives. The float64 channel sums of at most 8192 float16 values are exact in any
    order, so a cloud rolled to another start row has the same centre."""
    clouds = np.ascontiguousarray(clouds, dtype=np.float16)
    if clouds.ndim != 3 or clouds.shape[2] != 6:
        raise PointCloudError(f"expected (n, P, 6) clouds, got shape {clouds.shape}")
    stats = np.empty((len(clouds), len(STATISTICS)))
    _statistics(clouds.view(np.uint16), stats)
    return stats


def _kernel_input(clouds, rows, positions, stats=None):
    """(clouds, rows, positions, stats) as the kernel takes them: float16 or float32 C-contiguous clouds
    (other dtypes, or a strided array, become a float32 copy of just the rows asked for), int64 indices,
    stats None or (M, 5) float64 (``cloud_statistics`` of the clouds, row for row)."""
    clouds = np.asarray(clouds)
    if clouds.ndim != 3 or clouds.shape[2] != 6 or clouds.shape[1] == 0:
        raise PointCloudError(f"expected (B, N, 6) clouds, got shape {clouds.shape}")
    rows, positions = np.asarray(rows, np.int64), np.asarray(positions, np.int64)
    if len(rows) != len(positions):
        raise ValueError(f"{len(rows)} rows for {len(positions)} batch positions")
    if len(rows) and (rows.min() < 0 or rows.max() >= len(clouds)):  # the kernel does not check
        raise IndexError(f"rows {rows.min()}..{rows.max()} asked of {len(clouds)} clouds")
    if stats is not None and (stats.shape != (len(clouds), len(STATISTICS)) or stats.dtype != np.float64):
        raise ValueError(f"statistics: expected ({len(clouds)}, {len(STATISTICS)}) float64 for {len(clouds)} "
                         f"clouds, got {stats.dtype} {stats.shape}")
    if clouds.dtype not in (np.float16, np.float32) or not clouds.flags.c_contiguous:
        clouds = np.ascontiguousarray(clouds[rows], dtype=np.float32)
        stats = None if stats is None else stats[rows]
        rows = np.arange(len(rows))
    return clouds, rows, positions, stats


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
        return self.batch(cloud[None])[0][0]

    def batch(self, clouds, out=None):
        """(B, N, 6) clouds -> ((B, num_points, 6) tensor, finite (B,) bool): ``batch_from`` over one array."""
        rows = np.arange(len(clouds))
        return self.batch_from([(clouds, rows, rows)], len(rows), out)

    def batch_from(self, parts, count, out=None):
        """A batch of ``count`` clouds taken where they lie: each part ``(clouds, rows, positions)`` or
        ``(clouds, rows, positions, stats)``, clouds an (M, N, 6) array (a memory-mapped shard, say),
        puts clouds[rows[k]] at batch position positions[k]. The kernel reads the rows straight into the
        batch (float16 converted as it goes; rows in ascending order read a shard front to back). Which
        kernel: with ``stats`` (the shard's ``cloud_statistics``, stored by the conversion), float16
        clouds and no resampling (clouds of ``num_points``), the one-pass ``_transform_known``;
        otherwise (shards written before statistics were stored, per-object files, resampled clouds)
        the three-pass ``_transform``, which finds each cloud's centre, radius and colour range itself.
        The two agree to float32 rounding (rgb exactly). -> ((count, num_points, 6)
        float32 tensor, finite (count,) bool); the tensor is ``out`` when given, so a caller can
        choose where the batch lives. Each cloud gets its own draws. A cloud with NaN or inf comes
        out as garbage with ``finite[b] = False``: send it through ``processor(cloud)`` for the error."""
        parts = [_kernel_input(*part) for part in parts]
        sizes = {clouds.shape[1] for clouds, _, _, _ in parts}
        if len(sizes) != 1:
            raise PointCloudError(f"clouds of one batch must have one size, got {sorted(sizes)} points")
        n = sizes.pop()
        if not np.array_equal(np.sort(np.concatenate([positions for _, _, positions, _ in parts])), np.arange(count)):
            raise ValueError(f"the parts must fill each of the {count} batch positions once")  # the kernel trusts them
        if out is None:
            out = torch.empty((count, self.num_points, 6))
        elif out.shape != (count, self.num_points, 6) or out.dtype != torch.float32 or not out.is_contiguous():
            raise ValueError(f"out: expected a contiguous float32 tensor of shape {(count, self.num_points, 6)}, "
                             f"got {out.dtype} {tuple(out.shape)}")
        draws = self._draws(self._rng(), n, 1 if self.seed is not None else count)
        if self.seed is not None:  # every cloud gets the seed's draws, as when each is processed alone
            draws = {k: None if v is None else np.ascontiguousarray(np.broadcast_to(v, (count,) + v.shape[1:]))
                     for k, v in draws.items()}
        start = np.zeros(count, np.int64) if draws["start"] is None else draws["start"]
        target, sums, finite = out.numpy(), np.empty((count, 6)), np.empty(count, bool)
        for clouds, rows, positions, stats in parts:
            if draws["rows"] is not None:  # resampled first, so the kernel's sums do not see every point
                full = clouds[rows]
                finite[positions] = np.isfinite(full).all(axis=(1, 2))
                clouds, rows, stats = clouds[rows[:, None], draws["rows"][positions]], np.arange(len(rows)), None
                # The colour range is the whole cloud's, not its sample's (which may miss the one bright
                # point): 0-255 clouds are brought to 0-1 here as the kernel would (times 1/255).
                wide = full[..., 3:].max(axis=(1, 2)) > RGB_255_ABOVE
                if wide.any():
                    clouds = clouds.astype(np.float32)
                    clouds[wide, :, 3:] *= np.float32(1) / np.float32(255)
            args = (clouds.view(np.uint16) if clouds.dtype == np.float16 else clouds, rows, positions, start,
                    self.normalize, draws["matrix"], draws["offset"], target, sums)
            if stats is None or clouds.dtype != np.float16:  # float32 may overflow the one pass's float32
                _transform(*args)
            else:
                _transform_known(*args, stats)
        if draws["rows"] is None:
            finite = np.isfinite(sums).all(axis=1)
        if draws["drop"] is not None:
            # Dropped points become copies of the first point, colour included (PointNet++'s trick):
            # the shape stays fixed.
            np.copyto(target, target[:, :1].copy(), where=draws["drop"][..., None])
        return out, finite

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
            if rng is not None and n < self.num_points:  # every row, then repeats: roll as above
                rows = np.stack([np.roll(r, -s) for r, s in zip(rows, rng.integers(0, self.num_points, count))])
        matrix = np.broadcast_to(np.eye(3, dtype=np.float32), (count, 3, 3))
        offset = np.zeros((count, 3), np.float32)
        if rng is not None:
            if self.rotate:
                a = rng.uniform(0, 2 * math.pi, count)
                c, s = np.cos(a), np.sin(a)
                # rows are applied as xyz @ matrix: the transpose of the rotation [[c, -s, 0], [s, c, 0], ...]
                matrix = np.zeros((count, 3, 3), np.float32)
                matrix[:, 0, 0], matrix[:, 0, 1], matrix[:, 1, 0], matrix[:, 1, 1], matrix[:, 2, 2] = c, s, -s, c, 1
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
        if cfg.get("seed") is not None:
            raise ValueError("point processors take no 'seed': one would give every cloud of every epoch the same "
                             "augmentation. The run's seed (run.seed) already makes augmentation reproducible")
        scale = cfg.get("scale", None)
        return cls(num_points=cfg.get("num_points", 8192), normalize=cfg.get("normalize", True),
                   scale=tuple(scale) if scale else None, shift=cfg.get("shift", 0.0),
                   rotate=cfg.get("rotate", False), dropout=cfg.get("dropout", 0.0))


@registry.register_processor("point_train")
class PointTrainProcessor(PointProcessor):
    """Augments by default: one scale factor in 0.8-1.25, a shift of up to +-0.1 per axis, a rotation
    about z (the up axis of Cap3D's clouds, rendered Z-up); ``dropout: p`` (off by default) drops a
    fraction drawn uniformly in [0, p] of each cloud's points."""

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
