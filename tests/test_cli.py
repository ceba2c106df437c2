"""The ``lavis-point`` command and the Python helpers behind it, on files written here (a cloud per
format, a mesh per format) and small random models saved to temporary checkpoints: what is checked is
the command's behaviour (output structure, error reports, the picture), not caption quality."""
import importlib.metadata
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import trimesh
import yaml
from lavis.common.registry import registry
from lavis.models import load_model
from PIL import Image

import lavis_point  # noqa: F401
from lavis_point.cli import main
from lavis_point.data_io import CloudReadError, read_cloud
from lavis_point.inference import (
    RUN_DIR_ENV,
    MissingWeightsError,
    default_checkpoint,
    load_point_model,
    load_points,
    model_config,
    point_text_scores,
    resolve_checkpoint,
)
from lavis_point.models.checkpoint import CheckpointError, read_checkpoint
from tests import point_files as pf
from tests.small_models import ENCODER, OPT, QFORMER

NUM_POINTS = 128
PREPROCESS = {"vis_processor": {"eval": {"name": "point_eval", "num_points": NUM_POINTS}}}
MODELS = {
    "point_opt": dict(point_encoder=ENCODER, qformer=QFORMER, num_query_token=4, opt_config=OPT,
                      opt_tokenizer="asset:tiny_opt_tokenizer", prompt="a 3D point cloud of "),
    "point_qformer": dict(point_encoder=ENCODER, qformer=QFORMER, num_query_token=4, embed_dim=16,
                          qformer_init=None),
}


def write_model(folder, arch, seed):
    """A small random ``arch`` model: (its YAML, a checkpoint of its weights in the runner's format)."""
    cfg_path = str(folder / f"{arch}.yaml")
    with open(cfg_path, "w") as f:
        yaml.safe_dump({"model": {"arch": arch, **MODELS[arch]}, "preprocess": PREPROCESS}, f)
    torch.manual_seed(seed)
    model = registry.get_model_class(arch).from_config(model_config(arch, cfg_path=cfg_path).model)
    checkpoint = str(folder / f"{arch}.pth")
    torch.save({"model": model.state_dict()}, checkpoint)
    return cfg_path, checkpoint


def write_inputs(folder):
    """One file per cloud format and per mesh format."""
    cloud = pf.coloured_cloud(600, seed=3)
    np.save(folder / "cloud.npy", cloud)
    np.savez(folder / "cloud.npz", points=cloud)
    pf.write_pickle(folder / "cloud.pkl", cloud)
    trimesh.PointCloud(cloud[:, :3], colors=(cloud[:, 3:] * 255).astype(np.uint8)).export(folder / "cloud.ply")
    (folder / "cloud.pts").write_text("\n".join(" ".join(f"{v:.5f}" for v in row[:3]) for row in cloud))
    (folder / "cloud.xyz").write_text("\n".join(" ".join(f"{v:.5f}" for v in row) for row in cloud))
    (folder / "cloud.txt").write_text("\n".join(",".join(f"{v:.5f}" for v in row) for row in cloud))
    pf.vertex_coloured_square(folder / "mesh.ply")
    pf.material_coloured_square(folder / "mesh.obj")
    pf.textured_square(folder / "mesh.glb")
    pf.plain_mesh(folder / "mesh.off")
    # (the .obj's material sits beside it in a .mtl, which is not an input)
    return {name: str(folder / name) for name in sorted(os.listdir(folder)) if not name.endswith(".mtl")}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    inputs = folder / "inputs"
    inputs.mkdir()
    stage2 = write_model(folder, "point_opt", seed=0)
    stage1 = write_model(folder, "point_qformer", seed=1)
    return {"files": write_inputs(inputs), "stage2": ["--cfg", stage2[0], "--checkpoint", stage2[1]],
            "stage1": ["--cfg", stage1[0], "--checkpoint", stage1[1]], "folder": folder}


def run(capsys, *argv):
    code = main([str(a) for a in argv] + ["--quiet"])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv):
    code, out, err = run(capsys, *argv, "--json")
    return code, json.loads(out), err


GENERATION = ["--num-beams", "2", "--max-length", "6", "--min-length", "2"]


