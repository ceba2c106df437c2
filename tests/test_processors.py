import numpy as np
import pytest
import torch

import lavis_point  # noqa: F401
from lavis_point.processors.point_processors import (PointCloudError, PointEvalProcessor, PointTrainProcessor,
                                                     cloud_statistics)
from tests.seeded import seeded
from tests.rounding import assert_within_rounding, one_pass_tolerance


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
    tr = seeded(PointTrainProcessor, {"num_points": 3000, "scale": None, "shift": 0.0, "seed": 1})(c)
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


def only(**switches):
    """A train processor with every augmentation off except ``switches`` (as a YAML would set them)."""
    cfg = {"num_points": 2048, "scale": None, "shift": 0.0, "rotate": False, "dropout": 0.0, **switches}
    return seeded(PointTrainProcessor, cfg)


def by_colour(points):
    """Rows ordered by their red channel: random colours are unique, so this undoes resampling's order."""
    return points[torch.argsort(points[:, 3])]


def test_train_defaults_are_gpt4point_augmentation():
    p = PointTrainProcessor.from_config({})
    assert (p.scale, p.shift, p.rotate, p.dropout, p.num_points) == ((0.8, 1.25), 0.1, True, 0.0, 8192)


def test_with_every_augmentation_switched_off_train_equals_eval():
    c = cloud(2048)
    assert torch.equal(only()(c), PointEvalProcessor.from_config({"num_points": 2048})(c))


def test_scale_multiplies_xyz_by_one_factor_in_range_and_leaves_colour():
    c, ev = cloud(2048), PointEvalProcessor.from_config({"num_points": 2048})(cloud(2048))
    factors = []
    for seed in range(20):
        out = by_colour(only(scale=[0.8, 1.25], seed=seed)(c))
        ev = by_colour(ev)
        factor = float((out[:, :3] * ev[:, :3]).sum() / (ev[:, :3] ** 2).sum())  # least squares
        assert torch.allclose(out[:, :3], factor * ev[:, :3], atol=1e-5)
        assert torch.equal(out[:, 3:], ev[:, 3:])
        factors.append(factor)
    assert 0.8 <= min(factors) < max(factors) <= 1.25 and max(factors) - min(factors) > 0.2


def test_shift_moves_the_whole_cloud_by_at_most_the_configured_amount():
    c, ev = cloud(2048), PointEvalProcessor.from_config({"num_points": 2048})(cloud(2048))
    for seed in range(20):
        delta = by_colour(only(shift=0.1, seed=seed)(c))[:, :3] - by_colour(ev)[:, :3]
        assert torch.allclose(delta, delta[:1].expand_as(delta), atol=1e-5)
        assert delta[0].abs().max() <= 0.1 + 1e-6 and delta[0].abs().max() > 0


def test_dropout_replaces_whole_points_with_the_first_one():
    c = cloud(2048)
    plain, dropped = only()(c), only(dropout=0.9, seed=2)(c)
    is_first = (dropped == dropped[:1]).all(dim=1)
    assert 0 < is_first[1:].sum() < 2048 * 0.9 and (plain == plain[:1]).all(dim=1)[1:].sum() == 0
    survivors, plain = by_colour(dropped[~is_first]), by_colour(plain)
    same_colour = torch.isin(plain[:, 3], survivors[:, 3])
    assert torch.allclose(survivors, plain[same_colour], atol=1e-5)  # survivors keep xyz and colour


def test_float16_clouds_from_shards_are_accepted():
    c = cloud(2048)
    c[:, :3] /= 10  # keep xyz in float16's precise range
    a = PointEvalProcessor.from_config({"num_points": 2048})(c.astype(np.float16))
    b = PointEvalProcessor.from_config({"num_points": 2048})(c)
    assert torch.allclose(a, b, atol=5e-3)


