"""From files to answers in Python: load a model with its eval processor, read any cloud or mesh file
into the tensor that processor makes, and the four questions the command line asks.

    model, processor = load_point_model("point_opt")            # the embedded default, trained
    points = load_points("cube.ply", processor).unsqueeze(0)   # (1, num_points, 6)
    model.generate({"point": points})                           # ['a large red cube']

Weights: ``checkpoint=PATH``, else the config's ``finetuned`` / ``pretrained``, else (for the
embedded default's model types only) the main job's checkpoint ``<run dir>/stage{1,2}/checkpoint_last.pth``,
the run dir being ``$LAVIS_POINT_RUN_DIR`` or ``output/embedded`` under the working directory.
"""
import os

import torch
import yaml
from lavis.common.registry import registry
from omegaconf import DictConfig, OmegaConf

import lavis_point  # noqa: F401  (registers the models and processors)
from lavis_point.data_io import CloudReadError, PointCloudError, read_cloud
from lavis_point.tasks.qa import DEFAULT_PROMPT as QA_PROMPT
from lavis_point.tasks.zeroshot import DEFAULT_TEMPLATES, class_text_features

RUN_DIR_ENV = "LAVIS_POINT_RUN_DIR"
DEFAULT_RUN_DIR = os.path.join("output", "embedded")
# arch -> (the embedded default's model type, the main job's run folder that trains it)
EMBEDDED_DEFAULT = {"point_opt": ("caption_tiny", "stage2"), "point_qformer": ("pretrain_tiny", "stage1")}


class MissingWeightsError(FileNotFoundError):
    """No checkpoint to load: the message says which file was looked for and what to do."""


class ConfigError(ValueError):
    """A config that cannot be used: a missing or malformed YAML file, a malformed option."""


def default_checkpoint(arch: str) -> str:
    """Where the main job (scripts/run_embedded_default.py) leaves the trained ``arch``."""
    run_dir = os.environ.get(RUN_DIR_ENV) or DEFAULT_RUN_DIR
    return os.path.join(run_dir, EMBEDDED_DEFAULT[arch][1], "checkpoint_last.pth")


def model_config(arch: str, model_type=None, cfg_path=None, options=()):
    """The whole config (``model`` and ``preprocess``): the model type's default YAML, then the
    ``model:`` / ``preprocess:`` sections of ``cfg_path`` (a LAVIS run YAML works), then ``options``
    (``model.prompt=...``, ``preprocess.vis_processor.eval.num_points=2048``, LAVIS's dotlist form).
    ``ConfigError`` (a ``ValueError``) for a missing or malformed ``cfg_path`` or option."""
    user = _load_yaml(cfg_path) if cfg_path else OmegaConf.create()
    for option in options:
        key, equals, _ = str(option).partition("=")
        if not equals or not key.strip():  # OmegaConf would set "model.prompt" alone to None
            raise ConfigError(f"option {option!r} is not KEY=VALUE (e.g. model.prompt='a 3D point cloud of ')")
    try:
        overrides = OmegaConf.from_dotlist(list(options))
    except yaml.YAMLError as e:
        raise ConfigError(f"options {list(options)}: a value is not valid YAML ({one_line(e)})") from None
    if user.get("model", {}).get("arch", arch) != arch:
        raise ValueError(f"{cfg_path}: model.arch is {user.model.arch!r}; this needs a {arch} model")
    model_type = model_type or user.get("model", {}).get("model_type") or EMBEDDED_DEFAULT[arch][0]
    model_cls = registry.get_model_class(arch)
    if model_type not in model_cls.PRETRAINED_MODEL_CONFIG_DICT:
        raise ValueError(f"unknown model type {model_type!r} for {arch}; "
                         f"expected one of {sorted(model_cls.PRETRAINED_MODEL_CONFIG_DICT)}")
    base = OmegaConf.load(model_cls.default_config_path(model_type))
    own = {k: user[k] for k in ("model", "preprocess") if k in user}
    cfg = OmegaConf.merge(base, own, overrides)
    cfg.model.arch, cfg.model.model_type = arch, model_type
    return cfg


def _load_yaml(path):
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: config file not found")
    try:
        cfg = OmegaConf.load(path)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({one_line(e)})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: expected a YAML mapping with model: (and preprocess:), found a list")
    return cfg


def one_line(error) -> str:
    """An error's message on one line (YAML and OS errors span several)."""
    return " ".join(str(error).split())


def load_point_model(arch="point_opt", model_type=None, checkpoint=None, cfg_path=None, options=(),
                     device="cpu"):
    """(model in eval mode on ``device``, its eval point processor). ``arch``: ``point_opt`` (stage 2,
    captions and answers) or ``point_qformer`` (stage 1, point-text similarity)."""
    cfg = model_config(arch, model_type, cfg_path, options)
    return build_point_model(cfg, resolve_checkpoint(cfg, checkpoint, cfg_path), device)