def test_caption_answers_every_cloud_and_mesh_format_in_text_and_json(setup, capsys):
    files = list(setup["files"].values())
    assert {os.path.splitext(f)[1] for f in files} == {".npy", ".npz", ".pkl", ".ply", ".pts", ".xyz", ".txt",
                                                       ".obj", ".glb", ".off"}
    code, out, err = run(capsys, "caption", *files, *setup["stage2"], *GENERATION)
    assert code == 0, err
    lines = out.splitlines()
    assert [line.split(": ", 1)[0] for line in lines] == files
    assert all(line.split(": ", 1)[1].strip() for line in lines)  # a non-empty caption each

    code, report, _ = run_json(capsys, "caption", *files, *setup["stage2"], *GENERATION)
    assert code == 0 and report["command"] == "caption"
    assert report["model"] == {"arch": "point_opt", "model_type": "caption_tiny",
                               "checkpoint": setup["stage2"][3]}
    assert [r["file"] for r in report["results"]] == files
    # the same deterministic beam search: text and JSON say the same thing
    assert [f"{r['file']}: {r['caption']}" for r in report["results"]] == lines


def test_ask_puts_the_question_to_each_cloud(setup, capsys):
    files = [setup["files"]["cloud.npy"], setup["files"]["mesh.obj"]]
    code, report, err = run_json(capsys, "ask", *files, "what colour is it?", *setup["stage2"], *GENERATION)
    assert code == 0, err
    assert [r["file"] for r in report["results"]] == files
    for r in report["results"]:
        assert r["question"] == "what colour is it?" and isinstance(r["answer"], str) and r["answer"]
    code, out, _ = run(capsys, "ask", *files, "what colour is it?", *setup["stage2"], *GENERATION)
    assert out.splitlines() == [f"{r['file']}: {r['answer']}" for r in report["results"]]


def test_classify_gives_a_distribution_over_the_labels_from_a_list_or_a_file(setup, capsys):
    files = [setup["files"]["cloud.pkl"], setup["files"]["mesh.glb"], setup["files"]["mesh.off"]]
    labels = ["cube", "sphere", "red cone"]
    code, report, err = run_json(capsys, "classify", *files, "--labels", ",".join(labels), *setup["stage1"])
    assert code == 0, err
    for r in report["results"]:
        probs = r["probabilities"]
        assert list(probs) == labels and abs(sum(probs.values()) - 1) < 1e-3
        assert r["label"] == max(probs, key=probs.get)
    label_file = setup["folder"] / "labels.txt"
    label_file.write_text("# shapes\ncube\nsphere\n\nred cone\n")
    _, from_file, _ = run_json(capsys, "classify", *files, "--labels-file", label_file, *setup["stage1"])
    assert from_file["results"] == report["results"]
    _, out, _ = run(capsys, "classify", *files, "--labels", ",".join(labels), "--top-k", "2", *setup["stage1"])
    for line, r in zip(out.splitlines(), report["results"]):
        assert line.startswith(f"{r['file']}: {r['label']} (") and line.count("(") == 2


def test_similarity_is_the_models_point_text_cosine(setup, capsys):
    files = [setup["files"]["cloud.xyz"], setup["files"]["mesh.ply"]]
    code, report, err = run_json(capsys, "similarity", *files, "a red square", *setup["stage1"])
    assert code == 0, err
    model, processor = load_point_model("point_qformer", cfg_path=setup["stage1"][1], checkpoint=setup["stage1"][3])
    points = torch.stack([load_points(f, processor) for f in files])
    expected = point_text_scores(model, points, ["a red square"])[:, 0]
    got = [r["similarity"] for r in report["results"]]
    assert np.allclose(got, expected.numpy(), atol=1e-4) and all(-1 <= s <= 1 for s in got)
    assert all(r["text"] == "a red square" for r in report["results"])
    _, out, _ = run(capsys, "similarity", *files, "a red square", *setup["stage1"])
    assert out.splitlines() == [f"{f}: {s:.4f}" for f, s in zip(files, got)]


