import pytest
import torch
from lavis.common.registry import registry
from lavis.models import load_model, load_model_and_preprocess

import lavis_point  # noqa: F401
from lavis_point.models.point_bert import PointBertEncoder
from lavis_point.models.point_opt import PointOPT
from lavis_point.models.point_qformer import PointQFormer
from lavis_point.processors.point_processors import PointEvalProcessor, PointTrainProcessor


def test_import_registers_every_component():
    assert registry.get_model_class("point_bert") is PointBertEncoder
    assert registry.get_model_class("point_qformer") is PointQFormer
    assert registry.get_model_class("point_opt") is PointOPT
    assert registry.get_processor_class("point_train") is PointTrainProcessor
    assert registry.get_processor_class("point_eval") is PointEvalProcessor
    for task in ("point_text_pretrain", "point_captioning"):
        assert registry.get_task_class(task) is not None
    assert registry.get_builder_class("shapes_point_caption") is not None
    assert registry.get_runner_class("runner_point") is not None
    assert registry.get_lr_scheduler_class("linear_warmup_cosine_lr") is not None


@pytest.mark.parametrize("name,model_type", [
    ("point_bert", "gpt4point"), ("point_bert", "ulip2"), ("point_bert", "tiny"),
    ("point_qformer", "pretrain"), ("point_qformer", "pretrain_tiny"), ("point_opt", "caption_tiny"),
])
def test_every_model_type_builds(name, model_type):
    model = load_model(name, model_type, is_eval=True)
    assert not model.training


def test_gpt4point_encoder_maps_points_to_512_tokens_of_384():
    enc = load_model("point_bert", "gpt4point", is_eval=True)
    assert enc.channel_layout == "gpt4point"
    assert enc(torch.rand(1, 8192, 6) * 2 - 1).shape == (1, 512, 384)
    assert load_model("point_bert", "ulip2").channel_layout == "xyz_rgb"


def test_load_model_and_preprocess_gives_point_processors_and_a_captioner():
    model, vis, txt = load_model_and_preprocess("point_opt", "caption_tiny", is_eval=True)
    assert isinstance(vis["train"], PointTrainProcessor) and isinstance(vis["eval"], PointEvalProcessor)
    cloud = torch.rand(5000, 6).numpy()
    points = vis["eval"](cloud).unsqueeze(0)
    assert points.shape == (1, 1024, 6)
    captions = model.generate({"point": points}, num_beams=2, max_length=5)
    assert len(captions) == 1 and isinstance(captions[0], str)
    assert txt["eval"]("A Red Cube.") == "a red cube"


def test_caption_opt27b_takes_its_opt_from_a_local_folder(tmp_path):
    """The GPT4Point-size stage 2 names facebook/opt-2.7b; a local folder works the same way
    (a small random OPT saved here stands in: no hub is reachable)."""
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    from lavis_point.paths import asset_path

    tok = AutoTokenizer.from_pretrained(asset_path("tiny_opt_tokenizer"), use_fast=False)
    OPTForCausalLM(OPTConfig(vocab_size=len(tok), hidden_size=64, word_embed_proj_dim=64, num_hidden_layers=1,
                             num_attention_heads=4, ffn_dim=64, max_position_embeddings=64)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    cfg = OmegaConf.load(PointOPT.default_config_path("caption_opt2.7b")).model
    cfg.opt_model = str(tmp_path)
    model = PointOPT.from_config(cfg)
    assert model.opt_proj.weight.shape == (64, 768)
    assert model.freeze_opt and not any(p.requires_grad for p in model.opt_model.parameters())
    assert model.freeze_encoder and model.point_encoder.num_groups == 512


def test_lavis_model_zoo_lists_our_models():
    """LAVIS builds ``model_zoo`` when it is imported, before our models register."""
    from lavis.models import model_zoo

    listing = dict(model_zoo)
    for name, cls in (("point_bert", PointBertEncoder), ("point_qformer", PointQFormer), ("point_opt", PointOPT)):
        assert listing[name] == list(cls.PRETRAINED_MODEL_CONFIG_DICT)
    assert "caption_opt2.7b" in listing["point_opt"] and "blip2_opt" in listing  # LAVIS's own stay
    lines = {line.split()[0]: line for line in str(model_zoo).splitlines() if line.strip()}
    assert "pretrain_tiny" in lines["point_qformer"] and "ulip2" in lines["point_bert"]
    assert len(model_zoo) == sum(len(types) for types in listing.values())
