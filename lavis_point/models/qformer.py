"""Our Q-Former: BERT layers whose self-attention is shared by learned queries and text, with
cross-attention to point tokens (query positions only) every ``cross_attention_freq`` layers and
separate feed-forward weights for query and text positions.

Module names reproduce LAVIS's BLIP-2 ``Qformer.*`` state-dict layout (CHECKPOINTS.md) so BLIP-2 and
GPT4Point weights load without renaming. We do not use LAVIS's ``Qformer.py``: it imports
transformers internals and its generation breaks on newer releases (DESIGN.md, decision 2).

Masks: ``bidirectional`` lets every position see every non-padding position (contrastive and
matching passes); ``causal`` lets queries see only queries and text see all queries plus earlier text
(the generation loss). Attention runs through ``scaled_dot_product_attention``.
"""
import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)


class Projections(nn.Module):
    def __init__(self, hidden, kv_width):
        super().__init__()
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_width, hidden)
        self.value = nn.Linear(kv_width, hidden)


class AddNorm(nn.Module):
    """dense -> dropout -> + residual -> LayerNorm (BERT's ``*Output`` modules)."""

    def __init__(self, in_width, hidden, eps, dropout):
        super().__init__()
        self.dense = nn.Linear(in_width, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, residual):
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class Attention(nn.Module):
    def __init__(self, hidden, num_heads, kv_width, eps, dropout):
        super().__init__()
        self.num_heads = num_heads
        self.self = Projections(hidden, kv_width)
        self.output = AddNorm(hidden, hidden, eps, dropout)
        self.attn_dropout = dropout

    def heads(self, t):  # (B, L, H) -> (B, heads, L, H / heads)
        return t.view(t.shape[0], -1, self.num_heads, t.shape[2] // self.num_heads).transpose(1, 2)

    def keys_values(self, kv):
        """kv (B, Lk, W) -> its keys and values, each (B, heads, Lk, H / heads)."""
        return self.heads(self.self.key(kv)), self.heads(self.self.value(kv))

    def forward(self, x, kv, mask):
        """x (B, Lq, H) attends to kv (B, Lk, W), or to its ``keys_values`` given as a pair; mask
        broadcastable to (B, heads, Lq, Lk), True = attend."""
        batch, length, hidden = x.shape
        q = self.heads(self.self.query(x))
        k, v = kv if isinstance(kv, tuple) else self.keys_values(kv)
        p = self.attn_dropout if self.training else 0.0
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.output(ctx.transpose(1, 2).reshape(batch, length, hidden), x)


class Intermediate(nn.Module):
    def __init__(self, hidden, intermediate):
        super().__init__()
        self.dense = nn.Linear(hidden, intermediate)

    def forward(self, x):
        return F.gelu(self.dense(x))


class Layer(nn.Module):
    def __init__(self, cfg, has_cross, query_only):
        super().__init__()
        h, eps, p = cfg["hidden_size"], cfg["layer_norm_eps"], cfg["dropout"]
        self.attention = Attention(h, cfg["num_heads"], h, eps, p)
        if has_cross:
            self.crossattention = Attention(h, cfg["num_heads"], cfg["encoder_width"], eps, p)
        if not query_only:  # text positions' feed-forward (absent in GPT4Point stage-2 files)
            self.intermediate = Intermediate(h, cfg["intermediate_size"])
            self.output = AddNorm(cfg["intermediate_size"], h, eps, p)
        self.intermediate_query = Intermediate(h, cfg["intermediate_size"])
        self.output_query = AddNorm(cfg["intermediate_size"], h, eps, p)

    def forward(self, x, num_query, self_mask, points, points_mask):
        x = self.attention(x, x, self_mask)
        queries, text = x[:, :num_query], x[:, num_query:]
        if num_query and points is not None and hasattr(self, "crossattention"):
            queries = self.crossattention(queries, points, points_mask)
        # Text-only passes have no queries: running the query FFN on an empty tensor would still cost,
        # in backward, a zero-filled weight gradient per matrix and its accumulation.
        if queries.shape[1]:
            queries = self.output_query(self.intermediate_query(queries), queries)
        if text.shape[1]:
            text = self.output(self.intermediate(text), text)
        return torch.cat([queries, text], dim=1)


class Embeddings(nn.Module):
    def __init__(self, cfg, query_only):
        super().__init__()
        h = cfg["hidden_size"]
        if not query_only:
            self.word_embeddings = nn.Embedding(cfg["vocab_size"], h, padding_idx=cfg["pad_token_id"])
            self.position_embeddings = nn.Embedding(cfg["max_position_embeddings"], h)
            self.register_buffer("position_ids", torch.arange(cfg["max_position_embeddings"]).unsqueeze(0))
        self.LayerNorm = nn.LayerNorm(h, eps=cfg["layer_norm_eps"])
        self.dropout = nn.Dropout(cfg["dropout"])

    def forward(self, input_ids=None, query_embeds=None):
        parts = []
        if query_embeds is not None:
            parts.append(query_embeds)
        if input_ids is not None:
            positions = self.position_ids[:, : input_ids.shape[1]]
            parts.append(self.word_embeddings(input_ids) + self.position_embeddings(positions))
        return self.dropout(self.LayerNorm(torch.cat(parts, dim=1)))


class Bert(nn.Module):
    def __init__(self, cfg, query_only):
        super().__init__()
        self.embeddings = Embeddings(cfg, query_only)
        self.encoder = nn.Module()
        freq = cfg["cross_attention_freq"]
        self.encoder.layer = nn.ModuleList(
            Layer(cfg, has_cross=(i % freq == 0), query_only=query_only) for i in range(cfg["num_layers"])
        )


class LMPredictionHead(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        h = cfg["hidden_size"]
        self.transform = nn.Module()
        self.transform.dense = nn.Linear(h, h)
        self.transform.LayerNorm = nn.LayerNorm(h, eps=cfg["layer_norm_eps"])
        self.decoder = nn.Linear(h, cfg["vocab_size"])
        # BERT ties the head's bias to the decoder's: both names appear in the state dict.
        self.bias = self.decoder.bias

    def forward(self, x):
        x = self.transform.LayerNorm(F.gelu(self.transform.dense(x)))
        return self.decoder(x)


DEFAULTS = dict(
    hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, encoder_width=1408,
    cross_attention_freq=2, vocab_size=30523, max_position_embeddings=512, layer_norm_eps=1e-12,
    dropout=0.1, pad_token_id=0, tie_word_embeddings=True,
)


class ProjectedPoints:
    """Point tokens projected once to every cross-attention layer's keys and values. Stage 1 runs
    several passes over the same clouds (queries, 3 x B matching pairs, generation); each used to
    re-project the point tokens: 12 of the tiny config's 58 forward GFLOP per step. Indexing picks
    clouds (``kv[indices]``), as indexing the point tokens did; gradients flow back through it."""

    def __init__(self, per_layer):
        self.per_layer = per_layer  # (keys, values) per layer, None where a layer has no cross-attention

    def __len__(self):
        return next(kv[0].shape[0] for kv in self.per_layer if kv is not None)

    def __getitem__(self, index):
        return ProjectedPoints([None if kv is None else (kv[0][index], kv[1][index]) for kv in self.per_layer])


class QFormer(nn.Module):
    """``query_only`` builds just the query path (stage 2): no word embeddings, text FFN or LM head."""

    def __init__(self, query_only=False, **cfg):
        super().__init__()
        unknown = set(cfg) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"unknown Q-Former options: {sorted(unknown)}")
        self.cfg = {**DEFAULTS, **cfg}
        self.query_only = query_only
        self.bert = Bert(self.cfg, query_only)
        if not query_only:
            self.cls = nn.Module()
            self.cls.predictions = LMPredictionHead(self.cfg)
        self.apply(self._init_weights)
        self.tie_weights()

    def tie_weights(self):
        """The LM head's decoder is the word embeddings, one parameter under both names, as in BLIP-2
        (transformers ties BERT's output embeddings to its input embeddings), unless the config says
        ``tie_word_embeddings: false``: then it is a parameter of its own (a copy of the embeddings
        when started from BERT)."""
        if not self.query_only and self.cfg["tie_word_embeddings"]:
            self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, 0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()
        if isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()

    def forward(self, query_embeds=None, input_ids=None, attention_mask=None, points=None,
                points_mask=None, causal=False):
        """query_embeds (B, Q, H), input_ids (B, T) with attention_mask (B, T), points (B, P, W) or
        their ``project_points`` -> hidden states (B, Q + T, H), queries first."""
        if input_ids is not None and self.query_only:
            raise RuntimeError("this Q-Former was built query_only (stage 2): it has no text embeddings")
        x = self.bert.embeddings(input_ids, query_embeds)
        batch, length, _ = x.shape
        num_query = 0 if query_embeds is None else query_embeds.shape[1]
        keep = torch.ones(batch, length, dtype=torch.bool, device=x.device)
        if input_ids is not None and attention_mask is not None:
            keep[:, num_query:] = attention_mask.bool()
        mask = keep[:, None, None, :].expand(batch, 1, length, length)  # (B, 1, L, L) key padding
        if causal:
            rule = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
            rule[:, :num_query] = True  # every position sees every query
            rule[:num_query, num_query:] = False  # queries never see text
            mask = mask & rule
        if points_mask is not None:
            points_mask = points_mask.bool()[:, None, None, :]
        for i, layer in enumerate(self.bert.encoder.layer):
            x = layer(x, num_query, mask, points.per_layer[i] if isinstance(points, ProjectedPoints) else points,
                      points_mask)
        return x

    def project_points(self, points):
        """(B, P, W) point tokens -> ``ProjectedPoints``, which ``forward`` takes as ``points``."""
        return ProjectedPoints([layer.crossattention.keys_values(points) if hasattr(layer, "crossattention")
                                else None for layer in self.bert.encoder.layer])

    def lm_logits(self, hidden):
        return self.cls.predictions(hidden)

    def resize_token_embeddings(self, vocab_size):
        """Grow the vocabulary (e.g. BERT's 30522 + [DEC]); new rows start at the mean embedding (and a
        zero LM-head bias). An untied LM decoder keeps its own rows, its new ones at its mean."""
        old = self.bert.embeddings.word_embeddings
        if vocab_size == old.num_embeddings:
            return
        new = nn.Embedding(vocab_size, old.embedding_dim, padding_idx=old.padding_idx)
        n = min(vocab_size, old.num_embeddings)
        with torch.no_grad():
            new.weight[:n] = old.weight[:n]
            new.weight[n:] = old.weight[:n].mean(0)
        self.bert.embeddings.word_embeddings = new
        self.cfg["vocab_size"] = vocab_size
        if not self.query_only:
            head = LMPredictionHead(self.cfg)
            head.load_state_dict(
                {k: v for k, v in self.cls.predictions.state_dict().items() if "decoder" not in k and k != "bias"},
                strict=False,
            )
            with torch.no_grad():
                if self.cfg["tie_word_embeddings"]:
                    head.decoder.weight.copy_(new.weight)  # tie_weights() below makes them one
                else:
                    trained = self.cls.predictions.decoder.weight
                    head.decoder.weight[:n] = trained[:n]
                    head.decoder.weight[n:] = trained[:n].mean(0)
                head.decoder.bias.zero_()
                head.decoder.bias[:n] = self.cls.predictions.decoder.bias[:n]
            self.cls.predictions = head
            self.tie_weights()


def bert_state_dict(path: str) -> dict:
    """Weights of a BERT folder or file (safetensors, or a torch file read with weights_only). A folder's
    model.safetensors comes first; when it is unreadable (a git-lfs pointer), its pytorch_model.bin."""
    import os

    from lavis_point.models.checkpoint import CheckpointError

    files = [path]
    if os.path.isdir(path):
        files = [os.path.join(path, name) for name in ("model.safetensors", "pytorch_model.bin")
                 if os.path.isfile(os.path.join(path, name))]
        if not files:
            raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin in this BERT folder")
    for i, file in enumerate(files):
        try:
            state = _read_weights(file)
            break
        except CheckpointError as e:
            if i + 1 == len(files):
                raise
            log.warning("%s; reading %s instead", e, os.path.basename(files[i + 1]))
    return {_modern_name(k[len("bert."):] if k.startswith("bert.") else k): v for k, v in state.items()}


def _read_weights(path: str) -> dict:
    """The tensors of one file; ``CheckpointError`` naming the file when it holds none."""
    from safetensors.torch import load_file

    from lavis_point.models.checkpoint import CheckpointError, is_git_lfs_pointer, read_checkpoint, state_dict_of

    if not path.endswith(".safetensors"):
        return state_dict_of(read_checkpoint(path), path)
    with open(path, "rb") as f:
        if is_git_lfs_pointer(f.read(64)):
            raise CheckpointError(f"{path}: a git-lfs pointer, not the weights (a git clone without git-lfs): "
                                  f"run git lfs pull in its repository, or download the file itself")
    try:
        return load_file(path)
    except Exception as e:  # safetensors' own errors name neither the file nor what to do
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}): download it again "
                              f"(git lfs pull in a git clone)") from e


