"""How far float rounding lets the one-pass kernel (float16 clouds with stored statistics, float32
arithmetic) differ from the three-pass kernel (float64 arithmetic) on the same clouds."""
import numpy as np
import torch

U = 2.0 ** -24  # float32's unit roundoff: half an ulp of 1


def one_pass_tolerance(stats, scale=1.0, shift=0.0, normalize=True):
    """The largest |one pass - three passes| of an xyz value that float32 rounding explains, for clouds
    with these statistics (rows of ``cloud_statistics``: centre m, radius r) under augmentation up to
    ``scale`` and ``shift``. The one pass rounds the centre (u |m_i| each), the differences d = x - m
    (u |d_i|, |d_i| <= r), the matrix (|a_ij| <= scale / r) and its three multiply-adds plus the
    offset; the three passes round their float64 result once. To first order that is at most
    u * (scale * (|m|_1 / r + 19) + 5 * shift) on the unit sphere; without normalising, r is the
    largest |x| (m is not subtracted) and the bound scales with it."""
    centre, radius = stats[:, :3], stats[:, 3]
    if not normalize:
        return U * (scale * 19 * float((np.linalg.norm(centre, axis=1) + radius).max()) + 5 * shift)
    ratio = np.abs(centre).sum(axis=1) / np.where(radius > 0, radius, 1.0)
    return U * (scale * (float(ratio.max()) + 19) + 5 * shift)


def assert_within_rounding(one, three, tolerance):
    """rgb equal (both kernels compute it alike, in float32), xyz within ``tolerance``."""
    assert one.shape == three.shape
    assert torch.equal(one[..., 3:], three[..., 3:])
    error = float((one[..., :3] - three[..., :3]).abs().max())
    assert error <= tolerance, f"xyz differ by {error:.3g}, more than rounding explains ({tolerance:.3g})"
