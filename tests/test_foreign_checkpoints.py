"""Checkpoints in the published layouts (GPT4Point stage 1 / stage 2, BLIP-2 image stage 1, Point-BERT)
load through the public path and every tensor lands where it belongs.

Each file is built from the layouts in ``tests/layouts.py`` (names and shapes) with random values,
loaded with ``load_model(..., checkpoint=...)``, ``load_checkpoint`` or ``load_from_pretrained``,
and compared with a fresh model whose tensors were copied in by hand (names mapped here, not by the
product code): same state dict, same outputs. Point-BERT runs at GPT4Point's real size; the
Q-Former models use small sizes passed through their constructors.
"""
import os

import pytest
import torch
from lavis.models import load_model

import lavis_point  # noqa: F401
from lavis_point.models.checkpoint import CheckpointError
from lavis_point.models.point_bert import PointBertEncoder
from lavis_point.models.point_opt import PointOPT
from lavis_point.models.point_qformer import PointQFormer
from tests.layouts import point_encoder_layout, qformer_layout

# ---------------------------------------------------------------------------------------------
# Building files from layouts, placing tensors by hand, comparing
# ---------------------------------------------------------------------------------------------


def random_tensors(layout, seed):
    """Random values for a {name: shape} layout, valid where values matter (BatchNorm statistics,
    position ids, the temperature)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in layout.items():
        if name.endswith("num_batches_tracked"):
            out[name] = torch.tensor(int(torch.randint(1, 10 ** 6, (), generator=g)), dtype=torch.int64)
        elif name.endswith("position_ids"):
            out[name] = torch.arange(shape[-1], dtype=torch.int64).expand(shape).clone()
        elif name.endswith("running_var"):
            out[name] = torch.rand(shape, generator=g) + 0.5
        elif name == "temp":
            out[name] = 0.03 + 0.05 * torch.rand((), generator=g)
        elif len(shape) == 1 and name.endswith("weight"):  # LayerNorm / BatchNorm scales
            out[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            out[name] = 0.05 * torch.randn(shape, generator=g)
    # BERT ties the LM head's bias to its decoder's bias, and BLIP-2 its decoder to the word
    # embeddings: a published file holds each value twice.
    for copy, original in (("cls.predictions.bias", "cls.predictions.decoder.bias"),
                           ("cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight")):
        for name in [n for n in out if n.endswith(copy)]:
            twin = name[:-len(copy)] + original
            if twin in out:
                out[name] = out[twin].clone()
    return out


def prefixed(prefix, tensors):
    return {prefix + k: v for k, v in tensors.items()}


def place_by_hand(model, tensors, rename=lambda name: name):
    """Copy each tensor into the parameter / buffer ``rename(name)`` (None: skip it); returns the
    set of model names written."""
    targets = dict(model.named_parameters(remove_duplicate=False))
    targets.update(dict(model.named_buffers(remove_duplicate=False)))
    placed = set()
    with torch.no_grad():
        for name, value in tensors.items():
            target_name = rename(name)
            if target_name is None:
                continue
            assert target_name in targets, f"{name} -> {target_name}: no such parameter or buffer"
            target = targets[target_name]
            assert target.shape == value.shape, f"{name}: {tuple(value.shape)} vs {tuple(target.shape)}"
            target.copy_(value)
            placed.add(target_name)
    return placed


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"tensors that differ: {different[:20]}"


def save(obj, path):
    torch.save(obj, path)
    return str(path)


def clouds(batch, num_points, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, num_points, 6, generator=g) * 2 - 1


# ---------------------------------------------------------------------------------------------
# 1. Point-BERT at GPT4Point's size, through load_model("point_bert", "gpt4point", checkpoint=...)
# ---------------------------------------------------------------------------------------------

GPT4POINT_ENCODER = dict(num_groups=512, group_size=32, width=384, depth=12, num_heads=6,
                         channel_layout="gpt4point")


@pytest.fixture(scope="module")
def gpt4point_encoder():
    """The encoder tensors, and a hand-placed reference's outputs on (2, 2048, 6) clouds."""
    tensors = random_tensors(point_encoder_layout(depth=12, width=384), seed=11)
    reference = PointBertEncoder(**GPT4POINT_ENCODER).eval()
    placed = place_by_hand(reference, tensors)
    assert placed == set(reference.state_dict()), "the layout must cover the whole encoder"
    points = clouds(2, 2048)
    with torch.no_grad():
        expected = reference(points)
    assert expected.shape == (2, 512, 384)
    return tensors, reference, points, expected


