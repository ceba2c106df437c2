"""read_cloud over every format it accepts, the restricted unpickler, and mesh sampling."""
import io
import pickle

import numpy as np
import pytest
import trimesh

from lavis_point.data_io import CloudReadError, PointCloudError, read_cloud
from lavis_point.data_io.meshes import sample_surface
from lavis_point.data_io.safe_pickle import UnsafePickleError, load_array
from tests import point_files as pf


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_restricted_unpickler_rebuilds_arrays_of_every_protocol(protocol, dtype):
    a = pf.coloured_cloud(64).astype(dtype)
    for array in (a, np.asfortranarray(a), a[::2]):
        b = load_array(io.BytesIO(pickle.dumps(array, protocol=protocol)))
        assert b.dtype == array.dtype and np.array_equal(b, array)


def test_a_pickle_that_would_run_code_is_refused_before_anything_runs(tmp_path):
    marker = tmp_path / "marker"
    path = pf.write_pickle(tmp_path / "evil.pkl", pf.CreatesFileWhenUnpickled(marker))
    with pytest.raises(CloudReadError, match=r"evil\.pkl: unsafe pickle: refused .*io\.open"):
        read_cloud(path)
    assert not marker.exists()
    with open(path, "rb") as f:
        with pytest.raises(UnsafePickleError):
            load_array(f)
    assert not marker.exists()


@pytest.mark.parametrize("value,reason", [({"points": 1}, "holds a dict"), ([1.0, 2.0], "holds a list"),
                                          (np.array([object()] * 3), "refused"),
                                          (np.array([[1, "a", 2]], dtype=object), "Python objects")])
def test_a_pickle_holding_anything_but_a_numeric_array_is_refused(tmp_path, value, reason):
    path = pf.write_pickle(tmp_path / "thing.pkl", value)
    with pytest.raises(CloudReadError, match=f"thing.pkl: unsafe pickle: .*{reason}"):
        read_cloud(path)


def test_codecs_encode_is_allowed_only_for_latin1():
    payload = (b"\x80\x02c_codecs\nencode\nq\x00X\x01\x00\x00\x00aX\x05\x00\x00\x00rot13\x86R.")
    with pytest.raises(pickle.UnpicklingError, match="rot13"):
        load_array(io.BytesIO(payload))


def test_pickles_npy_and_npz_read_exactly(tmp_path):
    cloud = pf.coloured_cloud(500)
    paths = [pf.write_pickle(tmp_path / "a.pkl", cloud), str(tmp_path / "b.npy"), str(tmp_path / "c.npz"),
             str(tmp_path / "d.npz"), str(tmp_path / "e.npz")]
    np.save(paths[1], cloud)
    np.savez(paths[2], points=cloud, other=np.zeros(3))
    np.savez(paths[3], xyz=cloud[:, :3], rgb=cloud[:, 3:])
    np.savez_compressed(paths[4], cloud)
    for path in paths:
        out = read_cloud(path)
        assert out.dtype == np.float32 and np.array_equal(out, cloud), path


@pytest.mark.parametrize("points_key,colour_key", [("points", "colors"), ("points", "rgb"), ("pc", "colours"),
                                                     ("xyz", "rgb")])
def test_npz_xyz_points_take_the_colours_stored_beside_them(tmp_path, points_key, colour_key):
    cloud = pf.coloured_cloud(300)
    np.savez(tmp_path / "a.npz", **{points_key: cloud[:, :3], colour_key: cloud[:, 3:]})
    assert np.array_equal(read_cloud(tmp_path / "a.npz"), cloud)  # not white


def test_npz_integer_colours_beside_float_points_are_0_255_however_dark(tmp_path):
    """Joined to float xyz the colours' integer dtype was lost, and colours of 0 or 1 read as white."""
    cloud = pf.coloured_cloud(300)
    dark = np.random.default_rng(0).integers(0, 2, (300, 3)).astype(np.uint8)
    np.savez(tmp_path / "a.npz", points=cloud[:, :3], colors=dark)
    assert np.allclose(read_cloud(tmp_path / "a.npz")[:, 3:], dark / 255.0)


