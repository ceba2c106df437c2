"""Grouping: the compiled kernels and the torch fallback pick exactly the reference's centres and
neighbours, ties included, and the encoder uses the kernels by default."""
import numpy as np
import pytest
import torch

from lavis_point.datasets.shapes import SHAPES, sample_cloud
from lavis_point.models import grouping, grouping_kernels
from lavis_point.models.point_bert import PointBertEncoder


def surface_clouds(num_points=2048):
    rng = np.random.default_rng(0)
    return torch.from_numpy(np.stack([sample_cloud(s, "red", "large", rng, num_points)[:, :3] for s in SHAPES]))


def lattice_clouds(num_points=1024):
    """Points on a 12^3 integer lattice (duplicates too): exact distance ties everywhere."""
    return torch.randint(0, 12, (3, num_points, 3), generator=torch.Generator().manual_seed(1)).float()


CLOUDS = {
    "surface": surface_clouds,
    "uniform": lambda: torch.rand(3, 1500, 3, generator=torch.Generator().manual_seed(2)),
    "lattice": lattice_clouds,
}


def centres_of(xyz, idx):
    return torch.gather(xyz, 1, idx.unsqueeze(-1).expand(-1, -1, 3))


def test_numba_kernels_are_installed():
    # numba is a declared dependency: CI must exercise the kernels, not only the fallback.
    assert grouping_kernels.available()


@pytest.mark.parametrize("name", sorted(CLOUDS))
def test_kernel_fps_picks_the_reference_centres(name):
    xyz = CLOUDS[name]()
    expected = grouping.reference_farthest_point_sample(xyz, 128)
    assert expected[:, 0].eq(0).all()
    assert torch.equal(grouping_kernels.farthest_point_sample(xyz, 128), expected)


@pytest.mark.parametrize("name", sorted(CLOUDS))
def test_kernel_knn_picks_the_reference_neighbours_in_order(name):
    xyz = CLOUDS[name]()
    centres = centres_of(xyz, grouping.reference_farthest_point_sample(xyz, 64))
    expected = grouping.reference_knn(xyz, centres, 32)
    assert torch.equal(grouping_kernels.knn(xyz, centres, 32), expected)


@pytest.mark.parametrize("name", sorted(CLOUDS))
def test_torch_knn_picks_the_reference_neighbours_in_order(name):
    xyz = CLOUDS[name]()
    centres = centres_of(xyz, grouping.reference_farthest_point_sample(xyz, 64))
    assert torch.equal(grouping.torch_knn(xyz, centres, 32), grouping.reference_knn(xyz, centres, 32))


def test_reference_knn_breaks_distance_ties_by_lowest_index():
    # Four points at distance 1 from the centre (index 0) and one at distance 4.
    xyz = torch.tensor([[[0.0, 0, 0], [2, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 1], [-1, 0, 0]]])
    centre = xyz[:, :1]
    assert grouping.reference_knn(xyz, centre, 4).tolist() == [[[0, 2, 3, 4]]]
    assert grouping_kernels.knn(xyz, centre, 4).tolist() == [[[0, 2, 3, 4]]]
    assert grouping.torch_knn(xyz, centre, 4, spare=0).tolist() == [[[0, 2, 3, 4]]]


def test_kernels_handle_a_cloud_of_one_repeated_point():
    xyz = torch.ones(1, 50, 3)
    assert grouping_kernels.farthest_point_sample(xyz, 5).tolist() == [[0, 0, 0, 0, 0]]
    assert grouping_kernels.knn(xyz, xyz[:, :1], 3).tolist() == [[[0, 1, 2]]]


def test_kernel_knn_finds_neighbours_of_a_centre_outside_the_cloud():
    xyz = torch.rand(2, 400, 3, generator=torch.Generator().manual_seed(3))
    centres = torch.tensor([[[3.0, -2.0, 0.5]], [[0.5, 0.5, 0.5]]])
    assert torch.equal(grouping_kernels.knn(xyz, centres, 10), grouping.reference_knn(xyz, centres, 10))


@pytest.mark.parametrize("path", ["auto", "torch"])  # torch: what a CUDA tensor takes
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_coordinates_are_refused(monkeypatch, path, bad):
    monkeypatch.setenv("LAVIS_POINT_GROUPING", path)
    xyz = torch.rand(1, 64, 3)
    xyz[0, 5, 1] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        grouping.group_points(xyz, 8, 4)


def test_asking_for_more_centres_or_neighbours_than_points_fails():
    xyz = torch.rand(1, 16, 3)
    with pytest.raises(ValueError, match="cannot pick 17 group centres from 16 points"):
        grouping.farthest_point_sample(xyz, 17)
    with pytest.raises(ValueError, match="cannot pick 17 neighbours from 16 points"):
        grouping.knn(xyz, xyz[:, :2], 17)


def test_group_points_uses_the_kernels_by_default(monkeypatch):
    calls = []
    original = grouping_kernels.farthest_point_sample
    monkeypatch.setattr(grouping_kernels, "farthest_point_sample", lambda *a: calls.append(1) or original(*a))
    grouping.group_points(torch.rand(2, 256, 6), 16, 8)
    assert calls == [1]


def test_encoder_output_is_the_same_on_the_kernels_and_the_torch_path(monkeypatch):
    encoder = PointBertEncoder(num_groups=32, group_size=16, width=32, depth=1, num_heads=4,
                               pointnet_dims=(16, 16, 32), encoder_dims=16).eval()
    points = torch.cat([surface_clouds(1024)[:2], torch.rand(2, 1024, 3)], dim=-1)
    with torch.no_grad():
        fast = encoder(points)
        monkeypatch.setenv("LAVIS_POINT_GROUPING", "torch")
        slow = encoder(points)
    assert torch.equal(fast, slow)