def gpt4point_stage1_other_keys(seed=12):
    """What a GPT4Point stage-1 file holds beside the encoder (real shapes; a 1-layer query path of the
    Q-Former keeps the file small: these keys are not the encoder's and must not be taken)."""
    heads = {"query_tokens": (1, 32, 768), "pc_projection": (384, 1408),
             "point_proj.weight": (256, 768), "point_proj.bias": (256,),
             "text_proj.weight": (256, 768), "text_proj.bias": (256,),
             "itm_head.weight": (2, 768), "itm_head.bias": (2,), "temp": ()}
    other = random_tensors(heads, seed)
    other.update(prefixed("Qformer.", random_tensors(qformer_layout(num_layers=1, query_only=True), seed + 1)))
    return other


POINT_BERT_FILES = {
    "bare": lambda t: t,
    "under_model": lambda t: {"model": t},
    "under_state_dict_with_module_prefix": lambda t: {"state_dict": prefixed("module.", t)},
    "gpt4point_stage1_file": lambda t: {"model": {**prefixed("point_encoder.", t), **gpt4point_stage1_other_keys()}},
}


@pytest.mark.parametrize("wrapping", list(POINT_BERT_FILES))
def test_point_bert_gpt4point_file_loads_through_load_model(tmp_path, gpt4point_encoder, wrapping):
    tensors, reference, points, expected = gpt4point_encoder
    path = save(POINT_BERT_FILES[wrapping](tensors), tmp_path / "point_bert.pth")
    try:
        model = load_model("point_bert", "gpt4point", is_eval=True, checkpoint=path)
    finally:
        os.remove(path)  # ~85 MB of random numbers
    assert_same_state(model, reference)
    with torch.no_grad():
        out = model(points)
    assert out.shape == (2, 512, 384)
    assert torch.equal(out, expected)


# ---------------------------------------------------------------------------------------------
# Small Q-Former models (sizes through the constructors)
# ---------------------------------------------------------------------------------------------

ENCODER = dict(model_type="tiny", num_groups=8, group_size=8, width=32, depth=1, num_heads=4,
               pointnet_dims=[16, 16, 32], encoder_dims=16, drop_path_rate=0.0)
HIDDEN, INTER, ENC_WIDTH, LAYERS, VOCAB = 64, 128, 48, 2, 30523  # bert-base-uncased + [DEC]
QFORMER = dict(hidden_size=HIDDEN, num_layers=LAYERS, num_heads=4, intermediate_size=INTER,
               encoder_width=ENC_WIDTH, cross_attention_freq=2, dropout=0.0, vocab_size=VOCAB)
EMBED, NUM_QUERY = 32, 4
OPT = dict(hidden_size=40, word_embed_proj_dim=40, num_hidden_layers=1, num_attention_heads=4, ffn_dim=80,
           max_position_embeddings=64, dropout=0.0)
TEXTS = ["a small red cube", "a large blue sphere with a long name"]


def stage1_model(freeze_encoder, seed=0):
    torch.manual_seed(seed)  # the same seed gives the same values to what a file does not hold
    return PointQFormer(embed_dim=EMBED, point_encoder_cfg=ENCODER, qformer_cfg=QFORMER,
                        num_query_token=NUM_QUERY, freeze_encoder=freeze_encoder).eval()


def stage2_model(seed=0):
    torch.manual_seed(seed)
    return PointOPT(opt_config=OPT, opt_tokenizer="asset:tiny_opt_tokenizer", freeze_opt=True,
                    prompt="a 3D point cloud of ", point_encoder_cfg=ENCODER, qformer_cfg=QFORMER,
                    num_query_token=NUM_QUERY, freeze_encoder=True).eval()