def test_npz_colours_do_not_override_points_that_have_them_and_must_match_in_length(tmp_path):
    cloud = pf.coloured_cloud(300)
    np.savez(tmp_path / "a.npz", points=cloud, colors=np.zeros((300, 3)))
    assert np.array_equal(read_cloud(tmp_path / "a.npz"), cloud)
    np.savez(tmp_path / "b.npz", points=cloud[:, :3], colors=cloud[:10, 3:])
    with pytest.raises(CloudReadError, match=r"b\.npz: 'points' holds 300 points but 'colors' is \(10, 3\)"):
        read_cloud(tmp_path / "b.npz")


def test_npz_rgba_and_grey_colours_keep_their_rgb(tmp_path):
    """trimesh writes RGBA: the alpha is dropped, not the cloud (it was refused as 7 wide)."""
    cloud = pf.coloured_cloud(300)
    np.savez(tmp_path / "a.npz", points=cloud[:, :3], colors=np.concatenate([cloud[:, 3:], np.ones((300, 1))], 1))
    assert np.array_equal(read_cloud(tmp_path / "a.npz"), cloud)
    np.savez(tmp_path / "b.npz", points=cloud[:, :3], colors=cloud[:, 3])
    assert np.array_equal(read_cloud(tmp_path / "b.npz")[:, 3:], np.repeat(cloud[:, 3:4], 3, axis=1))


def test_text_clouds_with_commas_spaces_and_a_count_header(tmp_path):
    cloud = np.round(pf.coloured_cloud(50), 4)
    (tmp_path / "a.xyz").write_text("\n".join(" ".join(map(str, row)) for row in cloud))
    (tmp_path / "b.txt").write_text("\n".join(",".join(map(str, row)) for row in cloud))
    (tmp_path / "c.pts").write_text("50\n" + "\n".join(" ".join(map(str, row[:3])) for row in cloud))
    assert np.allclose(read_cloud(tmp_path / "a.xyz"), cloud)
    assert np.allclose(read_cloud(tmp_path / "b.txt"), cloud)
    assert np.allclose(read_cloud(tmp_path / "c.pts"), cloud[:, :3])
    (tmp_path / "d.txt").write_text("\ufeff" + (tmp_path / "b.txt").read_text())  # saved by a Windows editor
    assert np.allclose(read_cloud(tmp_path / "d.txt"), cloud)


def test_xyz_only_clouds_stay_three_wide_or_become_white(tmp_path):
    np.save(tmp_path / "a.npy", pf.coloured_cloud(100)[:, :3])
    assert read_cloud(tmp_path / "a.npy").shape == (100, 3)
    white = read_cloud(tmp_path / "a.npy", white_if_missing=True)
    assert white.shape == (100, 6) and np.all(white[:, 3:] == 1.0)


def test_rgb_stored_as_0_to_255_comes_back_in_0_to_1(tmp_path):
    cloud = pf.coloured_cloud(100)
    scaled = cloud.copy()
    scaled[:, 3:] = np.round(scaled[:, 3:] * 255)
    np.save(tmp_path / "a.npy", scaled)
    out = read_cloud(tmp_path / "a.npy")
    assert out[:, 3:].max() <= 1.0 and np.allclose(out[:, 3:], cloud[:, 3:], atol=1 / 255)


def test_a_ply_point_cloud_keeps_its_points_and_colours(tmp_path):
    xyz = pf.coloured_cloud(300)[:, :3]
    trimesh.PointCloud(xyz, colors=np.tile([0, 255, 0, 255], (300, 1))).export(tmp_path / "c.ply")
    trimesh.PointCloud(xyz).export(tmp_path / "plain.ply")
    out = read_cloud(tmp_path / "c.ply")
    assert np.allclose(out[:, :3], xyz) and np.all(out[:, 3:] == [0, 1, 0])
    assert read_cloud(tmp_path / "plain.ply").shape == (300, 3)


