"""Stage 1: the point Q-Former, trained with BLIP-2's three losses on point-text pairs.

- ITC: normalised query outputs vs the text [CLS], max over queries, learnable temperature,
  label smoothing 0.1, gathered across ranks. Batches whose items carry ``match_id`` (a dataset's
  ``match_by`` fields) count every pair of alike items as positive, in equal shares, as BLIP's
  retrieval fine-tuning does for the captions of one image: in the embedded set two clouds with the same
  shape, colour and size have captions that cannot tell them apart.
- ITM: bidirectional pass over (queries, text); one hard negative text per cloud and one hard
  negative cloud per text, drawn from the contrastive similarities (never an identical caption nor an
  alike item); a 2-way head averaged over queries.
- ITG: the text after a ``[DEC]`` token, generated from the queries under a causal text mask.
- Optional (``global_itc_weight`` > 0, the embedded default): a second contrastive term between the
  text and the point encoder's own global feature (max over its tokens, as PointNet and ULIP pool).
  A randomly initialised encoder that learns only through the Q-Former's cross-attention picks up
  colour (constant over an object, so it survives any pooling) but barely shape; with a direct,
  max-pooled signal it learns shape within a hundred steps and the queries can then read it.
  BLIP-2 has no such term because its image encoder is pretrained and frozen.

Exposes ``encode_points``, ``encode_text`` and ``point_text_similarity`` for retrieval and
zero-shot classification.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from lavis.common.registry import registry

from lavis_point.models.losses import (
    contrastive_loss,
    contrastive_similarities,
    gather,
    sample_hard_negatives,
    world,
)
from lavis_point.models.point_base import PointQueryModel
from lavis_point.paths import config_path


SIMILARITY_CHUNK_VALUES = 1 << 26  # 256 MB of float32 products at a time


@registry.register_model("point_qformer")
class PointQFormer(PointQueryModel):
    PRETRAINED_MODEL_CONFIG_DICT = {
        "pretrain": config_path("models/point_qformer_pretrain.yaml"),
        "pretrain_tiny": config_path("models/point_qformer_pretrain_tiny.yaml"),
    }
    # A BLIP-2 image checkpoint carries its image encoder: not ours to load.
    IGNORABLE_KEYS = (r"visual_encoder\.", r"ln_vision\.")
    # BLIP-2 (image) files have no point encoder or point projection.
    PRETRAINED_OPTIONAL = ("point_encoder.", "pc_projection")

    def __init__(self, embed_dim=256, max_txt_len=32, itg_delay_steps=0, global_itc_weight=0.0,
                 text_pooling="cls", **base):
        super().__init__(**base)
        if text_pooling not in ("cls", "mean"):
            raise ValueError(f"text_pooling must be 'cls' or 'mean', got {text_pooling!r}")
        # A sentence-transformers BERT (the shipped MiniLM) was trained with mean pooling: its [CLS]
        # output is the same vector for every text (cosine 1.0 between any two captions), so a
        # contrastive loss on it starts blind; the token mean already tells "cube" from "sphere".
        self.text_pooling = text_pooling
        # The generation loss joins after this many optimiser steps (0: from the start, as BLIP-2).
        # With a randomly initialised point encoder its early gradients, shared through the
        # Q-Former, pull the queries to one constant before contrastive learning can start.
        self.itg_delay_steps = itg_delay_steps
        hidden = self.Qformer.cfg["hidden_size"]
        self.point_proj = nn.Linear(hidden, embed_dim)
        self.text_proj = nn.Linear(hidden, embed_dim)
        self.itm_head = nn.Linear(hidden, 2)
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.max_txt_len = max_txt_len
        self.global_itc_weight = global_itc_weight
        if global_itc_weight > 0:
            self.global_proj = nn.Linear(self.Qformer.cfg["encoder_width"], embed_dim)

    @classmethod
    def from_config(cls, cfg):
        model = cls(embed_dim=cfg.get("embed_dim", 256), max_txt_len=cfg.get("max_txt_len", 32),
                    itg_delay_steps=cfg.get("itg_delay_steps", 0),
                    global_itc_weight=cfg.get("global_itc_weight", 0.0),
                    text_pooling=cfg.get("text_pooling", "cls"), **cls.base_kwargs(cfg))
        model.load_pretrained_from_config(cfg)
        return model

    def map_foreign_keys(self, state):
        # BLIP-2 calls the point (image) head vision_proj.
        return {("point_proj." + k[len("vision_proj."):] if k.startswith("vision_proj.") else k): v
                for k, v in state.items()}

    def tokenize(self, texts):
        return self.tokenizer(texts, padding="longest", truncation=True, max_length=self.max_txt_len,
                              return_tensors="pt").to(self.device)

    # ---- encoders (retrieval / zero-shot API) ----
    def encode_points(self, points):
        """(B, N, 6) -> (query outputs (B, Q, H), projected point tokens, normalised feats (B, Q, D))."""
        point_tokens = self.encode_point_tokens(points)
        queries, feats = self.point_features(point_tokens)
        return queries, point_tokens, feats

    def point_features(self, point_tokens):
        """Projected point tokens, or the Q-Former's ``project_points`` of them -> (query outputs
        (B, Q, H), normalised feats (B, Q, D))."""
        queries = self.query_outputs(point_tokens)
        return queries, F.normalize(self.point_proj(queries), dim=-1)

    def encode_text(self, texts_or_tokens):
        """Texts (or tokenizer output) -> normalised text features (B, D): the [CLS] output (BLIP-2), or
        with ``text_pooling: mean`` the mean over the text's tokens."""
        tokens = self.tokenize(texts_or_tokens) if isinstance(texts_or_tokens, (list, tuple)) else texts_or_tokens
        hidden = self.Qformer(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)  # (B, L, H)
        if self.text_pooling == "mean":
            mask = tokens.attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1)
        else:
            pooled = hidden[:, 0]
        return F.normalize(self.text_proj(pooled), dim=-1)

    @staticmethod
    def point_text_similarity(point_feats, text_feats):
        """(P, Q, D) x (T, D) -> (P, T): the best query's cosine similarity. In chunks of clouds whose
        (chunk, Q, T) products stay under SIMILARITY_CHUNK_VALUES (all P at once took P * Q * T * 4 bytes)."""
        chunk = max(1, SIMILARITY_CHUNK_VALUES // max(1, point_feats.shape[1] * text_feats.shape[0]))
        return torch.cat([torch.einsum("pqd,td->pqt", part, text_feats).max(dim=1).values
                          for part in point_feats.split(chunk)])  # no clouds: one empty part, (0, T)

    def match_logits(self, point_tokens, input_ids, attention_mask):
        """Matching head: (B, 2) logits, class 1 = the text describes the cloud. ``point_tokens``: (B, G, W)
        or the Q-Former's ``project_points`` of them."""
        queries = self.query_tokens.expand(input_ids.shape[0], -1, -1)
        hidden = self.Qformer(query_embeds=queries, input_ids=input_ids, attention_mask=attention_mask,
                              points=point_tokens)
        return self.itm_head(hidden[:, : queries.shape[1]]).mean(dim=1)

    # ---- training ----
    def positives(self, match_id, batch, rank):
        """(B, world * B) bool: this rank's items against every rank's, True for the same item or for
        two items with the same ``match_id`` (datasets' ``match_by``). The ids are gathered whether or
        not this batch has them, so every rank runs the same collectives (a rank whose batch lacked the
        key skipped the gather and the others waited on it forever)."""
        known = torch.full((batch,), match_id is not None, device=self.device)
        ids = torch.zeros(batch, dtype=torch.long, device=self.device) if match_id is None \
            else torch.as_tensor(match_id, dtype=torch.long, device=self.device)
        every = gather(torch.stack([known.long(), ids], dim=1))  # (world * B, 2)
        positives = known[:, None] & every[None, :, 0].bool() & (ids[:, None] == every[None, :, 1])
        own = torch.arange(batch, device=self.device)
        positives[own, rank * batch + own] = True
        return positives

    def forward(self, samples):
        texts = self.texts_of(samples)
        point_tokens = self.encode_point_tokens(samples["point"])
        points = self.Qformer.project_points(point_tokens)  # keys and values once for all three passes
        _, point_feats = self.point_features(points)
        tokens = self.tokenize(texts)
        text_feat = self.encode_text(tokens)
        batch = point_feats.shape[0]

        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        all_text = gather(text_feat)  # once: the global term below compares with the same texts
        sim_p2t, sim_t2p = contrastive_similarities(point_feats, text_feat, self.temp, all_text)
        rank, _ = world()
        local = slice(rank * batch, (rank + 1) * batch)
        positives = self.positives(samples.get("match_id"), batch, rank)
        loss_itc = contrastive_loss(sim_p2t, sim_t2p, positives=positives)

        # ITM: negatives come from this rank's batch; identical captions and alike items are never negatives.
        same = torch.tensor([[a == b for b in texts] for a in texts], device=self.device)
        same |= positives[:, local]
        neg_text = sample_hard_negatives(sim_p2t[:, local], same)
        neg_points = sample_hard_negatives(sim_t2p[:, local], same)
        ids = torch.cat([tokens.input_ids, tokens.input_ids[neg_text], tokens.input_ids])
        mask = torch.cat([tokens.attention_mask, tokens.attention_mask[neg_text], tokens.attention_mask])
        own = torch.arange(batch, device=self.device)
        logits = self.match_logits(points[torch.cat([own, own, neg_points])], ids, mask)  # (3B, 2)
        labels = torch.cat([torch.ones(batch), torch.zeros(2 * batch)]).long().to(self.device)
        loss_itm = F.cross_entropy(logits, labels)

        # ITG: [DEC] replaces [CLS]; queries see only queries, text sees queries and earlier text.
        dec_ids = tokens.input_ids.clone()
        dec_ids[:, 0] = self.tokenizer.bos_token_id
        targets = dec_ids.masked_fill(dec_ids == self.tokenizer.pad_token_id, -100)
        hidden = self.Qformer(query_embeds=self.query_tokens.expand(batch, -1, -1), input_ids=dec_ids,
                              attention_mask=tokens.attention_mask, points=points, causal=True)
        text_hidden = hidden[:, self.query_tokens.shape[1]:-1]  # position t predicts token t + 1
        # The vocabulary-wide head only where a token follows: padding's logits would be ignored anyway
        # (a quarter of the positions in the embedded default's batches).
        has_target = targets[:, 1:] != -100
        lm_logits = self.Qformer.lm_logits(text_hidden[has_target])
        loss_itg = F.cross_entropy(lm_logits, targets[:, 1:][has_target], label_smoothing=0.1)

        losses = {"loss_itc": loss_itc, "loss_itm": loss_itm, "loss_itg": loss_itg}
        if self.global_itc_weight > 0:
            global_feat = F.normalize(self.global_proj(point_tokens.max(dim=1).values), dim=-1)  # (B, D)
            losses["loss_global_itc"] = contrastive_loss(*contrastive_similarities(
                global_feat.unsqueeze(1), text_feat, self.temp, all_text), positives=positives)

        step = samples.get("epoch", 0) * samples.get("num_iters_per_epoch", 0) + samples.get("iters", 0)
        # While delayed, 0 * loss keeps the LM head in the graph: DDP fails on parameters without grads.
        loss = loss_itc + loss_itm + (loss_itg if step >= self.itg_delay_steps else 0.0 * loss_itg)
        if self.global_itc_weight > 0:
            loss = loss + self.global_itc_weight * losses["loss_global_itc"]
        return {"loss": loss, **losses}