def stage1_heads(point_head):
    return {"query_tokens": (1, NUM_QUERY, HIDDEN),
            f"{point_head}.weight": (EMBED, HIDDEN), f"{point_head}.bias": (EMBED,),
            "text_proj.weight": (EMBED, HIDDEN), "text_proj.bias": (EMBED,),
            "itm_head.weight": (2, HIDDEN), "itm_head.bias": (2,), "temp": ()}


def small_qformer(query_only=False, seed=22):
    layout = qformer_layout(num_layers=LAYERS, hidden=HIDDEN, inter=INTER, encoder_width=ENC_WIDTH, vocab=VOCAB,
                            cross_freq=2, query_only=query_only)
    return prefixed("Qformer.", random_tensors(layout, seed))


def gpt4point_stage1_file():
    """GPT4Point stage 1 without point_encoder.* (it is frozen there and often left out)."""
    state = random_tensors({**stage1_heads("point_proj"), "pc_projection": (ENCODER["width"], ENC_WIDTH)}, 21)
    state.update(small_qformer())
    return {"model": state}


def blip2_image_stage1_file():
    """BLIP-2 stage 1: vision_proj, an image encoder and its LayerNorm; no point encoder or pc_projection."""
    state = random_tensors(stage1_heads("vision_proj"), 31)
    state.update(small_qformer(seed=32))
    vit = {"visual_encoder.cls_token": (1, 1, ENC_WIDTH), "visual_encoder.pos_embed": (1, 5, ENC_WIDTH),
           "visual_encoder.patch_embed.proj.weight": (ENC_WIDTH, 3, 14, 14),
           "visual_encoder.patch_embed.proj.bias": (ENC_WIDTH,),
           "visual_encoder.blocks.0.norm1.weight": (ENC_WIDTH,), "visual_encoder.blocks.0.norm1.bias": (ENC_WIDTH,),
           "visual_encoder.blocks.0.attn.qkv.weight": (3 * ENC_WIDTH, ENC_WIDTH),
           "visual_encoder.blocks.0.attn.proj.weight": (ENC_WIDTH, ENC_WIDTH),
           "visual_encoder.blocks.0.mlp.fc1.weight": (4 * ENC_WIDTH, ENC_WIDTH),
           "visual_encoder.blocks.0.mlp.fc2.weight": (ENC_WIDTH, 4 * ENC_WIDTH),
           "ln_vision.weight": (ENC_WIDTH,), "ln_vision.bias": (ENC_WIDTH,)}
    state.update(random_tensors(vit, 33))
    return {"model": state}, len(vit)


def gpt4point_stage2_file(opt_hidden=OPT["hidden_size"]):
    """GPT4Point stage 2: query path of the Q-Former only, opt_proj; no opt_model.* or point_encoder.*."""
    state = random_tensors({"query_tokens": (1, NUM_QUERY, HIDDEN), "pc_projection": (ENCODER["width"], ENC_WIDTH),
                            "opt_proj.weight": (opt_hidden, HIDDEN), "opt_proj.bias": (opt_hidden,)}, 41)
    state.update(small_qformer(query_only=True, seed=42))
    return {"model": state}


def assert_stage1_outputs_equal(model, reference):
    points = clouds(2, 128)
    with torch.no_grad():
        for got, want in zip(model.encode_points(points), reference.encode_points(points)):
            assert torch.equal(got, want)
        assert torch.equal(model.encode_text(TEXTS), reference.encode_text(TEXTS))
        tokens = model.tokenize(TEXTS)
        point_tokens = model.encode_point_tokens(points)
        assert torch.equal(model.match_logits(point_tokens, tokens.input_ids, tokens.attention_mask),
                           reference.match_logits(point_tokens, tokens.input_ids, tokens.attention_mask))
        logits = [m.Qformer.lm_logits(m.Qformer(query_embeds=m.query_tokens.expand(2, -1, -1),
                                                 input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                                                 points=point_tokens, causal=True))
                  for m in (model, reference)]
        assert torch.equal(*logits)
    assert torch.equal(model.temp, reference.temp)


