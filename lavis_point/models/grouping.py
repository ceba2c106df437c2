"""Point grouping: farthest point sampling (FPS) of group centres, then k nearest neighbours.

Both are deterministic and defined by the ``reference_*`` functions below: FPS starts at point 0 of
every cloud and a tie for the farthest point goes to the lowest index; neighbours are ordered by
squared distance, then by index. Distances are float32 ``(dx*dx + dy*dy) + dz*dz``, summed in that
order, so every path computes bit-identical values and picks the same points (float32 ties between
neighbours are common in an 8192-point cloud: the index rule decides them).

Paths: on CPU with numba installed, the compiled kernels in ``grouping_kernels`` (bucketed FPS and
grid kNN, one cloud per thread); otherwise pure torch (the FPS loop and a top-k over one integer key
per point). ``LAVIS_POINT_GROUPING=torch`` forces the torch path.
"""
import os

import torch

from lavis_point.models import grouping_kernels


def _check(num_points, wanted, what):
    if wanted > num_points:
        raise ValueError(f"cannot pick {wanted} {what} from {num_points} points")


def _use_kernels(xyz: torch.Tensor) -> bool:
    return (grouping_kernels.available() and xyz.device.type == "cpu"
            and os.environ.get("LAVIS_POINT_GROUPING", "auto") != "torch")


def squared_distances(xyz: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """xyz (B, N, 3), centres (B, G, 3) -> (B, G, N) float32 squared distances, summed x, y, z."""
    x, y, z = xyz.float().unsqueeze(1).unbind(-1)  # each (B, 1, N)
    cx, cy, cz = centres.float().unsqueeze(2).unbind(-1)  # each (B, G, 1)
    return (x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2


def reference_farthest_point_sample(xyz: torch.Tensor, num_groups: int) -> torch.Tensor:
    """The definition, one torch step per centre: xyz (B, N, 3) -> (B, num_groups) indices.
    Also the fallback where the kernels do not run (no numba, or a GPU)."""
    batch, num_points, _ = xyz.shape
    _check(num_points, num_groups, "group centres")
    x, y, z = xyz.float().unbind(-1)  # each (B, N)
    idx = torch.zeros(batch, num_groups, dtype=torch.long, device=xyz.device)
    dist = torch.full((batch, num_points), float("inf"), device=xyz.device)
    farthest = torch.zeros(batch, 1, dtype=torch.long, device=xyz.device)
    for i in range(num_groups):
        idx[:, i] = farthest[:, 0]
        cx, cy, cz = x.gather(1, farthest), y.gather(1, farthest), z.gather(1, farthest)  # (B, 1)
        dist = torch.minimum(dist, (x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2)
        farthest = dist.argmax(-1, keepdim=True)  # the first maximum: lowest index wins ties
    return idx


def reference_knn(xyz: torch.Tensor, centres: torch.Tensor, k: int) -> torch.Tensor:
    """The definition: (B, G, k) indices of the k points nearest each centre, by (distance, index)."""
    _check(xyz.shape[1], k, "neighbours")
    return torch.sort(squared_distances(xyz, centres), dim=-1, stable=True).indices[..., :k]


def torch_knn(xyz: torch.Tensor, centres: torch.Tensor, k: int, spare: int = 8) -> torch.Tensor:
    """``reference_knn`` without a full sort: the ``k + spare`` nearest by a plain top-k, ordered by
    (distance, index). They hold the answer unless a tie at the k-th distance runs past the last
    one; such rows take one top-k over ``float bits * N + index`` (non-negative float32 order as their
    bits do, so that integer orders by distance, then index)."""
    _check(xyz.shape[1], k, "neighbours")
    d = squared_distances(xyz, centres)  # (B, G, N)
    n = d.shape[-1]
    m = min(n, k + spare)
    dist, idx = d.topk(m, dim=-1, largest=False, sorted=True)  # (B, G, m)
    idx, perm = idx.sort(dim=-1)
    dist, perm = dist.gather(-1, perm).sort(dim=-1, stable=True)
    idx = idx.gather(-1, perm)
    unsure = dist[..., k - 1] == dist[..., m - 1] if m < n else torch.zeros_like(dist[..., 0], dtype=torch.bool)
    if unsure.any():
        key = d[unsure].view(torch.int32).long() * n + torch.arange(n, device=d.device)
        idx[unsure] = key.topk(m, dim=-1, largest=False, sorted=True).values % n
    return idx[..., :k]


def farthest_point_sample(xyz: torch.Tensor, num_groups: int) -> torch.Tensor:
    """xyz (B, N, 3) -> indices (B, num_groups) of the FPS centres, starting at point 0."""
    if _use_kernels(xyz):
        _check(xyz.shape[1], num_groups, "group centres")
        return grouping_kernels.farthest_point_sample(xyz, num_groups)
    return reference_farthest_point_sample(xyz, num_groups)


def knn(xyz: torch.Tensor, centres: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (B, G, k) of the k points of xyz (B, N, 3) nearest each centre (B, G, 3), nearest first."""
    if _use_kernels(xyz):
        _check(xyz.shape[1], k, "neighbours")
        return grouping_kernels.knn(xyz, centres, k)
    return torch_knn(xyz, centres, k)


def group_points(points: torch.Tensor, num_groups: int, group_size: int):
    """points (B, N, C>=3, xyz first) -> neighbourhoods (B, G, k, C) with xyz made relative to
    their centre, and centres (B, G, 3)."""
    xyz = points[..., :3].contiguous()
    if not torch.isfinite(xyz).all():  # on every path: the torch one (CUDA) would fail obscurely or poison BatchNorm
        raise ValueError("point coordinates contain NaN or inf: grouping needs finite xyz")
    with torch.no_grad():
        centre_idx = farthest_point_sample(xyz, num_groups)
        centres = torch.gather(xyz, 1, centre_idx.unsqueeze(-1).expand(-1, -1, 3))
        neighbour_idx = knn(xyz, centres, group_size)  # (B, G, k)
    batch, channels = points.shape[0], points.shape[-1]
    flat = neighbour_idx.reshape(batch, -1, 1).expand(-1, -1, channels)
    groups = torch.gather(points, 1, flat).reshape(batch, num_groups, group_size, channels)
    rel_xyz = groups[..., :3] - centres.unsqueeze(2)
    return torch.cat([rel_xyz, groups[..., 3:]], dim=-1), centres