def _modern_name(key: str) -> str:
    """BERT files converted from TensorFlow (bert-base-uncased's own among them) name LayerNorm
    parameters gamma and beta; transformers renames them on load, and so do we."""
    if key.endswith(".gamma"):
        return key[:-len("gamma")] + "weight"
    if key.endswith(".beta"):
        return key[:-len("beta")] + "bias"
    return key


def _grown(value, like):
    """``value`` (vocab rows first) padded to ``like``'s rows with its mean row: the tokens the
    Q-Former adds to BERT's vocabulary ([DEC])."""
    grown = like.clone()
    grown[:value.shape[0]] = value
    grown[value.shape[0]:] = value.mean(0)
    return grown


def init_qformer_from_bert(qformer: QFormer, path: str) -> int:
    """Initialise the Q-Former's BERT parts from a BERT checkpoint (e.g. the MiniLM shipped offline).

    Self-attention, embeddings and both feed-forwards (text and query copies, as BLIP-2 does) come
    from the first ``num_layers`` BERT layers; cross-attention stays random, as in BLIP-2. BERT adds token-type 0
    to every embedding; the Q-Former has no token types, so that row is folded into the positions.
    The LM head's transform and bias come from the file's masked-LM head when it has one (bert-base-uncased
    does, the shipped MiniLM does not); its decoder is the word embeddings. A file lacking any tensor
    of those layers or the embeddings is refused: a Q-Former half started from BERT would train, silently
    worse. Returns the number of tensors copied."""
    src = bert_state_dict(path)
    own = qformer.state_dict()
    mapped = {}
    tt = src.get("embeddings.token_type_embeddings.weight")
    for key, value in src.items():
        if key.startswith(("pooler.", "embeddings.token_type", "embeddings.position_ids", "cls.seq_relationship")) \
                or key.startswith("cls.predictions.decoder."):  # = the embeddings and the bias, mapped below
            continue
        if key == "embeddings.position_embeddings.weight" and tt is not None:
            value = value + tt[0]
        target = key if key.startswith("cls.") else "bert." + key
        if target in ("bert.embeddings.word_embeddings.weight", "cls.predictions.bias") and target in own:
            value = _grown(value, own[target])
        if target in own:
            mapped[target] = value
        if target == "cls.predictions.bias" and target in own:
            mapped["cls.predictions.decoder.bias"] = value  # one tensor under two names, as in BERT
        for branch in ("intermediate", "output"):
            part = f".{branch}."
            if part in target and ".attention." not in target:
                q_target = target.replace(part, f".{branch}_query.")
                if q_target in own:
                    mapped[q_target] = value
    for key, value in mapped.items():
        if own[key].shape != value.shape:
            raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}, Q-Former expects {tuple(own[key].shape)}")
    missing = [k for k in own if k.startswith("bert.") and ".crossattention." not in k
               and not k.endswith("position_ids") and k not in mapped]
    if missing:
        raise ValueError(f"{path}: not a BERT checkpoint this Q-Former can start from: {len(missing)} of its "
                         f"tensors are not in the file, e.g. {missing[:3]} (fewer layers, or other names?)")
    if not qformer.query_only and "bert.embeddings.word_embeddings.weight" in mapped:
        mapped["cls.predictions.decoder.weight"] = mapped["bert.embeddings.word_embeddings.weight"]
        if "cls.predictions.transform.dense.weight" not in mapped:
            log.info("%s has no masked-LM head: the Q-Former's LM head transform starts random", path)
    qformer.load_state_dict(mapped, strict=False)
    return len(mapped)