def point_feats(model):
    with torch.no_grad():
        return model.encode_points(clouds(2, 128))[2]


def names_under(model, prefix):
    return {k for k in model.state_dict() if k.startswith(prefix)}


# ---------------------------------------------------------------------------------------------
# 2. point_qformer from a BLIP-2 image stage-1 file (load_from_pretrained)
# ---------------------------------------------------------------------------------------------


def test_point_qformer_from_blip2_image_stage1_file(tmp_path):
    ckpt, num_image_keys = blip2_image_stage1_file()
    path = save(ckpt, tmp_path / "blip2_stage1.pth")
    model, reference = stage1_model(freeze_encoder=False), stage1_model(freeze_encoder=False)
    assert_same_state(model, reference)  # what the file lacks starts equal in both
    before = point_feats(model)

    summary = model.load_from_pretrained(path)
    assert not torch.equal(point_feats(model), before)  # the outputs depend on what was loaded

    def blip2_to_ours(name):
        if name.startswith(("visual_encoder.", "ln_vision.")):
            return None
        if name.startswith("vision_proj."):
            return "point_proj." + name[len("vision_proj."):]
        return name

    placed = place_by_hand(reference, ckpt["model"], blip2_to_ours)
    absent = names_under(reference, "point_encoder.") | {"pc_projection"}
    assert set(reference.state_dict()) - placed == absent
    assert summary["ignored"] == num_image_keys
    assert summary["loaded"] == len(ckpt["model"]) - num_image_keys
    assert summary["absent_frozen_or_optional"] == len(absent)
    assert_same_state(model, reference)
    assert_stage1_outputs_equal(model, reference)


# ---------------------------------------------------------------------------------------------
# 3. point_qformer from a GPT4Point stage-1 file without point_encoder.* (load_checkpoint)
# ---------------------------------------------------------------------------------------------


def with_encoder_file(model, tmp_path):
    """Loads the model's own (random, seeded) encoder from a file, as model.point_encoder.checkpoint
    would: a frozen encoder must come from somewhere before a file without it is loaded."""
    torch.save(model.point_encoder.state_dict(), tmp_path / "encoder.pth")
    model.point_encoder.load_checkpoint(str(tmp_path / "encoder.pth"))


def test_point_qformer_from_gpt4point_stage1_file_without_encoder(tmp_path):
    ckpt = gpt4point_stage1_file()
    path = save(ckpt, tmp_path / "gpt4point_stage1.pth")
    model, reference = stage1_model(freeze_encoder=True), stage1_model(freeze_encoder=True)
    assert_same_state(model, reference)
    before = point_feats(model)

    with_encoder_file(model, tmp_path)  # GPT4Point's stage-1 file holds no encoder: it comes first
    summary = model.load_checkpoint(path)
    assert not torch.equal(point_feats(model), before)

    placed = place_by_hand(reference, ckpt["model"])
    encoder_keys = names_under(reference, "point_encoder.")
    assert set(reference.state_dict()) - placed == encoder_keys
    assert summary["absent_frozen_or_optional"] == len(encoder_keys) and summary["ignored"] == 0
    assert_same_state(model, reference)
    assert_stage1_outputs_equal(model, reference)


def test_the_same_file_into_a_trainable_encoder_is_refused(tmp_path):
    path = save(gpt4point_stage1_file(), tmp_path / "gpt4point_stage1.pth")
    model = stage1_model(freeze_encoder=False)
    encoder_keys = sorted(names_under(model, "point_encoder."))
    with pytest.raises(CheckpointError) as err:
        model.load_checkpoint(path)
    message = str(err.value)
    assert f"missing keys ({len(encoder_keys)}):" in message  # the encoder's keys and nothing else
    # A long list is cut to its first ten names and a count (thousands of names at GPT4Point size).
    assert len(encoder_keys) > 10 and f"and {len(encoder_keys) - 10} more" in message
    listed = [k for k in encoder_keys if repr(k) in message]
    assert len(listed) == 10 and "unexpected" not in message


