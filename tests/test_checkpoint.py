import argparse
import logging
import os
import re

import pytest
import torch

import lavis_point  # noqa: F401
from lavis_point.models.checkpoint import (
    CheckpointError,
    read_checkpoint,
    save_checkpoint_atomic,
    trainable_state_dict,
)
from tests.small_models import small_stage1, small_stage2


def test_checkpoint_without_frozen_encoder_loads_and_reports_it(tmp_path):
    model = small_stage1(freeze_encoder=True)
    path = str(tmp_path / "ck.pth")
    torch.save({"model": trainable_state_dict(model)}, path)
    assert not any(k.startswith("point_encoder.") for k in torch.load(path, weights_only=True)["model"])
    fresh = small_stage1(freeze_encoder=True)
    torch.save(model.point_encoder.state_dict(), tmp_path / "encoder.pth")
    fresh.point_encoder.load_checkpoint(str(tmp_path / "encoder.pth"))  # model.point_encoder.checkpoint
    summary = fresh.load_checkpoint(path)
    assert summary["absent_frozen_or_optional"] > 0


def test_missing_trainable_key_is_an_error_that_lists_it(tmp_path):
    state = small_stage1().state_dict()
    del state["itm_head.weight"]
    path = str(tmp_path / "ck.pth")
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): \['itm_head.weight'\]"):
        small_stage1().load_checkpoint(path)


def test_mis_shaped_and_unexpected_keys_are_errors(tmp_path):
    state = small_stage1().state_dict()
    state["query_tokens"] = torch.zeros(1, 5, 32)
    state["surprise.weight"] = torch.zeros(2)
    path = str(tmp_path / "ck.pth")
    torch.save({"state_dict": state}, path)
    with pytest.raises(CheckpointError) as err:
        small_stage1().load_checkpoint(path)
    assert "query_tokens: checkpoint (1, 5, 32) vs model (1, 4, 32)" in str(err.value)
    assert "surprise.weight" in str(err.value)


def test_values_land_where_they_belong(tmp_path):
    source = small_stage1().eval()
    path = str(tmp_path / "ck.pth")
    torch.save({"model": {"module." + k: v for k, v in source.state_dict().items()}}, path)
    target = small_stage1().eval()
    target.load_checkpoint(path)
    pts = torch.rand(2, 128, 6)
    assert torch.equal(source.encode_points(pts)[2], target.encode_points(pts)[2])


def test_stage2_starts_from_a_stage1_file_ignoring_its_text_heads(tmp_path):
    stage1 = small_stage1(global_itc_weight=1.0).eval()
    path = str(tmp_path / "stage1.pth")
    torch.save({"model": stage1.state_dict()}, path)
    stage2 = small_stage2().eval()
    summary = stage2.load_from_pretrained(path)
    assert summary["ignored"] > 0
    pts = torch.rand(2, 128, 6)
    with torch.no_grad():
        assert torch.equal(stage1.query_outputs(stage1.encode_point_tokens(pts)),
                           stage2.query_outputs(stage2.encode_point_tokens(pts)))
    with pytest.raises(CheckpointError, match="opt_proj"):
        small_stage2().load_checkpoint(path)  # as a finished stage-2 file it lacks the projection


class NotPlainData:
    """A class of the test's own: nothing a checkpoint reader may rebuild."""

    def __init__(self, value):
        self.value = value


def ulip2_style_file(encoder, path, args):
    """ULIP's main.py: {'epoch', 'state_dict' (DDP names, the whole ULIP model), 'optimizer', 'scaler',
    'best_acc1', 'args'}, with ``args`` its argparse.Namespace."""
    state = {"module.point_encoder." + k: v for k, v in encoder.state_dict().items()}
    state["module.pc_projection"] = torch.randn(encoder.width, 8)
    torch.save({"epoch": 3, "state_dict": state, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3}]},
                "scaler": {"scale": 65536.0}, "best_acc1": 60.1, "args": args}, path)
    return str(path)


def test_a_ulip2_file_with_its_argparse_namespace_loads_through_load_model(tmp_path):
    """ULIP-2's released Point-BERT file pickles its argparse.Namespace: rebuilt as plain attributes,
    it must not stop the README's encoder source."""
    from lavis.models import load_model

    source = load_model("point_bert", "tiny", is_eval=True)
    path = ulip2_style_file(source, tmp_path / "ulip2.pt",
                            argparse.Namespace(model="ULIP2_PointBERT_Colored", npoints=10000, lr=1e-3))
    assert read_checkpoint(path)["args"].npoints == 10000
    loaded = load_model("point_bert", "tiny", is_eval=True, checkpoint=path)
    assert loaded.weights_from == path
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), source.state_dict().values()))


@pytest.mark.parametrize("extra", [NotPlainData(1), argparse.Namespace(inner=NotPlainData(1))],
                         ids=["own_class", "own_class_inside_a_namespace"])
