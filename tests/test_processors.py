import numpy as np
import pytest
import torch

import lavis_point  # noqa: F401
from lavis_point.processors.point_processors import PointCloudError, PointEvalProcessor, PointTrainProcessor


def cloud(n=3000, colour=True, seed=0):
    rng = np.random.default_rng(seed)
    xyz = rng.normal(size=(n, 3)) * 3 + 5
    return np.concatenate([xyz, rng.random((n, 3))], axis=1) if colour else xyz


def test_eval_output_is_normalised_to_the_unit_sphere_with_rgb_in_minus_one_to_one():
    out = PointEvalProcessor.from_config({"num_points": 1024})(cloud())
    assert out.shape == (1024, 6) and out.dtype == torch.float32
    radius = out[:, :3].norm(dim=1)
    assert radius.max() <= 1 + 1e-5 and radius.max() > 0.9
    assert out[:, 3:].min() >= -1 and out[:, 3:].max() <= 1


def test_clouds_without_colour_become_white():
    out = PointEvalProcessor.from_config({"num_points": 256})(cloud(colour=False))
    assert torch.all(out[:, 3:] == 1.0)


def test_rgb_in_0_255_is_recognised():
    c = cloud()
    c[:, 3:] *= 255
    a = PointEvalProcessor.from_config({"num_points": 256})(c)
    b = PointEvalProcessor.from_config({"num_points": 256})(cloud())
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("n", [1, 10, 1023, 1024, 5000])
def test_any_number_of_points_is_resampled_to_the_configured_count(n):
    assert PointTrainProcessor.from_config({"num_points": 1024})(cloud(n)).shape == (1024, 6)


def test_eval_is_deterministic_and_train_is_not():
    c = cloud()
    ev = PointEvalProcessor.from_config({"num_points": 512})
    tr = PointTrainProcessor.from_config({"num_points": 512})
    assert torch.equal(ev(c), ev(c))
    assert not torch.equal(tr(c), tr(c))


def test_normalisation_can_be_switched_off():
    c = cloud() * 0.01
    out = PointEvalProcessor.from_config({"num_points": 256, "normalize": False})(c)
    assert out[:, :3].abs().max() < 0.5


def test_rotation_is_about_the_up_axis_only():
    c = cloud()
    ev = PointEvalProcessor.from_config({"num_points": 3000})(c)
    tr = PointTrainProcessor.from_config({"num_points": 3000, "scale": None, "shift": 0.0, "seed": 1})(c)
    assert torch.allclose(torch.sort(ev[:, 2]).values, torch.sort(tr[:, 2]).values, atol=1e-5)
    assert not torch.allclose(torch.sort(ev[:, 0]).values, torch.sort(tr[:, 0]).values, atol=1e-3)


@pytest.mark.parametrize("bad,reason", [
    (np.full((100, 6), np.nan), "NaN"),
    (np.zeros((0, 6)), "no points"),
    (np.zeros((100, 4)), "shape"),
    (np.zeros((6, 100, 1)), "shape"),
])
def test_bad_clouds_are_refused_with_the_reason(bad, reason):
    with pytest.raises(PointCloudError, match=reason):
        PointEvalProcessor.from_config({"num_points": 64})(bad)


def test_eval_refuses_augmentation_settings():
    with pytest.raises(ValueError, match="point_train"):
        PointEvalProcessor.from_config({"rotate": True})