# ---------------------------------------------------------------------------------------------
# 4. point_opt from a GPT4Point stage-2 file without opt_model.* and point_encoder.*
# ---------------------------------------------------------------------------------------------


def test_point_opt_from_gpt4point_stage2_file(tmp_path):
    ckpt = gpt4point_stage2_file()
    path = save(ckpt, tmp_path / "gpt4point_stage2.pth")
    model, reference = stage2_model(), stage2_model()
    assert_same_state(model, reference)
    points = clouds(2, 128)
    with torch.no_grad():
        before = model.prefix_embeds(points)

    with_encoder_file(model, tmp_path)  # frozen in GPT4Point's stage 2: not in its file
    summary = model.load_checkpoint(path)

    placed = place_by_hand(reference, ckpt["model"])
    absent = names_under(reference, "point_encoder.") | names_under(reference, "opt_model.")
    assert set(reference.state_dict()) - placed == absent
    assert summary["absent_frozen_or_optional"] == len(absent)
    assert summary["loaded"] == len(ckpt["model"])
    assert_same_state(model, reference)
    with torch.no_grad():
        got, want = model.prefix_embeds(points), reference.prefix_embeds(points)
    assert got.shape == (2, NUM_QUERY, OPT["hidden_size"])
    assert torch.equal(got, want) and not torch.equal(got, before)


def test_point_opt_refuses_a_mis_shaped_opt_proj(tmp_path):
    path = save(gpt4point_stage2_file(opt_hidden=OPT["hidden_size"] + 8), tmp_path / "wrong_opt.pth")
    with pytest.raises(CheckpointError) as err:
        stage2_model().load_checkpoint(path)
    message = str(err.value)
    assert "mis-shaped keys" in message
    assert f"opt_proj.weight: checkpoint ({OPT['hidden_size'] + 8}, {HIDDEN}) vs model ({OPT['hidden_size']}, {HIDDEN})" in message
    assert "opt_proj.bias" in message


# ---------------------------------------------------------------------------------------------
# 5. An unknown key stops the load and is named
# ---------------------------------------------------------------------------------------------


def test_unknown_key_in_a_stage1_file_is_named(tmp_path):
    ckpt = gpt4point_stage1_file()
    ckpt["model"]["surprise_head.weight"] = torch.zeros(3, HIDDEN)
    path = save(ckpt, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): \['surprise_head\.weight'\]"):
        stage1_model(freeze_encoder=True).load_checkpoint(path)


def test_unknown_key_in_a_point_bert_file_is_named(tmp_path):
    # A 1-block encoder given a file with a second block's key (e.g. a deeper encoder's file).
    tensors = random_tensors(point_encoder_layout(depth=1, width=32), seed=51)
    tensors["blocks.blocks.1.norm1.weight"] = torch.ones(32)
    path = save({"model": tensors}, tmp_path / "extra_block.pth")
    encoder = PointBertEncoder(num_groups=8, group_size=8, width=32, depth=1, num_heads=4, drop_path_rate=0.0)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): \['blocks\.blocks\.1\.norm1\.weight'\]"):
        encoder.load_checkpoint(path)


@pytest.mark.parametrize("make_file", [gpt4point_stage1_file, gpt4point_stage2_file])
def test_point_bert_given_a_gpt4point_file_without_encoder_says_so(tmp_path, make_file):
    """GPT4Point's files often hold no point_encoder.* at all: point_bert must say that, not list every
    Q-Former key as unexpected and every encoder key as missing."""
    path = save(make_file(), tmp_path / "gpt4point.pth")
    with pytest.raises(CheckpointError) as err:
        load_model("point_bert", "tiny", checkpoint=path)
    message = str(err.value)
    assert message.startswith(f"{path}: a GPT4Point/LAVIS model file with no point encoder weights")
    assert "ULIP-2" in message and "unexpected keys" not in message and len(message) < 600