def resolve_checkpoint(cfg, checkpoint=None, cfg_path=None):
    """The file to load after building: ``checkpoint``, which then replaces the config's ``finetuned``
    (cleared: neither loaded first nor needed) but not its ``pretrained``, an earlier stage loaded
    first for the parts the checkpoint may lack (a frozen encoder a run saved without); else None
    when the config names its trained weights (``finetuned``, loaded while building; ``pretrained``
    alone would leave this stage's parts random); else the embedded default's trained checkpoint, for
    its model types only. ``MissingWeightsError`` says what to do otherwise."""
    arch, model_type = cfg.model.arch, cfg.model.model_type
    if checkpoint is not None:
        cfg.model.finetuned = None
        pretrained = cfg.model.get("pretrained")
        if pretrained and not os.path.isfile(pretrained):
            raise MissingWeightsError(
                f"{pretrained}: model.pretrained not found. It is loaded before the checkpoint, for the parts "
                f"the checkpoint may lack (a frozen encoder); if {checkpoint} holds them all, add "
                f"--options model.pretrained=null")
    else:
        if cfg.model.get("finetuned"):
            return None
        if cfg_path or model_type != EMBEDDED_DEFAULT[arch][0]:
            raise MissingWeightsError(
                f"no weights for {arch} {model_type}: pass --checkpoint PATH (or set model.finetuned in the config)")
        checkpoint = default_checkpoint(arch)
        if not os.path.isfile(checkpoint):
            raise MissingWeightsError(
                f"{checkpoint}: no trained checkpoint of the embedded default. Run the main job first "
                f"(python scripts/run_embedded_default.py), set ${RUN_DIR_ENV} to the folder holding its "
                f"stage1/ and stage2/, or pass --checkpoint PATH")
    if not os.path.isfile(checkpoint):
        raise MissingWeightsError(f"{checkpoint}: checkpoint file not found")
    return checkpoint


def build_point_model(cfg, checkpoint=None, device="cpu"):
    """(model from ``cfg.model`` with ``checkpoint`` loaded, in eval mode on ``device``, the eval processor)."""
    model = registry.get_model_class(cfg.model.arch).from_config(cfg.model)
    if checkpoint is not None:
        model.load_checkpoint(checkpoint)
    processor_cfg = cfg.preprocess.vis_processor.eval
    processor = registry.get_processor_class(processor_cfg.name).from_config(processor_cfg)
    return model.to(device).eval(), processor


def load_points(path, processor, min_points=1, mesh_points=8192) -> torch.Tensor:
    """The (num_points, 6) tensor ``processor`` makes of the cloud or mesh in ``path``.
    Raises ``CloudReadError`` naming the file: unreadable or unsupported file, no points, NaN, or
    fewer than ``min_points`` points (meshes are sampled to ``mesh_points``)."""
    if not os.path.isfile(path):
        raise CloudReadError(path, "no such file" if not os.path.exists(path) else "not a file")
    cloud = read_cloud(path, white_if_missing=True, mesh_points=mesh_points)  # (N, 6), rgb in [0, 1]
    if len(cloud) < min_points:
        raise CloudReadError(path, f"only {len(cloud)} points; the model needs at least {min_points}")
    try:
        return processor(cloud)
    except PointCloudError as e:
        raise CloudReadError(path, str(e)) from None


def min_points_for(model) -> int:
    """Fewest points worth encoding: one per group centre (fewer would repeat centres)."""
    return int(model.point_encoder.num_groups)


@torch.no_grad()
def answer_questions(model, points, questions, prompt=QA_PROMPT, **generate_kwargs):
    """Stage 2: one answer per cloud in ``points`` (B, N, 6) to ``questions`` (B strings), each put
    in ``prompt`` (``{}`` = the question), as the QA task trains and evaluates."""
    return model.predict_answers({"point": points, "text_input": list(questions)}, prompt=prompt, **generate_kwargs)


@torch.no_grad()
def point_text_scores(model, points, texts):
    """Stage 1: cosine similarity (B, T) of each cloud's best query to each text."""
    _, _, point_feats = model.encode_points(points)
    return model.point_text_similarity(point_feats, model.encode_text(list(texts)))


@torch.no_grad()
def classify_points(model, points, labels, templates=DEFAULT_TEMPLATES):
    """Stage 1, zero-shot: probabilities (B, C) over ``labels``, a softmax of the point-label
    similarities at the contrastive temperature the model learned (each label's text feature is the
    mean over ``templates``, as the zero-shot task computes it)."""
    _, _, point_feats = model.encode_points(points)
    label_feats = class_text_features(model, list(labels), list(templates))
    logits = model.point_text_similarity(point_feats, label_feats) / model.temp
    return logits.softmax(dim=-1)
