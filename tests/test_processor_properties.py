"""Properties of the point processors over any finite cloud (hypothesis): the output is always a
float32 ``(num_points, 6)`` tensor of finite values in the documented ranges.

Documented ranges (point_processors.py): rgb in [-1, 1]; with normalisation, xyz inside the unit
sphere before augmentation, so inside ``max(scale) + shift * sqrt(3)`` after it (rotation about z
keeps the radius). Without normalisation coordinates pass through (times the augmentation), so those
clouds are drawn within +-1e30, where scaling and rotation cannot overflow float32.
"Finite" means finite in float32, what the processors compute in; a float64 cloud beyond float32's
range is refused with a clear error (the last property), never turned into inf or NaN.
"""
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lavis_point.data_io import PointCloudError, as_cloud
from lavis_point.processors.point_processors import PointEvalProcessor, PointTrainProcessor
from tests.seeded import seeded

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FLOAT32_MAX = float(np.finfo(np.float32).max)


def clouds(max_abs=FLOAT32_MAX, max_points=2000):
    """Finite (N, 3) or (N, 6) arrays of any float32/float64/float16/int dtype, N >= 1: random values,
    extremes, duplicates, denormals (hypothesis draws them all)."""
    def of(dtype, width, n):
        if np.issubdtype(dtype, np.integer):
            elements = st.integers(-2 ** 31, 2 ** 31 - 1) if dtype == np.int64 else st.integers(0, 255)
        else:
            bits = {np.float16: 16, np.float32: 32, np.float64: 64}[dtype]
            limit = float(dtype(min(max_abs, float(np.finfo(dtype).max))))  # exactly representable
            elements = st.floats(-limit, limit, allow_nan=False, allow_infinity=False, width=bits)
        return hnp.arrays(dtype, (n, width), elements=elements)

    return st.tuples(st.sampled_from([np.float32, np.float64, np.float16, np.int64, np.uint8]),
                     st.sampled_from([3, 6]), st.integers(1, max_points)).flatmap(lambda a: of(*a))


def check(out, num_points, radius=None):
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    assert out.shape == (num_points, 6)
    assert torch.isfinite(out).all()
    assert out[:, 3:].min() >= -1 and out[:, 3:].max() <= 1
    if radius is not None:
        assert out[:, :3].norm(dim=1).max() <= radius * (1 + 1e-5)


@SETTINGS
@given(cloud=clouds(), num_points=st.integers(1, 2048))
def test_eval_normalised_output_lies_in_the_unit_sphere(cloud, num_points):
    processor = PointEvalProcessor.from_config({"num_points": num_points})
    out = processor(cloud)
    check(out, num_points, radius=1.0)
    assert torch.equal(out, processor(cloud))  # deterministic


@SETTINGS
@given(cloud=clouds(), num_points=st.integers(1, 2048), scale=st.none() | st.tuples(
    st.floats(0.1, 1.0), st.floats(1.0, 3.0)), shift=st.floats(0, 0.5), rotate=st.booleans(),
    dropout=st.floats(0, 0.95), seed=st.none() | st.integers(0, 2 ** 31))
def test_train_output_stays_within_the_augmentation_bounds(cloud, num_points, scale, shift, rotate, dropout, seed):
    processor = seeded(PointTrainProcessor, {"num_points": num_points, "scale": scale, "shift": shift,
                                             "rotate": rotate, "dropout": dropout, "seed": seed})
    check(processor(cloud), num_points, radius=(scale[1] if scale else 1.0) + shift * math.sqrt(3))


@SETTINGS
@given(cloud=clouds(max_abs=1e30), num_points=st.integers(1, 2048), rotate=st.booleans())
def test_unnormalised_clouds_keep_their_coordinates_finite(cloud, num_points, rotate):
    processor = PointTrainProcessor.from_config({"num_points": num_points, "normalize": False, "rotate": rotate,
                                                 "scale": [0.8, 1.25], "shift": 0.1})
    check(processor(cloud), num_points)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # the cast being tested
@SETTINGS
@given(n=st.integers(1, 50), num_points=st.integers(1, 300), big=st.floats(3.5e38, 1e300))
def test_float64_beyond_float32_range_is_refused_not_made_infinite(n, num_points, big):
    cloud = np.zeros((n, 3))
    cloud[n // 2, 0] = big
    with pytest.raises(PointCloudError, match="NaN or infinite"):
        PointEvalProcessor.from_config({"num_points": num_points})(cloud)


def numpy_as_cloud(array):
    """What ``as_cloud`` computed before it was compiled, in numpy (about 400 us per 8192-point cloud,
    more than reading its file): the reference the compiled version must equal bit for bit."""
    integers = np.asarray(array).dtype.kind in "iu"
    a = np.asarray(array).astype(np.float32)
    bad = ~np.isfinite(a).all(axis=1)
    if bad.any():
        raise PointCloudError(f"{int(bad.sum())} points have NaN or infinite values")
    if a.shape[1] == 3:
        return np.concatenate([a, np.ones_like(a)], axis=1)
    rgb = a[:, 3:]
    if integers or rgb.max() > 1.5:  # the 0-255 rule (RGB_255_ABOVE) the numpy version was given since
        rgb = rgb / 255.0
    return np.concatenate([a[:, :3], np.clip(rgb, 0.0, 1.0)], axis=1)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # float64 beyond float32
@SETTINGS
@given(cloud=clouds(max_points=300), holes=st.lists(st.tuples(st.integers(0, 299), st.integers(0, 5),
                                                             st.sampled_from([np.nan, np.inf, -np.inf])),
                                                   max_size=3))
@example(cloud=np.full((2, 6), -0.0, np.float32), holes=[])  # np.clip makes -0 rgb +0
@example(cloud=np.array([[0, 0, 0, -0.0, 255, 7]], np.float32), holes=[])  # the same, 0-255
def test_as_cloud_equals_the_numpy_reference_bit_for_bit(cloud, holes):
    """Values, zeros' signs, 0-255 colours, white for xyz only, and for NaN or inf the same error."""
    if cloud.dtype.kind == "f":
        for row, col, value in holes:
            cloud[row % len(cloud), col % cloud.shape[1]] = value
    try:
        expected = numpy_as_cloud(cloud)
    except PointCloudError as e:
        with pytest.raises(PointCloudError, match=f"^{e}$"):
            as_cloud(cloud)
        return
    got = as_cloud(cloud)
    assert got.dtype == np.float32 and got.shape == expected.shape
    assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))
