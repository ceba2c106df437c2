import json
import os
import re
from collections import Counter

import numpy as np
import pytest

from lavis_point.datasets import shapes as S

SMALL = {"train": 40, "val": 8, "test": 16}
NPTS = 512


def build(root, **kw):
    params = dict(seed=0, num_points=NPTS, sizes=SMALL, num_refs=5)
    params.update(kw)
    return S.build_embedded_dataset(str(root), **params)


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load(root, split):
    points = np.load(os.path.join(root, f"{split}_points.npy"))
    return points, read_jsonl(os.path.join(root, f"{split}.jsonl"))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build(tmp_path_factory.mktemp("shapes"))


def test_vocabulary():
    assert len(S.SHAPES) == len(set(S.SHAPES)) == 8 and len(S.COLORS) == 8
    words = list(S.SHAPES) + list(S.COLORS) + list(S.SIZES)
    assert all(re.fullmatch(r"[a-z]+", w) for w in words) and len(set(words)) == len(words)
    assert all(0 <= v <= 1 for rgb in S.COLORS.values() for v in rgb)
    assert len(S.TEMPLATES) >= 8
    assert S.canonical_caption("cube", "red", "small") == "a small red cube"


def test_heldout_one_per_shape_and_colour():
    held = S.heldout_combinations()
    assert len(held) == 8
    assert {s for s, _ in held} == set(S.SHAPES) and {c for _, c in held} == set(S.COLORS)


def test_same_seed_bit_identical(built, tmp_path):
    other = build(tmp_path / "again")
    for split in SMALL:
        assert load(built, split)[0].tobytes() == load(other, split)[0].tobytes()
        with open(os.path.join(built, f"{split}.jsonl"), "rb") as fa, \
                open(os.path.join(other, f"{split}.jsonl"), "rb") as fb:
            assert fa.read() == fb.read()


def test_different_seed_differs(built, tmp_path):
    other = build(tmp_path / "seed1", seed=1)
    for split in SMALL:
        assert not np.array_equal(load(built, split)[0], load(other, split)[0])


def test_arrays_and_ranges(built):
    for split, n in SMALL.items():
        arr, rows = load(built, split)
        assert arr.shape == (n, NPTS, 6) and arr.dtype == np.float16 and len(rows) == n
        xyz, rgb = arr[..., :3].astype(np.float32), arr[..., 3:]
        assert np.linalg.norm(xyz, axis=-1).max() <= 1.0
        assert rgb.min() >= 0 and rgb.max() <= 1
        mm = np.load(os.path.join(built, f"{split}_points.npy"), mmap_mode="r")
        assert isinstance(mm, np.memmap) and mm.shape == arr.shape


def test_splits_respect_heldout(built):
    held = S.heldout_combinations()
    for split in SMALL:
        combos = {(r["shape"], r["color"]) for r in load(built, split)[1]}
        assert combos <= held if split == "test" else not combos & held


