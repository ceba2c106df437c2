"""Meshes -> coloured points: area-weighted samples of the surface, coloured where the mesh says.

Colour, per mesh: its texture at the sampled UV (times the material's base colour), else its vertex
colours (interpolated) or face colours, else its material's colour, else white. Colours trimesh
invents for an OBJ that gives none (grey Kd, a grey image) count as none.
Output: (num_points, 6) float32, xyz then rgb in [0, 1].
"""
import numpy as np
import trimesh
from trimesh.visual.color import DEFAULT_COLOR, uv_to_color
from trimesh.visual.material import PBRMaterial, color_image

WHITE = np.ones(3, dtype=np.float32)
# What trimesh (5.2) fills in where an OBJ says nothing: Kd absent -> DEFAULT_COLOR (grey 0.4), uv but
# no material -> a 2x2 grey image. These count as "no colour". An MTL that states ``Kd 0.4 0.4 0.4``
# is told apart by the MTL's own values, which trimesh keeps in ``material.kwargs`` ("kd").
TRIMESH_DEFAULT_IMAGE = np.asarray(color_image())


def triangle_meshes(geometry) -> list:
    """The triangle meshes of a loaded Trimesh or Scene, each placed by the scene graph."""
    parts = geometry.dump(concatenate=False) if isinstance(geometry, trimesh.Scene) else [geometry]
    return [m for m in parts if isinstance(m, trimesh.Trimesh) and len(m.faces) > 0]


def sample_surface(meshes, num_points: int, seed: int = 0) -> np.ndarray:
    """``num_points`` points drawn uniformly by area over all ``meshes`` together, with colours."""
    areas = np.concatenate([m.area_faces for m in meshes]) if meshes else np.zeros(0)
    if not np.isfinite(areas).all() or areas.sum() <= 0:
        raise ValueError("the mesh has no surface area")
    rng = np.random.default_rng(seed)
    face = rng.choice(len(areas), size=num_points, p=areas / areas.sum())
    # Barycentric weights uniform over a triangle (the square-root trick), (num_points, 3).
    r1, r2 = np.sqrt(rng.random(num_points)), rng.random(num_points)
    bary = np.stack([1 - r1, r1 * (1 - r2), r1 * r2], axis=1)
    out = np.empty((num_points, 6), dtype=np.float32)
    start = 0
    for mesh in meshes:
        mine = (face >= start) & (face < start + len(mesh.faces))
        local, weights = face[mine] - start, bary[mine]
        corners = mesh.vertices[mesh.faces[local]]  # (k, 3 corners, 3)
        out[mine, :3] = np.einsum("kc,kcd->kd", weights, corners)
        out[mine, 3:] = surface_colour(mesh, local, weights)
        start += len(mesh.faces)
    return out


def surface_colour(mesh, faces, bary) -> np.ndarray:
    """rgb in [0, 1], (k, 3), at barycentric points ``bary`` of ``faces``."""
    visual = mesh.visual
    if visual.kind == "texture":
        material = visual.material
        if isinstance(material, PBRMaterial):
            image, factor = material.baseColorTexture, material.baseColorFactor
        else:
            image, factor = getattr(material, "image", None), getattr(material, "diffuse", None)
            stated = "kd" in (getattr(material, "kwargs", None) or {})
            if factor is not None and np.array_equal(factor, DEFAULT_COLOR) and not stated:
                factor = None
            if getattr(image, "size", None) == (2, 2) and np.array_equal(image, TRIMESH_DEFAULT_IMAGE):
                image = None
        factor = WHITE if factor is None else np.asarray(factor, dtype=np.float32)[:3] / 255.0
        uv = visual.uv
        if image is not None and uv is not None and len(uv) == len(mesh.vertices):
            uv_at = np.einsum("kc,kcd->kd", bary, np.asarray(uv)[mesh.faces[faces]])
            return uv_to_color(uv_at, image)[:, :3].astype(np.float32) / 255.0 * factor
        return np.broadcast_to(factor, (len(faces), 3))
    if visual.kind == "vertex":
        corner_rgb = np.asarray(visual.vertex_colors, dtype=np.float32)[mesh.faces[faces], :3]
        return np.einsum("kc,kcd->kd", bary, corner_rgb) / 255.0
    if visual.kind == "face":
        return np.asarray(visual.face_colors, dtype=np.float32)[faces, :3] / 255.0
    return np.broadcast_to(WHITE, (len(faces), 3))  # no colour anywhere: white, as for xyz-only clouds
