import pytest
import torch

import lavis_point  # noqa: F401
from lavis_point.models.grouping import farthest_point_sample, group_points, knn
from lavis_point.models.point_bert import PointBertEncoder, conv_forward
from tests.layouts import point_encoder_layout, shapes_of


def tiny_encoder(**kw):
    cfg = dict(num_groups=16, group_size=8, width=48, depth=2, num_heads=4, drop_path_rate=0.0,
               pointnet_dims=(16, 32, 64), encoder_dims=32)
    cfg.update(kw)
    return PointBertEncoder(**cfg).eval()


def reference_fps(xyz, m):
    """The textbook loop, one cloud at a time."""
    chosen, dist = [0], torch.full((xyz.shape[0],), float("inf"))
    for _ in range(m - 1):
        dist = torch.minimum(dist, ((xyz - xyz[chosen[-1]]) ** 2).sum(-1))
        chosen.append(int(torch.argmax(dist)))
    return torch.tensor(chosen)


def test_fps_starts_at_first_point_and_matches_the_reference_loop():
    xyz = torch.rand(3, 200, 3)
    idx = farthest_point_sample(xyz, 20)
    assert (idx[:, 0] == 0).all()
    for b in range(3):
        assert torch.equal(idx[b], reference_fps(xyz[b], 20))


def test_knn_returns_nearest_points_nearest_first():
    xyz = torch.rand(1, 100, 3)
    centres = xyz[:, :4]
    idx = knn(xyz, centres, 5)
    d = torch.cdist(centres, xyz)[0]
    for g in range(4):
        expected = torch.argsort(d[g])[:5]
        assert torch.allclose(d[g][idx[0, g]], d[g][expected])
    assert (idx[0, :, 0] == torch.arange(4)).all()  # each centre is its own nearest point


def test_groups_hold_relative_xyz_and_untouched_colour():
    pts = torch.rand(2, 300, 6)
    groups, centres = group_points(pts, 10, 6)
    assert groups.shape == (2, 10, 6, 6) and centres.shape == (2, 10, 3)
    assert torch.allclose(groups[:, :, 0, :3], torch.zeros(2, 10, 3))  # the centre itself, relative
    colours = set(map(tuple, pts[..., 3:].reshape(-1, 3).tolist()))
    assert all(tuple(c) in colours for c in groups[..., 3:].reshape(-1, 3).tolist())


def test_output_is_one_token_per_group():
    enc = tiny_encoder()
    out = enc(torch.rand(2, 256, 6) * 2 - 1)
    assert out.shape == (2, 16, 48)


def test_changing_only_colours_changes_the_output():
    enc = tiny_encoder()
    pts = torch.rand(2, 256, 6) * 2 - 1
    recoloured = pts.clone()
    recoloured[..., 3:] = torch.rand(2, 256, 3) * 2 - 1
    a, b = enc(pts), enc(recoloured)
    assert (a - b).abs().max() > 1e-3


def test_gpt4point_layout_never_sees_colour():
    enc = tiny_encoder(channel_layout="gpt4point")
    pts = torch.rand(2, 256, 6) * 2 - 1
    recoloured = pts.clone()
    recoloured[..., 3:] = -pts[..., 3:]
    assert torch.allclose(enc(pts), enc(recoloured))


def test_unknown_channel_layout_is_refused():
    with pytest.raises(ValueError, match="channel_layout"):
        tiny_encoder(channel_layout="rgb_first")


def test_wrong_point_shape_is_refused():
    with pytest.raises(ValueError, match=r"\(B, N, 6\)"):
        tiny_encoder()(torch.rand(2, 256, 3))


def test_gpt4point_size_encoder_has_exactly_the_published_layout():
    enc = PointBertEncoder()
    assert shapes_of(enc.state_dict()) == point_encoder_layout()


@pytest.mark.parametrize("training", [True, False])
def test_mini_pointnet_matmul_forward_equals_the_conv_modules(training):
    """The forward runs the 1x1 convs as matmuls and splits the concat; outputs, gradients and
    BatchNorm running statistics must match the modules applied as written."""
    torch.manual_seed(0)
    fast = tiny_encoder().encoder.train(training)
    slow = tiny_encoder().encoder.train(training)
    slow.load_state_dict(fast.state_dict())
    groups = torch.randn(3, 5, 8, 6)
    out_fast, out_slow = fast(groups), conv_forward(slow, groups)
    assert torch.allclose(out_fast, out_slow, atol=1e-5)
    out_fast.square().sum().backward()
    out_slow.square().sum().backward()
    for (name, p), q in zip(fast.named_parameters(), slow.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-4, rtol=1e-4), name
    for (name, b), c in zip(fast.named_buffers(), slow.buffers()):
        assert torch.allclose(b.float(), c.float(), atol=1e-6), name
