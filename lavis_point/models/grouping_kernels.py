"""Compiled FPS and kNN for CPU tensors (numba), exact against ``grouping.reference_*``.

Both sort a cloud's points into a uniform grid of cubic cells (stable, so a cell keeps index order).
- FPS keeps each non-empty cell's bounding box and the largest distance-to-the-centres in it: a new
  centre whose distance to a cell's box is at least that largest distance cannot lower any of it,
  so the cell is skipped. Only cells near each new centre are touched (the bucket idea of QuickFPS).
- kNN visits cells in rings around the centre's cell and stops once the k-th best distance is below
  the distance to anything outside the rings.
Distances are float32 ``(dx*dx + dy*dy) + dz*dz`` as in the reference; skips and stops keep a
relative margin (1e-6) above float32 rounding, so no candidate is lost to it.

Clouds run in parallel on Python threads (the kernels release the GIL), as many as torch's intra-op
threads. Not numba's ``parallel=True``: its OpenMP workers keep spinning after a kernel returns and
slowed every torch op that followed (generation ran ~15x slower on 2 cores).
"""
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

try:
    import numba
except ImportError:  # the torch path in grouping.py takes over
    numba = None

# FPS: ~16 points per cell in a solid (more on a surface), so few cells to scan per centre. kNN:
# finer, ~k / 8 per cell in a solid, so the rings around a centre hold little beyond its k nearest.
POINTS_PER_FPS_CELL = 16
KNN_CELLS_PER_NEIGHBOUR = 1 / 8
MARGIN = 1e-6


def available() -> bool:
    return numba is not None


def _cells_per_axis(num_points, points_per_cell):
    return max(1, round((num_points / points_per_cell) ** (1 / 3)))


def _as_clouds(xyz: torch.Tensor) -> np.ndarray:
    xyz = xyz.detach().to(torch.float32).contiguous()
    if not torch.isfinite(xyz).all():
        raise ValueError("point coordinates contain NaN or inf: grouping needs finite xyz")
    return xyz.numpy()


_pool = {}


def _per_cloud(kernel, batch):
    """Run ``kernel(b)`` for every cloud b, on up to torch.get_num_threads() threads."""
    workers = min(batch, torch.get_num_threads())
    if workers <= 1:
        for b in range(batch):
            kernel(b)
        return
    if workers not in _pool:
        _pool[workers] = ThreadPoolExecutor(workers, thread_name_prefix="lavis-point-grouping")
    list(_pool[workers].map(kernel, range(batch)))


def farthest_point_sample(xyz: torch.Tensor, num_groups: int) -> torch.Tensor:
    clouds = _as_clouds(xyz)
    out = np.empty((clouds.shape[0], num_groups), dtype=np.int64)
    cells = _cells_per_axis(clouds.shape[1], POINTS_PER_FPS_CELL)
    _per_cloud(lambda b: _fps_one(clouds[b], num_groups, cells, out[b]), clouds.shape[0])
    return torch.from_numpy(out)


def knn(xyz: torch.Tensor, centres: torch.Tensor, k: int) -> torch.Tensor:
    clouds, queries = _as_clouds(xyz), _as_clouds(centres)
    out = np.empty((clouds.shape[0], queries.shape[1], k), dtype=np.int64)
    cells = _cells_per_axis(clouds.shape[1], k * KNN_CELLS_PER_NEIGHBOUR)
    _per_cloud(lambda b: _knn_one(clouds[b], queries[b], k, cells, out[b]), clouds.shape[0])
    return torch.from_numpy(out)


