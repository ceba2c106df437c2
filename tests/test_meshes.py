"""OBJ colour: what the MTL says, and white where it says nothing (trimesh's own defaults don't count);
glTF files that are broken or miss a buffer: the error says which."""
import numpy as np
import pytest
import trimesh
from PIL import Image

from lavis_point.data_io import CloudReadError, read_cloud

TRIANGLE = "v 0 0 0\nv 1 0 0\nv 0 1 0\nvt 0 0\nvt 1 0\nvt 0 1\n"


def write_obj(folder, mtl=None, uv=True):
    """A one-triangle OBJ; with ``mtl`` (the MTL's lines after newmtl), it uses that material."""
    head = ""
    if mtl is not None:
        (folder / "m.mtl").write_text("newmtl mat\n" + mtl)
        head = "mtllib m.mtl\nusemtl mat\n"
    face = "f 1/1 2/2 3/3\n" if uv else "f 1 2 3\n"
    (folder / "t.obj").write_text(head + TRIANGLE + face)
    return str(folder / "t.obj")


@pytest.fixture
def red_png(tmp_path):
    Image.fromarray(np.tile(np.array([255, 0, 0], np.uint8), (8, 8, 1))).save(tmp_path / "red.png")


def rgb(path):
    return read_cloud(path, mesh_points=200)[:, 3:]


def test_a_texture_without_kd_is_not_darkened(tmp_path, red_png):
    assert np.allclose(rgb(write_obj(tmp_path, "map_Kd red.png\n")), [1, 0, 0])


def test_a_material_with_no_colour_is_white(tmp_path):
    assert np.all(rgb(write_obj(tmp_path, "Ns 10\nillum 2\n", uv=False)) == 1.0)


def test_uv_coordinates_without_a_material_are_white(tmp_path):
    assert np.all(rgb(write_obj(tmp_path)) == 1.0)


def test_a_real_kd_still_colours_and_tints_a_texture(tmp_path, red_png):
    assert np.allclose(rgb(write_obj(tmp_path, "Kd 0.2 0.6 1.0\n", uv=False)), [0.2, 0.6, 1.0], atol=1 / 255)
    assert np.allclose(rgb(write_obj(tmp_path, "Kd 0.5 1 1\nmap_Kd red.png\n")), [0.5, 0, 0], atol=1 / 255)


def test_a_kd_that_says_trimesh_default_grey_is_that_grey(tmp_path, red_png):
    """trimesh fills in 0.4 grey where Kd is absent; an MTL that states 0.4 means it (it keeps the
    MTL's own values beside, which is how the two are told apart)."""
    assert np.allclose(rgb(write_obj(tmp_path, "Kd 0.4 0.4 0.4\n", uv=False)), 0.4, atol=1 / 255)
    assert np.allclose(rgb(write_obj(tmp_path, "Kd 0.4 0.4 0.4\nmap_Kd red.png\n")), [0.4, 0, 0], atol=1 / 255)


def write_gltf(folder):
    """A box as a .gltf with its buffers in .bin files beside it; returns (the .gltf, the buffers' names)."""
    files = trimesh.creation.box().export(file_type="gltf")
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return str(folder / "model.gltf"), sorted(name for name in files if name.endswith(".bin"))


def test_a_gltf_with_its_buffers_is_read(tmp_path):
    path, buffers = write_gltf(tmp_path)
    assert buffers and read_cloud(path, mesh_points=300).shape == (300, 6)


def test_a_gltf_whose_buffer_is_missing_names_the_buffer(tmp_path):
    path, buffers = write_gltf(tmp_path)
    (tmp_path / buffers[0]).unlink()
    with pytest.raises(CloudReadError) as caught:
        read_cloud(path)
    assert str(caught.value).startswith(f"{path}: ") and "no such file" not in str(caught.value)
    assert f"'{buffers[0]}', a file it refers to, is missing (looked in {tmp_path})" in str(caught.value)


@pytest.mark.parametrize("content,reason", [
    (b"", "not a readable glTF: the file is empty"),
    (b"\x00\x01garbage{{{", "not a readable glTF: not JSON"),
    (b"solid box\nendsolid box\n", "not a readable glTF: not JSON"),
    (b"[1, 2]", "not a readable glTF: its JSON is a list, not an object"),
])
def test_a_gltf_that_is_not_gltf_json_says_so(tmp_path, content, reason):
    path = tmp_path / "broken.gltf"
    path.write_bytes(content)
    with pytest.raises(CloudReadError) as caught:
        read_cloud(path)
    assert str(caught.value).startswith(f"{path}: {reason}"), str(caught.value)
