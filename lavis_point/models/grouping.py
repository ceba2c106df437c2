"""Point grouping: farthest point sampling (FPS) of group centres, then k nearest neighbours.

Both are deterministic: FPS starts at point 0 of every cloud and ties resolve to the lowest index,
so the same cloud always gives the same tokens (needed for reproducible eval and for the reference
comparisons in the tests).
"""
import torch


def farthest_point_sample(xyz: torch.Tensor, num_groups: int) -> torch.Tensor:
    """xyz (B, N, 3) -> indices (B, num_groups) of the FPS centres, starting at point 0."""
    batch, num_points, _ = xyz.shape
    if num_groups > num_points:
        raise ValueError(f"cannot pick {num_groups} group centres from {num_points} points")
    idx = torch.zeros(batch, num_groups, dtype=torch.long, device=xyz.device)
    dist = torch.full((batch, num_points), float("inf"), dtype=xyz.dtype, device=xyz.device)
    rows = torch.arange(batch, device=xyz.device)
    farthest = torch.zeros(batch, dtype=torch.long, device=xyz.device)
    for i in range(num_groups):
        idx[:, i] = farthest
        centre = xyz[rows, farthest].unsqueeze(1)  # (B, 1, 3)
        dist = torch.minimum(dist, ((xyz - centre) ** 2).sum(-1))
        farthest = dist.argmax(-1)  # argmax returns the first maximum: lowest index wins ties
    return idx


def knn(xyz: torch.Tensor, centres: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (B, G, k) of the k points of xyz (B, N, 3) nearest each centre (B, G, 3), nearest first."""
    d = torch.cdist(centres, xyz)  # (B, G, N)
    return d.topk(k, dim=-1, largest=False, sorted=True).indices


def group_points(points: torch.Tensor, num_groups: int, group_size: int):
    """points (B, N, C>=3, xyz first) -> neighbourhoods (B, G, k, C) with xyz made relative to
    their centre, and centres (B, G, 3)."""
    xyz = points[..., :3].contiguous()
    with torch.no_grad():
        centre_idx = farthest_point_sample(xyz, num_groups)
        centres = torch.gather(xyz, 1, centre_idx.unsqueeze(-1).expand(-1, -1, 3))
        neighbour_idx = knn(xyz, centres, group_size)  # (B, G, k)
    batch, channels = points.shape[0], points.shape[-1]
    flat = neighbour_idx.reshape(batch, -1, 1).expand(-1, -1, channels)
    groups = torch.gather(points, 1, flat).reshape(batch, num_groups, group_size, channels)
    rel_xyz = groups[..., :3] - centres.unsqueeze(2)
    return torch.cat([rel_xyz, groups[..., 3:]], dim=-1), centres