def test_float16_is_read_exactly_and_inf_or_nan_marks_the_cloud_bad():
    halfs = np.arange(2 ** 16, dtype=np.uint16).view(np.float16)
    finite = halfs[np.isfinite(halfs)]  # every finite float16: subnormals, zeros, the largest
    xyz = np.zeros(-(-len(finite) // 3) * 3, np.float16)
    xyz[:len(finite)] = finite
    c = np.concatenate([xyz.reshape(-1, 3), np.zeros((len(xyz) // 3, 3), np.float16)], axis=1)
    processor = PointEvalProcessor.from_config({"num_points": len(c), "normalize": False})
    out, ok = processor.batch(c[None])
    assert ok[0] and np.array_equal(out[0, :, :3].numpy(), c[:, :3].astype(np.float32))
    for bad in (np.inf, -np.inf, np.nan):
        c[5, 1] = bad
        assert not processor.batch(c[None])[1][0]
        with pytest.raises(PointCloudError):
            processor(c)


def shard_of(count=6, n=1024):
    """float16 clouds as a shard holds them, every other one with rgb in 0-255."""
    clouds = np.stack([cloud(n, seed=k) for k in range(count)])
    clouds[::2, :, 3:] *= 255
    return clouds.astype(np.float16)


def test_statistics_are_the_centre_radius_and_colour_range_of_the_stored_values():
    shard = shard_of()
    stats = cloud_statistics(shard)
    xyz = shard[:, :, :3].astype(np.float64)
    centre = xyz.sum(axis=1) / shard.shape[1]  # float64 sums of float16 values are exact in any order
    assert np.array_equal(stats[:, :3], centre)
    assert np.allclose(stats[:, 3], np.linalg.norm(xyz - centre[:, None], axis=2).max(axis=1), rtol=1e-12)
    assert stats[:, 4].tolist() == [1.0, 0.0] * 3


@pytest.mark.parametrize("config", [{}, {"normalize": False}, {"seed": 4}, {"seed": 4, "dropout": 0.3},
                                    {"seed": 4, "normalize": False}])
def test_one_pass_with_stored_statistics_gives_what_three_passes_give_to_float_rounding(config):
    shard = shard_of()
    stats, rows, positions = cloud_statistics(shard), [0, 2, 3, 5], [2, 0, 3, 1]
    processor = seeded(PointTrainProcessor if "seed" in config else PointEvalProcessor,
                       {"num_points": shard.shape[1], **config})
    tolerance = one_pass_tolerance(stats[rows], max(processor.scale or (1.0,)), processor.shift, processor.normalize)
    three, ok3 = processor.batch_from([(shard, rows, positions)], 4)
    one, ok1 = processor.batch_from([(shard, rows, positions, stats)], 4)
    assert ok3.all() and ok1.all()
    assert_within_rounding(one, three, tolerance)
    assert tolerance < 3e-6 or not processor.normalize  # a few float32 ulps of the unit sphere
    if processor.normalize:  # the comparison sees a slightly wrong centre or radius
        for column in (0, 3):
            wrong = stats.copy()
            wrong[:, column] *= 1 + 1e-4
            with pytest.raises(AssertionError, match="more than rounding explains"):
                assert_within_rounding(processor.batch_from([(shard, rows, positions, wrong)], 4)[0], three, tolerance)
    wrong = stats.copy()
    wrong[:, 4] = 1 - wrong[:, 4]  # colour range
    with pytest.raises(AssertionError):
        assert_within_rounding(processor.batch_from([(shard, rows, positions, wrong)], 4)[0], three, tolerance)


def test_float32_clouds_with_statistics_take_the_three_pass_kernel():
    """The one pass computes in float32, safe for float16 values only: float32 clouds spanning float32's
    range would overflow it, so statistics given with them are not used."""
    big = np.zeros((1, 8, 6), np.float32)
    big[0, :4, 0], big[0, 4:, 0] = -3e38, 3e38
    processor = PointEvalProcessor.from_config({"num_points": 8})
    out, ok = processor.batch_from([(big, [0], [0], np.array([[0.0, 0, 0, 3e38, 0]]))], 1)
    assert ok.all() and torch.equal(out, processor.batch_from([(big, [0], [0])], 1)[0])
    assert torch.allclose(out[0, :, 0], torch.tensor([-1.0] * 4 + [1.0] * 4))


def test_one_pass_reads_float16_exactly_and_still_marks_inf_or_nan_clouds_bad():
    halfs = np.arange(2 ** 16, dtype=np.uint16).view(np.float16)
    finite = halfs[np.isfinite(halfs)]
    c = np.zeros((2, -(-len(finite) // 3), 6), np.float16)
    c[:, :, :3].reshape(2, -1)[:, :len(finite)] = finite
    stats = cloud_statistics(c)  # made from the clean clouds, as a conversion makes them
    processor = PointEvalProcessor.from_config({"num_points": c.shape[1], "normalize": False})
    out, ok = processor.batch_from([(c, [0, 1], [0, 1], stats)], 2)
    assert ok.all() and np.array_equal(out[:, :, :3].numpy(), c[:, :, :3].astype(np.float32))
    for bad in (np.inf, -np.inf, np.nan):
        c[1, 5, 4] = bad  # the statistics stay those of the clean cloud: only the read can tell
        assert processor.batch_from([(c, [0, 1], [0, 1], stats)], 2)[1].tolist() == [True, False]
        with pytest.raises(PointCloudError):
            processor(c[1])


def test_statistics_that_do_not_fit_the_clouds_are_refused():
    shard = shard_of()
    with pytest.raises(ValueError, match=r"statistics: expected \(6, 5\) float64"):
        PointEvalProcessor.from_config({"num_points": shard.shape[1]}).batch_from(
            [(shard, [0], [0], cloud_statistics(shard)[:5])], 1)


def test_colour_a_little_over_one_is_clipped_not_read_as_0_255():
    """One value of 1.004 (0-1 colour that overshoots) must not divide the whole cloud by 255."""
    from lavis_point.data_io import as_cloud

    c = cloud(4096)
    c[:, 3:] = 0.2 + 0.7 * c[:, 3:]
    c[17, 5] = 1.004
    assert np.allclose(as_cloud(c)[:, 3:], np.clip(c[:, 3:], 0, 1), atol=1e-6)
    for num_points in (4096, 1024):  # the kernel on the whole cloud, and on a sample of it
        out = PointEvalProcessor.from_config({"num_points": num_points, "normalize": False})(c)
        assert out[:, 3:].mean() > 0  # coloured, not black (-1)


def test_integer_colours_are_0_255_however_dark():
    """A uint8 cloud whose colours are all 0 or 1 is near-black, not white."""
    from lavis_point.data_io import as_cloud

    c = np.concatenate([np.round(cloud(100)[:, :3]), np.random.default_rng(0).integers(0, 2, (100, 3))], axis=1)
    assert np.array_equal(as_cloud(c.astype(np.uint8))[:, 3:], (c[:, 3:] / 255.0).astype(np.float32))
    out = PointEvalProcessor.from_config({"num_points": 100})(c.astype(np.uint8))
    assert out[:, 3:].max() < -0.99


def test_the_colour_range_is_the_whole_clouds_not_its_samples():
    """A 0-255 cloud, dark but for one bright point: every epoch's sample of 1024 of its 4096 points,
    with or without that point, reads as 0-255 (near black), never as 0-1 (white)."""
    c = cloud(4096)
    c[:, 3:] = 1.0
    c[123, 3:] = 200.0
    processor = PointTrainProcessor.from_config({"num_points": 1024, "scale": None, "shift": 0.0, "rotate": False})
    np.random.seed(0)
    for _ in range(8):
        rgb = processor(c)[:, 3:]
        assert rgb.min() < -0.99 and rgb.max() <= 2 * 200 / 255 - 1 + 1e-6


def test_a_processor_seed_in_yaml_is_refused():
    with pytest.raises(ValueError, match="no 'seed'.*run.seed"):
        PointTrainProcessor.from_config({"seed": 3})


def test_a_cloud_with_fewer_points_starts_at_a_random_point_in_training():
    """FPS starts at point 0 and dropout copies it: upsampled clouds must not always start at row 0."""
    c = cloud(1000)
    processor = PointTrainProcessor.from_config({"num_points": 1024, "scale": None, "shift": 0.0})  # rotates
    rgb = torch.tensor(c[:, 3:] * 2 - 1, dtype=torch.float32)  # each point's colour names it
    np.random.seed(0)
    firsts = [processor(c)[0, 3:] for _ in range(8)]
    rows = {int(torch.isclose(rgb, f, atol=1e-6).all(dim=1).nonzero()[0]) for f in firsts}
    assert len(rows) > 4