if numba is not None:
    def njit(fn):
        return numba.njit(fn, cache=True, nogil=True)

    @njit
    def _grid(xyz, cells):
        """-> (lo (3,), cell width, dims (3,), order: point indices sorted by cell, start (C+1,))."""
        lo = np.empty(3)
        hi = np.empty(3)
        for a in range(3):
            lo[a] = xyz[:, a].min()
            hi[a] = xyz[:, a].max()
        extent = (hi - lo).max()
        width = extent / cells if extent > 0 else 1.0
        dims = np.empty(3, dtype=np.int64)
        for a in range(3):
            dims[a] = min(cells, int((hi[a] - lo[a]) / width) + 1)
        n = xyz.shape[0]
        cell = np.empty(n, dtype=np.int64)
        for t in range(n):
            c = 0
            for a in range(3):
                i = min(int((xyz[t, a] - lo[a]) / width), dims[a] - 1)
                c = c * dims[a] + i
            cell[t] = c
        start = np.zeros(dims[0] * dims[1] * dims[2] + 1, dtype=np.int64)
        for t in range(n):
            start[cell[t] + 1] += 1
        start = np.cumsum(start)
        order = np.empty(n, dtype=np.int64)  # counting sort: stable, so a cell keeps index order
        fill = start[:-1].copy()
        for t in range(n):
            order[fill[cell[t]]] = t
            fill[cell[t]] += 1
        return lo, width, dims, order, start

    @njit
    def _better(val_a, arg_a, val_b, arg_b):
        return val_a > val_b or (val_a == val_b and arg_a < arg_b)

    @njit
    def _fps_one(xyz, num_groups, cells, out):
        lo, width, dims, order, start = _grid(xyz, cells)
        px, py, pz = xyz[order, 0].copy(), xyz[order, 1].copy(), xyz[order, 2].copy()  # cell by cell
        num_cells = start.shape[0] - 1
        box = np.empty((num_cells, 6))  # min xyz, max xyz of the points in a cell
        for c in range(num_cells):
            if start[c + 1] > start[c]:
                s, e = start[c], start[c + 1]
                box[c, 0], box[c, 1], box[c, 2] = px[s:e].min(), py[s:e].min(), pz[s:e].min()
                box[c, 3], box[c, 4], box[c, 5] = px[s:e].max(), py[s:e].max(), pz[s:e].max()
        dist = np.full(px.shape[0], np.inf, dtype=np.float32)
        # A tournament tree over cells: node = (largest distance below it, lowest index among equals).
        leaves = 1
        while leaves < num_cells:
            leaves *= 2
        tree_val = np.full(2 * leaves, -np.inf)
        tree_arg = np.full(2 * leaves, xyz.shape[0], dtype=np.int64)
        for c in range(num_cells):
            if start[c + 1] > start[c]:
                tree_val[leaves + c] = np.inf
                tree_arg[leaves + c] = order[start[c]]
        for node in range(leaves - 1, 0, -1):
            left, right = 2 * node, 2 * node + 1
            child = left if _better(tree_val[left], tree_arg[left], tree_val[right], tree_arg[right]) else right
            tree_val[node], tree_arg[node] = tree_val[child], tree_arg[child]
        lo_cell = np.empty(3, dtype=np.int64)
        hi_cell = np.empty(3, dtype=np.int64)
        for i in range(num_groups):
            farthest = tree_arg[1]
            out[i] = farthest
            centre = xyz[farthest]
            # Only points nearer than the farthest distance can get nearer to this centre.
            reach = np.sqrt(tree_val[1]) * (1 + MARGIN) + MARGIN * width
            for a in range(3):
                if reach == np.inf:
                    lo_cell[a], hi_cell[a] = 0, dims[a] - 1
                else:
                    lo_cell[a] = max(int(math.floor((centre[a] - reach - lo[a]) / width)), 0)
                    hi_cell[a] = min(int(math.floor((centre[a] + reach - lo[a]) / width)), dims[a] - 1)
            for ix in range(lo_cell[0], hi_cell[0] + 1):
                for iy in range(lo_cell[1], hi_cell[1] + 1):
                    for iz in range(lo_cell[2], hi_cell[2] + 1):
                        c = (ix * dims[1] + iy) * dims[2] + iz
                        if start[c + 1] == start[c]:
                            continue
                        gap = 0.0
                        for a in range(3):
                            g = max(box[c, a] - centre[a], centre[a] - box[c, 3 + a], 0.0)
                            gap += g * g
                        if gap * (1 - MARGIN) >= tree_val[leaves + c]:
                            continue  # this centre is farther from every point here than its nearest centre
                        cx, cy, cz = centre[0], centre[1], centre[2]
                        best = -1.0
                        arg = 0
                        for t in range(start[c], start[c + 1]):
                            dx, dy, dz = px[t] - cx, py[t] - cy, pz[t] - cz
                            d = dx * dx + dy * dy + dz * dz
                            if d < dist[t]:
                                dist[t] = d
                            if dist[t] > best:  # strict: within a cell indices ascend, the lowest wins ties
                                best = dist[t]
                                arg = order[t]
                        node = leaves + c
                        tree_val[node], tree_arg[node] = best, arg
                        while node > 1:
                            node //= 2
                            left, right = 2 * node, 2 * node + 1
                            if _better(tree_val[left], tree_arg[left], tree_val[right], tree_arg[right]):
                                child = left
                            else:
                                child = right
                            tree_val[node], tree_arg[node] = tree_val[child], tree_arg[child]

    @njit
    def _knn_one(xyz, queries, k, cells, out):
        lo, width, dims, order, start = _grid(xyz, cells)
        pts = xyz[order]
        best_d = np.empty(k, dtype=np.float32)
        best_i = np.empty(k, dtype=np.int64)
        home = np.empty(3, dtype=np.int64)
        u = np.empty(3)
        for g in range(queries.shape[0]):
            qx, qy, qz = queries[g, 0], queries[g, 1], queries[g, 2]
            for a in range(3):
                u[a] = (queries[g, a] - lo[a]) / width  # position in cell units
                home[a] = min(max(int(math.floor(u[a])), 0), dims[a] - 1)
            count = 0
            r = 0
            while True:
                for ix in range(max(home[0] - r, 0), min(home[0] + r, dims[0] - 1) + 1):
                    for iy in range(max(home[1] - r, 0), min(home[1] + r, dims[1] - 1) + 1):
                        for iz in range(max(home[2] - r, 0), min(home[2] + r, dims[2] - 1) + 1):
                            if max(abs(ix - home[0]), abs(iy - home[1]), abs(iz - home[2])) != r:
                                continue  # visited in an earlier ring
                            c = (ix * dims[1] + iy) * dims[2] + iz
                            for t in range(start[c], start[c + 1]):
                                dx, dy, dz = pts[t, 0] - qx, pts[t, 1] - qy, pts[t, 2] - qz
                                d = dx * dx + dy * dy + dz * dz
                                idx = order[t]
                                if count == k and (d > best_d[k - 1] or (d == best_d[k - 1] and idx > best_i[k - 1])):
                                    continue
                                j = count if count < k else k - 1  # insert by (distance, index)
                                while j > 0 and (best_d[j - 1] > d or (best_d[j - 1] == d and best_i[j - 1] > idx)):
                                    best_d[j] = best_d[j - 1]
                                    best_i[j] = best_i[j - 1]
                                    j -= 1
                                best_d[j] = d
                                best_i[j] = idx
                                if count < k:
                                    count += 1
                # Distance (cell units) from the query to the nearest cell outside the rings so far.
                outside = np.inf
                for a in range(3):
                    if home[a] - r > 0:
                        outside = min(outside, u[a] - (home[a] - r))
                    if home[a] + r < dims[a] - 1:
                        outside = min(outside, home[a] + r + 1 - u[a])
                if outside == np.inf:
                    break  # the rings cover the grid
                bound = max(outside * width * (1 - MARGIN), 0.0)
                if count == k and best_d[k - 1] < bound * bound * (1 - MARGIN):
                    break
                r += 1
            out[g] = best_i