def test_a_checkpoint_that_pickles_other_objects_is_refused_by_name(tmp_path, extra):
    path = str(tmp_path / "evil.pth")
    torch.save({"model": {}, "args": extra}, path)
    with pytest.raises(CheckpointError, match=r"evil\.pth: refused to load: .*weights_only=True.*NotPlainData"):
        read_checkpoint(path)


def test_truncated_file_is_a_clear_error(tmp_path):
    path = str(tmp_path / "ck.pth")
    torch.save({"model": small_stage1().state_dict()}, path)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="ck.pth"):
        read_checkpoint(path)


def test_atomic_save_leaves_no_temporary_file(tmp_path):
    path = str(tmp_path / "ck.pth")
    save_checkpoint_atomic({"model": {"a": torch.ones(2)}}, path)
    assert os.listdir(tmp_path) == ["ck.pth"]


def test_a_checkpoint_without_the_frozen_encoder_is_refused_when_nothing_else_gave_it_weights(tmp_path, caplog):
    """A frozen encoder may be absent from a file (runner checkpoints and GPT4Point's stage-1 files omit
    it), but then it must come from model.point_encoder.checkpoint: a frozen random encoder would make
    every metric noise, so that is an error; a trainable one (training from scratch) gets a warning."""
    from tests.small_models import small_stage1
    trained = small_stage1(freeze_encoder=True)
    torch.save({k: v for k, v in trained.state_dict().items() if not k.startswith("point_encoder.")},
               tmp_path / "no_encoder.pth")
    torch.save(trained.point_encoder.state_dict(), tmp_path / "encoder.pth")
    with pytest.raises(CheckpointError, match="no_encoder.pth holds no point_encoder weights.*"
                                              "model.point_encoder.checkpoint.*frozen encoder would stay random"):
        small_stage1(freeze_encoder=True).load_checkpoint(str(tmp_path / "no_encoder.pth"))
    with caplog.at_level(logging.WARNING):  # an earlier stage (BLIP-2's, say) before training the encoder
        small_stage1(freeze_encoder=False).load_from_pretrained(str(tmp_path / "no_encoder.pth"))
    assert "no_encoder.pth holds no point_encoder weights" in caplog.text and "random initialisation" in caplog.text
    caplog.clear()
    fresh = small_stage1(freeze_encoder=True)
    fresh.point_encoder.load_checkpoint(str(tmp_path / "encoder.pth"))
    with caplog.at_level(logging.WARNING):
        fresh.load_checkpoint(str(tmp_path / "no_encoder.pth"))
    assert "point_encoder" not in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), trained.state_dict().values()))


def lavis_runner_state(model):
    """What LAVIS's RunnerBase._save_checkpoint keeps: every buffer, and only parameters that train."""
    trains = {name for name, p in model.named_parameters() if p.requires_grad}
    params = {name for name, _ in model.named_parameters()}
    return {k: v for k, v in model.state_dict().items() if k in trains or k not in params}


@pytest.mark.parametrize("make", [small_stage1, small_stage2])
def test_a_lavis_runner_file_with_only_the_frozen_encoders_buffers_is_refused(tmp_path, make):
    """The frozen encoder's BatchNorm buffers in the file are not its weights: loading must stop, as for a
    file without any encoder key, rather than evaluate a random encoder."""
    state = lavis_runner_state(make(freeze_encoder=True))
    assert any(k.startswith("point_encoder.") for k in state)  # buffers: running means and variances
    torch.save({"model": state}, tmp_path / "lavis.pth")
    with pytest.raises(CheckpointError, match="holds no point_encoder weights"):
        make(freeze_encoder=True).load_checkpoint(str(tmp_path / "lavis.pth"))


def test_an_encoder_file_missing_blocks_is_refused_even_when_the_encoder_is_frozen(tmp_path):
    state = small_stage1().point_encoder.state_dict()
    cut = {k: v for k, v in state.items() if not k.startswith("blocks.blocks.0.")}
    assert len(cut) < len(state)
    torch.save(cut, tmp_path / "encoder.pth")
    with pytest.raises(CheckpointError, match=r"missing keys .*blocks\.blocks\.0\."):
        small_stage1(freeze_encoder=True).point_encoder.load_checkpoint(str(tmp_path / "encoder.pth"))


def test_a_frozen_part_is_in_a_file_whole_or_not_at_all(tmp_path):
    model = small_stage1(freeze_encoder=True)
    state = model.state_dict()
    del state["point_encoder.norm.weight"]  # the rest of the frozen encoder is there
    torch.save(state, tmp_path / "ck.pth")
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): \['point_encoder.norm.weight'\]"):
        small_stage1(freeze_encoder=True).load_checkpoint(str(tmp_path / "ck.pth"))