def test_records_and_balance(built):
    for split, n in SMALL.items():
        rows = load(built, split)[1]
        assert [r["id"] for r in rows] == [f"{split}_{i:05d}" for i in range(n)]
        assert [r["index"] for r in rows] == list(range(n))
        # sizes that are whole multiples of 8 give exactly balanced shapes and colours
        assert set(Counter(r["shape"] for r in rows).values()) == {n // 8}
        assert set(Counter(r["color"] for r in rows).values()) == {n // 8}
        per_size = Counter(r["size"] for r in rows)
        assert set(per_size) == set(S.SIZES) and max(per_size.values()) - min(per_size.values()) <= n // 8


def test_captions_mention_attributes(built):
    vocab = set(S.SHAPES) | set(S.COLORS) | set(S.SIZES)
    for split in SMALL:
        for r in load(built, split)[1]:
            assert r["caption"] == r["captions"][0]
            assert len(r["captions"]) == 5 == len(set(r["captions"]))
            for cap in r["captions"]:
                found = set(re.findall(r"[a-z]+", cap)) & vocab
                assert found == {r["shape"], r["color"], r["size"]}, cap


def test_article_agreement():
    rng = np.random.default_rng(0)
    caps = S.make_captions("cube", "orange", "small", rng, len(S.TEMPLATES))
    assert not any(re.search(r"\ba orange\b", c) for c in caps)
    assert any("an orange" in c for c in caps)


def test_manifest_caching_and_rebuild(tmp_path):
    root = build(tmp_path / "c")
    files = sorted(os.listdir(root))
    assert "manifest.json" in files and not any(f.endswith(".tmp") for f in files)
    manifest = read_json(os.path.join(root, "manifest.json"))
    assert manifest["version"] == S.VERSION and manifest["params"]["seed"] == 0
    stamp = {f: os.stat(os.path.join(root, f)).st_mtime_ns for f in files}
    build(tmp_path / "c")
    assert {f: os.stat(os.path.join(root, f)).st_mtime_ns for f in files} == stamp
    before = np.load(os.path.join(root, "train_points.npy"))
    build(tmp_path / "c", seed=3)
    assert read_json(os.path.join(root, "manifest.json"))["params"]["seed"] == 3
    assert not np.array_equal(before, np.load(os.path.join(root, "train_points.npy")))


def test_ensure_uses_env_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LAVIS_POINT_CACHE", str(tmp_path))
    folder = S.ensure_embedded_dataset(num_points=64, sizes={"train": 8, "val": 8, "test": 8})
    assert os.path.dirname(folder) == str(tmp_path)
    assert re.fullmatch(r"shapes_v1_[0-9a-f]{8}", os.path.basename(folder))
    assert os.path.exists(os.path.join(folder, "manifest.json"))


def stamps(folder):
    return {f: os.stat(os.path.join(folder, f)).st_mtime_ns for f in os.listdir(folder)}


def test_each_parameter_set_has_its_own_cache_folder(tmp_path):
    """One shared folder was rebuilt in place by a run with other parameters (a smoke run made the
    main job regenerate; two concurrent runs could read each other's half-written files)."""
    small = {"train": 8, "test": 8}
    main = S.ensure_embedded_dataset(str(tmp_path), num_points=64, sizes=small)
    before = stamps(main)
    others = [S.ensure_embedded_dataset(str(tmp_path), num_points=64, sizes={"train": 16, "test": 8}),
              S.ensure_embedded_dataset(str(tmp_path), num_points=64, sizes=small, seed=1),
              S.ensure_embedded_dataset(str(tmp_path), num_points=32, sizes=small),
              S.ensure_embedded_dataset(str(tmp_path), num_points=64, sizes=small, num_refs=3)]
    assert len({main, *others}) == 5
    assert stamps(main) == before  # untouched by the other parameter sets
    assert read_json(os.path.join(main, "manifest.json"))["params"]["sizes"] == small
    # the same parameters, however spelled, find the same folder without rebuilding it
    again = S.ensure_embedded_dataset(str(tmp_path), seed=np.int64(0), num_points=64.0,
                                      sizes={"test": 8, "train": 8}, num_refs=5)
    assert again == main and stamps(main) == before


def test_cache_folder_name_is_stable():
    """Renaming it would make every user regenerate the data (and leave the old copy behind)."""
    assert S.embedded_folder("root") == os.path.join("root", "shapes_v1_0be22bbc")
    assert S.embedded_folder("root", sizes=dict(S.DEFAULT_SPLIT_SIZES)) == S.embedded_folder("root")


def test_sample_cloud_geometry():
    rng = np.random.default_rng(0)
    for size, radius in S.SIZES.items():
        c = S.sample_cloud("cube", "red", size, rng, 2048)
        assert c.shape == (2048, 6) and c.dtype == np.float32
        extent = np.linalg.norm(c[:, :3] - c[:, :3].mean(0), axis=1).max()
        assert 0.8 * radius < extent < 1.1 * radius
    canon = {s: S._SAMPLERS[s](4096, rng) for s in S.SHAPES}
    radius = {s: np.linalg.norm(p, axis=1) for s, p in canon.items()}  # canonical frames are centred
    assert radius["sphere"].std() < 1e-3 * radius["sphere"].mean()
    assert radius["cube"].std() > 0.05 * radius["cube"].mean()
    assert np.allclose(np.abs(canon["cube"]).max(1), 1)  # every cube point lies on a face
    # the torus and helix have an empty core around the z axis, the cylinder's caps do not
    core = {s: (np.hypot(p[:, 0], p[:, 1]) < 0.2).mean() for s, p in canon.items()}
    assert core["torus"] == core["helix"] == 0 and core["cylinder"] > 0.01


def test_families_separable_by_simple_features():
    """Rotation-invariant distance histograms alone should tell the families apart."""
    rng = np.random.default_rng(1)

    def feature(cloud):
        xyz = cloud[:, :3] - cloud[:, :3].mean(0)
        xyz /= np.linalg.norm(xyz, axis=1).max()
        i, j = rng.integers(0, len(xyz), (2, 2000))
        d2 = np.histogram(np.linalg.norm(xyz[i] - xyz[j], axis=1), 16, (0, 2))[0] / 2000
        rad = np.histogram(np.linalg.norm(xyz, axis=1), 16, (0, 1))[0] / len(xyz)
        return np.concatenate([d2, rad])

    feats, labels = [], []
    for rep in range(12):
        for k, shape in enumerate(S.SHAPES):
            feats.append(feature(S.sample_cloud(shape, "red", list(S.SIZES)[rep % 3], rng, NPTS)))
            labels.append(k)
    feats, labels = np.array(feats), np.array(labels)
    train = np.arange(len(labels)) < len(labels) // 2
    centroids = np.stack([feats[train & (labels == k)].mean(0) for k in range(8)])
    pred = ((feats[~train, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (pred == labels[~train]).mean() > 0.75