def test_render_writes_a_png_of_the_requested_size_showing_the_cloud_in_its_colours(setup, capsys, tmp_path):
    red = tmp_path / "red.npy"
    cloud = pf.coloured_cloud(500)
    cloud[:, 3:] = [1, 0, 0]
    np.save(red, cloud)
    png = tmp_path / "out.png"
    code, report, err = run_json(capsys, "caption", red, *setup["stage2"], *GENERATION, "--render", png,
                                 "--render-size", "800x400")
    assert code == 0, err
    assert report["render"] == str(png)
    image = Image.open(png)
    assert image.format == "PNG" and image.size == (800, 400)
    pixels = np.asarray(image.convert("RGB")).astype(int)
    red_pixels = (pixels[..., 0] > 200) & (pixels[..., 1] < 60) & (pixels[..., 2] < 60)
    assert red_pixels.sum() > 100  # the cloud is drawn, in its colour

    png2 = tmp_path / "two.png"
    files = [setup["files"]["cloud.npy"], setup["files"]["mesh.obj"]]
    code, _, _ = run(capsys, "classify", *files, "--labels", "a,b", *setup["stage1"], "--render", png2,
                     "--render-size", "600x700")
    assert code == 0 and Image.open(png2).size == (600, 700)


def test_a_failed_render_still_prints_every_answer(setup, capsys, tmp_path):
    files = [setup["files"]["cloud.npy"], setup["files"]["mesh.obj"]]
    code, out, err = run(capsys, "classify", *files, "--labels", "a,b", *setup["stage1"],
                         "--render", tmp_path / "no_such_dir" / "x.png")
    assert code == 1 and "cannot render to" in err and "no_such_dir" in err
    assert [line.split(":")[0] for line in out.strip().splitlines()] == [str(f) for f in files]


def test_a_bad_file_is_reported_by_name_and_the_others_still_answer(setup, capsys, tmp_path):
    nan = np.full((200, 6), 0.5, np.float32)
    nan[7, 0] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    np.save(tmp_path / "few.npy", pf.coloured_cloud(3))
    (tmp_path / "empty.obj").write_text("# no geometry\n")
    (tmp_path / "cloud.las").write_bytes(b"LASF")
    bad = {str(tmp_path / "nan.npy"): "NaN", str(tmp_path / "few.npy"): "only 3 points",
           str(tmp_path / "empty.obj"): "no triangles or points", str(tmp_path / "cloud.las"): "unknown extension",
           str(tmp_path / "absent.ply"): "no such file"}
    good = [setup["files"]["cloud.npy"], setup["files"]["mesh.off"]]
    files = [good[0], *bad, good[1]]
    code, report, err = run_json(capsys, "caption", *files, *setup["stage2"], *GENERATION, "--batch-size", "2")
    assert code == 1
    assert [r["file"] for r in report["results"]] == files
    for r in report["results"]:
        if r["file"] in bad:
            assert bad[r["file"]] in r["error"] and "caption" not in r
            assert f"{r['file']}: " in err and bad[r["file"]] in err
        else:
            assert r["caption"]
    code, out, _ = run(capsys, "caption", *files, *setup["stage2"], *GENERATION)
    assert code == 1 and [line.split(": ")[0] for line in out.splitlines()] == good