def test_freezing_a_model_by_hand_does_not_make_its_trained_parts_optional(tmp_path):
    """What may be absent is what the config freezes, not what requires_grad says at load time: a stage-1
    file into a stage-2 model frozen for inference would leave opt_proj random."""
    stage1 = small_stage1()
    torch.save(stage1.state_dict(), tmp_path / "stage1.pth")
    model = small_stage2().requires_grad_(False)
    with pytest.raises(CheckpointError, match=r"missing keys .*opt_proj\."):
        model.load_checkpoint(str(tmp_path / "stage1.pth"))


def save_with_lavis_runner(model, folder):
    """A checkpoint written by LAVIS's own RunnerBase._save_checkpoint (the stock runner, GPT4Point's)."""
    from types import SimpleNamespace

    from lavis.runners.runner_base import RunnerBase

    runner = SimpleNamespace(model=model, unwrap_dist_model=lambda m: m, output_dir=str(folder), scaler=None,
                             optimizer=torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]),
                             config=SimpleNamespace(to_dict=dict))
    RunnerBase._save_checkpoint(runner, 0)
    return str(folder / "checkpoint_0.pth")


def test_a_lavis_runner_file_of_a_frozen_opt_loads(tmp_path):
    """The OPT's output head is tied to its input embeddings, so the stock runner, which drops frozen
    parameters by their first name, keeps the head's second name: a frozen OPT that is not absent whole.
    That one alias must not make the file's OPT count as present (and then every other OPT key missing)."""
    src = small_stage2(freeze_opt=True)
    path = save_with_lavis_runner(src, tmp_path)
    assert [k for k in torch.load(path)["model"] if k.startswith("opt_model.")] == ["opt_model.lm_head.weight"]
    dst = small_stage2(freeze_opt=True)
    dst.opt_model.load_state_dict(src.opt_model.state_dict())  # the same pretrained OPT, as a run configures
    dst.load_checkpoint(path)
    assert all(torch.equal(a, b) for a, b in zip(dst.state_dict().values(), src.state_dict().values()))


def test_one_name_of_a_tied_tensor_is_enough(tmp_path):
    """A file holding the OPT's input embeddings but not the head tied to them holds the head too."""
    src = small_stage2()
    state = src.state_dict()
    del state["opt_model.lm_head.weight"]
    torch.save({"model": state}, tmp_path / "untied_name.pth")
    dst = small_stage2()
    dst.load_checkpoint(str(tmp_path / "untied_name.pth"))
    assert torch.equal(dst.opt_model.lm_head.weight, src.opt_model.lm_head.weight)


@pytest.mark.parametrize("url", ["https://example.org/blip2_pretrained.pth", "http://host/x.pth"])
def test_a_url_is_refused_as_a_url_not_as_a_missing_file(url):
    """LAVIS's configs name checkpoints by URL and its loader downloads them; ours reads local files
    only, and said "checkpoint file not found" of a URL."""
    with pytest.raises(CheckpointError, match="a URL: lavis-point reads checkpoints from local files only"):
        read_checkpoint(url)


def without_keys(state, prefix):
    cut = {k: v for k, v in state.items() if not k.startswith(prefix)}
    assert 0 < len(state) - len(cut) < sum(k.startswith(prefix.split(".")[0] + ".") for k in state)
    return cut


@pytest.mark.parametrize("make, prefix", [
    (lambda: small_stage1(freeze_encoder=True), "point_encoder.blocks.blocks.0."),
    (lambda: small_stage1(freeze_encoder=False), "point_encoder.blocks.blocks.0."),
    (lambda: small_stage2(freeze_encoder=True, freeze_opt=True), "opt_model.model.decoder.layers.0."),
], ids=["frozen_encoder", "trained_encoder", "frozen_opt"])
def test_a_pretrained_file_holding_part_of_an_optional_part_is_refused(tmp_path, make, prefix):
    """What a ``pretrained`` file may lack (the point encoder, the OPT) it may lack whole, never in part:
    a file with the encoder's first layers and not the rest left the rest random (and, frozen, unnoticed)."""
    path = str(tmp_path / "half.pth")
    torch.save({"model": without_keys(make().state_dict(), prefix)}, path)
    part = prefix.split(".")[0]
    with pytest.raises(CheckpointError, match=rf"half\.pth: .*\n.*missing keys \(\d+\): \['{re.escape(prefix)}"
                                              rf"(.|\n)*{part}: the file holds some of its weights but not all"):
        make().load_from_pretrained(path)


def test_long_key_lists_in_a_load_error_are_cut_to_ten_and_a_count_by_part(tmp_path):
    state = small_stage1().state_dict()
    state.update({f"surprise.layer{i}.weight": torch.zeros(1) for i in range(12)})
    torch.save(state, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError) as err:
        small_stage1().load_checkpoint(str(tmp_path / "extra.pth"))
    message = str(err.value)
    assert "unexpected keys (12): ['surprise.layer0.weight'," in message
    assert "'surprise.layer9.weight'] and 2 more (by part: surprise.* 12)" in message
    assert "surprise.layer10" not in message