def test_a_ply_mesh_is_sampled_on_its_surface_with_its_vertex_colours(tmp_path):
    out = read_cloud(pf.vertex_coloured_square(tmp_path / "m.ply"), mesh_points=1000)
    assert out.shape == (1000, 6) and np.all(out[:, 2] == 0)
    assert out[:, :2].min() >= 0 and out[:, :2].max() <= 1
    assert np.allclose(out[:, 3:], [1, 0, 0])


def test_a_textured_glb_takes_colour_from_its_texture(tmp_path):
    out = read_cloud(pf.textured_square(tmp_path / "t.glb"), mesh_points=2000)
    left, right = out[out[:, 0] < 0.4], out[out[:, 0] > 0.6]
    assert np.allclose(left[:, 3:], [1, 0, 0]) and np.allclose(right[:, 3:], [0, 0, 1])


def test_an_obj_takes_its_material_colour_and_an_uncoloured_off_is_white(tmp_path):
    green = read_cloud(pf.material_coloured_square(tmp_path / "m.obj"), mesh_points=500)
    assert np.allclose(green[:, 3:], [0, 1, 0])
    white = read_cloud(pf.plain_mesh(tmp_path / "box.off"), mesh_points=500)
    assert np.all(white[:, 3:] == 1.0) and np.allclose(np.abs(white[:, :3]).max(axis=1), 0.5)


def test_mesh_sampling_is_area_weighted_and_reproducible():
    small = trimesh.Trimesh(pf.SQUARE, pf.SQUARE_FACES, process=False)
    big = trimesh.Trimesh(pf.SQUARE * 2 + [5, 0, 0], pf.SQUARE_FACES, process=False)  # 4x the area
    points = sample_surface([small, big], 20000, seed=3)
    share_big = (points[:, 0] >= 5).mean()
    assert abs(share_big - 0.8) < 0.02
    assert np.array_equal(points, sample_surface([small, big], 20000, seed=3))
    # uniform within a triangle too: the lower-right triangle of the unit square holds half its points
    unit = points[points[:, 0] < 5]
    assert abs((unit[:, 0] > unit[:, 1]).mean() - 0.5) < 0.03


@pytest.mark.parametrize("make,reason", [
    (lambda p: pf.truncate(pf.write_pickle(p / "x.pkl", pf.coloured_cloud(100))), "truncated"),
    (lambda p: pf.truncate(str(p / "x.npy"), 0.5) if np.save(p / "x.npy", pf.coloured_cloud(100)) is None
     else None, "unreadable"),
    (lambda p: pf.write_pickle(p / "x.pkl", np.full((10, 6), np.nan, np.float32)), "10 points have NaN"),
    (lambda p: pf.write_pickle(p / "x.pkl", np.zeros((0, 6), np.float32)), "no points"),
    (lambda p: pf.write_pickle(p / "x.pkl", np.zeros((10, 4), np.float32)), r"shape \(10, 4\)"),
    (lambda p: pf.write_pickle(p / "x.pkl", np.array([["a", "b", "c"]])), "dtype <U1"),
    (lambda p: (p / "x.txt").write_text("1 2 3\n4 5\n") and str(p / "x.txt"), "different numbers"),
    (lambda p: (p / "x.obj").write_text("not a mesh at all\n") and str(p / "x.obj"), "x.obj"),
    (lambda p: (p / "x.bin").write_bytes(b"123") and str(p / "x.bin"), "unknown extension"),
    (lambda p: str(p / "nothing.pkl"), "no such file"),
])
def test_bad_files_raise_one_error_class_naming_the_file_and_the_problem(tmp_path, make, reason):
    path = make(tmp_path)
    with pytest.raises(CloudReadError, match=reason) as caught:
        read_cloud(path)
    assert str(caught.value).startswith(str(path)) and caught.value.path == str(path)
    assert isinstance(caught.value, PointCloudError) and isinstance(caught.value, ValueError)


def test_npy_holding_python_objects_is_refused_without_unpickling(tmp_path):
    marker = tmp_path / "marker"
    np.save(tmp_path / "x.npy", np.array([pf.CreatesFileWhenUnpickled(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(CloudReadError, match="x.npy"):
        read_cloud(tmp_path / "x.npy")
    assert not marker.exists()