def test_without_a_trained_checkpoint_the_error_says_where_it_looked_and_what_to_do(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv(RUN_DIR_ENV, str(tmp_path / "runs"))
    code, out, err = run(capsys, "caption", tmp_path / "x.npy")
    expected = os.path.join(str(tmp_path / "runs"), "stage2", "checkpoint_last.pth")
    assert code == 2 and out == ""
    assert expected in err and "run_embedded_default.py" in err and "--checkpoint" in err
    code, _, err = run(capsys, "caption", tmp_path / "x.npy", "--checkpoint", tmp_path / "nope.pth")
    assert code == 2 and "nope.pth: checkpoint file not found" in err
    code, _, err = run(capsys, "caption", tmp_path / "x.npy", "--model-type", "caption_opt2.7b")
    assert code == 2 and "no weights for point_opt caption_opt2.7b" in err


def test_the_default_checkpoint_is_the_main_jobs_under_the_run_dir(tmp_path, monkeypatch):
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    assert default_checkpoint("point_opt") == os.path.join("output", "embedded", "stage2", "checkpoint_last.pth")
    monkeypatch.setenv(RUN_DIR_ENV, str(tmp_path))
    for arch, stage in (("point_opt", "stage2"), ("point_qformer", "stage1")):
        path = tmp_path / stage / "checkpoint_last.pth"
        cfg = model_config(arch)
        with pytest.raises(MissingWeightsError, match=stage):
            resolve_checkpoint(cfg)
        path.parent.mkdir()
        path.write_bytes(b"")
        assert resolve_checkpoint(cfg) == str(path)
        # a config that names its own weights is not redirected to the default
        assert resolve_checkpoint(model_config(arch, options=["model.finetuned=mine.pth"])) is None


def test_an_earlier_stage_alone_is_not_weights_and_a_given_checkpoint_replaces_the_configs(tmp_path):
    """``model.pretrained`` (stage 1 for point_opt) leaves stage 2 random: it is not enough. A checkpoint
    given by hand replaces the config's ``finetuned`` (not loaded first, not needed); ``pretrained``
    stays, loaded first for what the checkpoint lacks, so its file must exist."""
    with pytest.raises(MissingWeightsError, match="no weights for point_opt"):
        resolve_checkpoint(model_config("point_opt", options=["model.pretrained=stage1.pth"]), cfg_path="x.yaml")
    given, stage1 = tmp_path / "mine.pth", tmp_path / "stage1.pth"
    given.write_bytes(b"")
    cfg = model_config("point_opt", options=["model.finetuned=elsewhere/nope.pth"])
    assert resolve_checkpoint(cfg, str(given)) == str(given) and cfg.model.finetuned is None
    cfg = model_config("point_opt", options=[f"model.pretrained={stage1}"])
    with pytest.raises(MissingWeightsError, match="stage1.pth: model.pretrained not found.*model.pretrained=null"):
        resolve_checkpoint(cfg, str(given))
    stage1.write_bytes(b"")
    assert resolve_checkpoint(cfg, str(given)) == str(given) and cfg.model.pretrained == str(stage1)


def test_a_given_checkpoint_without_the_frozen_encoder_takes_it_from_model_pretrained(tmp_path):
    """What the README's "our run checkpoints" row says: stage 2 saved without its frozen encoder,
    loaded with --checkpoint and model.pretrained=<stage 1>, has stage 1's encoder."""
    stage1 = load_model("point_qformer", "pretrain_tiny")
    with torch.no_grad():
        for p in stage1.point_encoder.parameters():
            p.add_(1.0)  # unlike any fresh initialisation
    torch.save({"model": stage1.state_dict()}, tmp_path / "stage1.pth")
    stage2 = load_model("point_opt", "caption_tiny")
    trainable = {k: v for k, v in stage2.state_dict().items() if not k.startswith("point_encoder.")}
    torch.save({"model": trainable}, tmp_path / "stage2.pth")  # as projects/embedded/stage2.yaml trains it
    model, _ = load_point_model("point_opt", checkpoint=str(tmp_path / "stage2.pth"),
                                options=[f"model.pretrained={tmp_path / 'stage1.pth'}", "model.freeze_encoder=true"])
    for name, value in stage1.point_encoder.state_dict().items():
        assert torch.equal(model.point_encoder.state_dict()[name], value), name


@pytest.mark.parametrize("argv,message", [
    (["classify", "x.npy", "--labels", "cube"], "at least two labels"),
    (["classify", "x.npy", "--labels", "cube,cube"], "repeated"),
    (["classify", "x.npy", "--labels", "a,b", "--template", "no slot"], "exactly one {}"),
    (["caption", "x.npy", "--render", "o.png", "--render-size", "big"], "WIDTHxHEIGHT"),
    (["ask", "x.npy", "why?", "--prompt-template", "Q A"], "exactly one {}"),
    (["caption", "x.npy", "--model-type", "pretrain"], "unknown model type 'pretrain' for point_opt"),
    (["caption", "x.npy", "--cfg", "no/such.yaml"], "no/such.yaml: config file not found"),
    (["caption", "x.npy", "--options", "model.prompt"], "'model.prompt' is not KEY=VALUE"),
    (["caption", "x.npy", "--options", "model.num_query_token=4", "=5"], "'=5' is not KEY=VALUE"),
    (["ask", "x.npy", "why?", "--prompt-template", "Q: {} A: {x}"], "--prompt-template 'Q: {} A: {x}'"),
    (["ask", "x.npy", "why?", "--prompt-template", "Q: {} {"], "--prompt-template 'Q: {} {'"),
    (["classify", "x.npy", "--labels", "a,b", "--template", "a {} {shape}"], "--template 'a {} {shape}'"),
    (["classify", "x.npy", "--labels", "a,b", "--template", "a {}", "--template", "a {} {0}"],
     "--template 'a {} {0}'"),
])
def test_bad_options_stop_before_any_model_is_built(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == "" and message in err


def test_a_config_for_the_other_stage_is_refused(setup, capsys):
    code, _, err = run(capsys, "caption", setup["files"]["cloud.npy"], *setup["stage1"])
    assert code == 2 and "model.arch is 'point_qformer'; this needs a point_opt model" in err


def test_load_points_reads_every_format_into_the_processors_tensor(setup):
    _, processor = load_point_model("point_opt", cfg_path=setup["stage2"][1], checkpoint=setup["stage2"][3])
    for name, path in setup["files"].items():
        points = load_points(path, processor)
        assert points.shape == (NUM_POINTS, 6) and points.dtype == torch.float32, name
        assert torch.equal(points, processor(read_cloud(path, white_if_missing=True))), name
    with pytest.raises(CloudReadError, match="cloud.npy: only 600 points; the model needs at least 1000"):
        load_points(setup["files"]["cloud.npy"], processor, min_points=1000)


def test_python_generate_matches_the_command_line(setup, capsys):
    path = setup["files"]["mesh.glb"]
    model, processor = load_point_model("point_opt", cfg_path=setup["stage2"][1], checkpoint=setup["stage2"][3])
    caption = model.generate({"point": load_points(path, processor).unsqueeze(0)}, num_beams=2, max_length=6,
                             min_length=2)
    _, report, _ = run_json(capsys, "caption", path, *setup["stage2"], *GENERATION)
    assert report["results"][0]["caption"] == caption[0]


def test_the_console_script_runs_as_a_program(setup, tmp_path):
    (entry,) = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "lavis-point"]
    assert entry.load() is main
    out = subprocess.run([sys.executable, "-m", "lavis_point.cli", "similarity", setup["files"]["cloud.npz"],
                          str(tmp_path / "gone.npy"), "a cube", *setup["stage1"], "--json"],
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 1, out.stderr
    results = json.loads(out.stdout)["results"]
    assert "similarity" in results[0] and results[1]["error"] == "no such file"
    assert "gone.npy: no such file" in out.stderr


def test_the_readme_python_path_and_the_default_lookup_agree(setup, capsys, tmp_path, monkeypatch):
    from lavis.models import load_model_and_preprocess

    torch.manual_seed(0)
    trained, _, _ = load_model_and_preprocess("point_opt", "caption_tiny", is_eval=True)
    monkeypatch.setenv(RUN_DIR_ENV, str(tmp_path))
    (tmp_path / "stage2").mkdir()
    torch.save({"model": trained.state_dict()}, default_checkpoint("point_opt"))

    model, vis_processors, _ = load_model_and_preprocess("point_opt", "caption_tiny", is_eval=True)
    model.load_checkpoint(default_checkpoint("point_opt"))
    path = setup["files"]["cloud.ply"]
    points = load_points(path, vis_processors["eval"]).unsqueeze(0)  # (1, 1024, 6)
    assert points.shape == (1, 1024, 6)
    captions = model.generate({"point": points}, num_beams=2, max_length=6, min_length=2)
    _, report, err = run_json(capsys, "caption", path, *GENERATION)  # no --cfg, no --checkpoint
    assert report["model"]["checkpoint"] == default_checkpoint("point_opt"), err
    assert [r["caption"] for r in report["results"]] == captions


def test_many_files_show_a_progress_bar_on_a_terminal(setup, capsys, monkeypatch):
    files = list(setup["files"].values())[:3]
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    code = main(["similarity", *files, "a cube", *setup["stage1"], "--batch-size", "1"])
    err = capsys.readouterr().err
    assert code == 0 and "3/3" in err and "file" in err


def test_a_label_file_that_is_not_utf8_is_named(capsys, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_bytes(b"cube\nsph\xe8re\n")  # Latin-1
    code, out, err = run(capsys, "classify", "x.npy", "--labels-file", labels)
    assert code == 2 and out == ""
    assert f"{labels}: not UTF-8 text" in err and "byte 8" in err


def test_a_device_that_is_not_there_is_a_usage_error(capsys, monkeypatch):
    """Checked before any model is built; as if the machine had one GPU or none, whatever it has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, out, err = run(capsys, "caption", "x.npy", "--device", "cuda")
    assert code == 2 and out == "" and "--device cuda: no GPU is visible" in err and "--device cpu" in err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    code, _, err = run(capsys, "caption", "x.npy", "--device", "cuda:1")
    assert code == 2 and "--device cuda:1: there is no GPU 1 (1 visible)" in err
    code, _, err = run(capsys, "caption", "x.npy", "--device", "gpu")
    assert code == 2 and "--device gpu: not a device" in err


def test_a_model_that_cannot_be_built_is_a_one_line_usage_error(setup, capsys, tmp_path):
    """An OPT that is neither a local folder nor reachable on the hub (tests run offline)."""
    missing = tmp_path / "no_opt"
    code, out, err = run(capsys, "caption", setup["files"]["cloud.npy"], *setup["stage2"],
                         "--options", f"model.opt_model={missing}")
    errors = [line for line in err.splitlines() if line.startswith("lavis-point: error:")]
    assert code == 2 and out == "" and len(errors) == 1 and "Traceback" not in err
    assert "cannot build point_opt caption_tiny" in errors[0] and str(missing) in errors[0]
    assert "model.opt_model" in errors[0]


NOT_CHECKPOINTS = {
    "page.pth": (b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head></html>\n",
                 "an HTML page, not a checkpoint: a failed download"),
    "pointer.pth": (b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 1234\n",
                    "a git-lfs pointer, not the checkpoint: run git lfs pull"),
    "config.pth": (b"model:\n  arch: point_opt\n", "a text file, not a checkpoint (it starts 'model:')"),
    "error.pth": (b"<?xml version='1.0'?><Error><Code>AccessDenied</Code></Error>",
                  "an XML document, not a checkpoint: a failed download"),
    "noise.pth": (bytes(range(7, 250, 3)), "neither a zip archive (torch.save) nor a pickle stream: it starts"),
    "empty.pth": (b"", "an empty file"),
    "model.pth": (len(b'{"__metadata__":{}}').to_bytes(8, "little") + b'{"__metadata__":{}}',
                  "a safetensors file, not a torch checkpoint: read it with safetensors.torch.load_file"),
}


@pytest.mark.parametrize("name", sorted(NOT_CHECKPOINTS))
def test_a_file_that_is_no_checkpoint_says_what_it_looks_like(setup, capsys, tmp_path, name):
    content, message = NOT_CHECKPOINTS[name]
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as caught:
        read_checkpoint(str(path))
    assert str(caught.value).startswith(f"{path}: {message}"), str(caught.value)
    assert "refused" not in str(caught.value) and "re-save" not in str(caught.value)
    code, out, err = run(capsys, "caption", "x.npy", "--cfg", setup["stage2"][1], "--checkpoint", path)
    assert code == 2 and out == "" and f"{path}: {message}" in err


def test_a_plain_pickle_with_a_disallowed_global_is_still_refused_as_unsafe(tmp_path):
    marker = tmp_path / "marker"
    path = pf.write_pickle(tmp_path / "evil.pth", pf.CreatesFileWhenUnpickled(marker))
    with pytest.raises(CheckpointError, match=r"evil\.pth: refused to load: .*weights_only=True"):
        read_checkpoint(path)
    assert not marker.exists()


def test_a_config_that_is_not_a_yaml_mapping_is_named(capsys, tmp_path):
    (tmp_path / "broken.yaml").write_text("model: [1\n")
    (tmp_path / "list.yaml").write_text("- model\n")
    for name, message in (("broken.yaml", "not valid YAML (while parsing"), ("list.yaml", "expected a YAML mapping")):
        code, out, err = run(capsys, "caption", "x.npy", "--cfg", tmp_path / name)
        assert code == 2 and out == "" and f"{tmp_path / name}: {message}" in err
    code, _, err = run(capsys, "caption", "x.npy", "--options", "model.prompt=[a")
    assert code == 2 and "options ['model.prompt=[a']: a value is not valid YAML" in err
