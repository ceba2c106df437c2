"""Stage 2: point queries -> linear projection -> soft prefix of an OPT language model.

Training: loss on caption tokens only (prefix and prompt positions are masked). Generation: beam
search or nucleus sampling through ``transformers``' public ``generate``.

Why a subclass of ``OPTForCausalLM``: transformers 4.26 (pinned by LAVIS 1.0.2) refuses
``generate(inputs_embeds=...)`` for decoder-only models. Its public hook
``prepare_inputs_for_generation`` lets us feed the prefix embeddings at the first step instead; later
steps reuse the key/value cache, which already holds the prefix. ``generate`` then counts lengths
over prompt + generated tokens only, and expands, reorders and caches beams as for any text.
"""
import logging

import torch
import torch.nn as nn
from lavis.common.registry import registry
from omegaconf import OmegaConf
from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

from lavis_point.models.point_base import PointQueryModel, one_per_cloud
from lavis_point.paths import asset_path, config_path

log = logging.getLogger(__name__)


class PrefixOPTForCausalLM(OPTForCausalLM):
    """OPT that accepts ``prefix_embeds`` (B, P, D) in ``generate``: prepended to the token
    embeddings on the first step (or on every step when the cache is off)."""

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None,
                                      use_cache=None, prefix_embeds=None, **kwargs):
        if attention_mask is None:
            attention_mask = input_ids.new_ones(input_ids.shape)
        if prefix_embeds is None:
            return super().prepare_inputs_for_generation(input_ids, past_key_values, attention_mask, use_cache)
        if prefix_embeds.shape[0] != input_ids.shape[0]:  # generate expanded the tokens for beams/samples
            prefix_embeds = prefix_embeds.repeat_interleave(input_ids.shape[0] // prefix_embeds.shape[0], dim=0)
        prefix_mask = attention_mask.new_ones(prefix_embeds.shape[:2])
        full_mask = torch.cat([prefix_mask, attention_mask], dim=1)  # positions come from this mask
        if past_key_values:
            return {"input_ids": input_ids[:, -1:], "past_key_values": past_key_values,
                    "attention_mask": full_mask, "use_cache": use_cache}
        embeds = torch.cat([prefix_embeds, self.get_input_embeddings()(input_ids)], dim=1)
        return {"inputs_embeds": embeds, "attention_mask": full_mask, "past_key_values": None, "use_cache": use_cache}


def resolve_asset(path):
    """``asset:NAME`` names a folder shipped in the package (the tiny OPT tokenizer)."""
    return asset_path(path[len("asset:"):]) if isinstance(path, str) and path.startswith("asset:") else path


def without_joining_space(prompt):
    """The prompt without one trailing space, which byte-level BPE joins to the next word (" a"); a
    trailing newline or tab is a token of its own and stays (rstrip() dropped it, so training put
    loss on it and generation left it out)."""
    return prompt[:-1] if prompt.endswith(" ") else prompt


def random_frozen_opt(prefix="", files=()):
    """The error for a frozen OPT that no pretrained model or file gives weights (``prefix``: "model."
    for config options; ``files``: the config's files that lacked them)."""
    held = f" and {' / '.join(files)} holds no opt_model weights" if files else ""
    return ValueError(
        f"point_opt: {prefix}freeze_opt is true but {prefix}opt_model is null{held}: the OPT built from "
        f"{prefix}opt_config keeps random weights that training never changes and checkpoints leave out, so "
        f"every later load builds another random OPT. Set {prefix}freeze_opt: false to train it, or give "
        f"{prefix}opt_model a pretrained OPT (a local folder or a hub name)")


@registry.register_model("point_opt")
class PointOPT(PointQueryModel):
    PRETRAINED_MODEL_CONFIG_DICT = {
        "caption_opt2.7b": config_path("models/point_opt_caption_opt2.7b.yaml"),
        "caption_tiny": config_path("models/point_opt_caption_tiny.yaml"),
    }
    QUERY_ONLY = True
    # A stage-1 file carries text parts and heads stage 2 does not use.
    IGNORABLE_KEYS = (
        r"Qformer\.cls\.", r"Qformer\.bert\.embeddings\.(word_embeddings|position_embeddings|position_ids)",
        r"Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\.",
        r"(point_proj|text_proj|itm_head|global_proj)\.",
        r"temp$",
    )
    PRETRAINED_OPTIONAL = ("opt_proj.", "opt_model.")

    def __init__(self, opt_model=None, opt_config=None, opt_tokenizer=None, freeze_opt=None,
                 prompt="", max_txt_len=32, **base):
        """``freeze_opt``: None (the default) freezes the pretrained ``opt_model`` and refuses a random
        OPT; True freezes a random OPT too, for a caller that then loads its weights (``from_config``
        does, from its files, and refuses when they lack them)."""
        if freeze_opt is None:
            if not opt_model:
                raise random_frozen_opt()
            freeze_opt = True
        super().__init__(**base)
        tokenizer_path = resolve_asset(opt_tokenizer or opt_model)
        self.opt_tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, use_fast=False)
        if opt_model:
            self.opt_model = PrefixOPTForCausalLM.from_pretrained(opt_model, torch_dtype=torch.float32)
        else:  # the embedded default's small OPT, trained from scratch
            cfg = OPTConfig(**{**dict(opt_config or {}), "vocab_size": len(self.opt_tokenizer),
                               "pad_token_id": self.opt_tokenizer.pad_token_id,
                               "bos_token_id": self.opt_tokenizer.bos_token_id,
                               "eos_token_id": self.opt_tokenizer.eos_token_id})
            self.opt_model = PrefixOPTForCausalLM(cfg)
        self.freeze_opt = freeze_opt
        if freeze_opt:
            for p in self.opt_model.parameters():
                p.requires_grad = False
        self.opt_proj = nn.Linear(self.Qformer.cfg["hidden_size"], self.opt_model.config.hidden_size)
        # Captions end with a newline, as in BLIP-2's OPT models: its token ends generation.
        self.end_token_id = self.opt_tokenizer("\n", add_special_tokens=False).input_ids[-1]
        self.prompt, self.max_txt_len = prompt, max_txt_len

    @classmethod
    def from_config(cls, cfg):
        opt_config, opt_model, freeze_opt = cfg.get("opt_config"), cfg.get("opt_model") or None, cfg.get("freeze_opt")
        model = cls(
            opt_model=opt_model,
            opt_config=OmegaConf.to_container(opt_config, resolve=True) if opt_config is not None else None,
            opt_tokenizer=cfg.get("opt_tokenizer"),
            freeze_opt=True if freeze_opt is None else bool(freeze_opt),  # a frozen random OPT: see below
            prompt=cfg.get("prompt", ""),
            max_txt_len=cfg.get("max_txt_len", 32),
            **cls.base_kwargs(cfg),
        )
        # Loading writes parameters in place, which torch counts in each tensor's _version. Every OPT
        # parameter, not one: LAVIS's runner keeps the head tied to the embeddings, and no layer.
        versions = [p._version for p in model.opt_model.parameters()]
        model.load_pretrained_from_config(cfg)
        opt_loaded = all(p._version != v for p, v in zip(model.opt_model.parameters(), versions))
        if model.freeze_opt and not opt_model and not opt_loaded:  # then every later load is another OPT
            files = [str(cfg[k]) for k in ("pretrained", "finetuned") if cfg.get(k)]
            raise random_frozen_opt("model.", files)
        return model

    def train(self, mode=True):
        super().train(mode)
        if self.freeze_opt:
            self.opt_model.eval()
        return self

    def frozen_parts(self):
        return super().frozen_parts() + (["opt_model"] if self.freeze_opt else [])

    def prefix_embeds(self, points):
        """(B, N, 6) -> OPT prefix embeddings (B, Q, D_opt)."""
        return self.opt_proj(self.query_outputs(self.encode_point_tokens(points)))

    def forward(self, samples):
        prefix = self.prefix_embeds(samples["point"])
        prompts = self.prompts_of(samples.get("prompt"), prefix.shape[0])
        lengths = [self.prompt_length(p) for p in prompts]
        for p, n in zip(prompts, lengths):  # a prompt filling max_txt_len leaves no token with loss (all: NaN)
            if n >= self.max_txt_len:
                raise ValueError(f"point_opt: the prompt {p!r} is {n} tokens, which leaves "
                                 f"no room for the text within max_txt_len ({self.max_txt_len}): raise "
                                 f"model.max_txt_len or shorten the prompt")
        texts = [p + t + "\n" for p, t in zip(prompts, self.texts_of(samples))]
        self.opt_tokenizer.padding_side = "right"
        tokens = self.opt_tokenizer(texts, return_tensors="pt", padding="longest", truncation=True,
                                    max_length=self.max_txt_len).to(self.device)
        self.check_positions("lower model.max_txt_len", prefix=prefix.shape[1],
                             prompt_and_text=tokens.input_ids.shape[1])
        targets = tokens.input_ids.masked_fill(tokens.attention_mask == 0, -100)
        for i, n in enumerate(lengths):  # no loss on the prompt (BOS included)
            targets[i, :n] = -100
        prefix_targets = torch.full(prefix.shape[:2], -100, dtype=torch.long, device=self.device)
        embeds = torch.cat([prefix, self.opt_model.get_input_embeddings()(tokens.input_ids)], dim=1)
        mask = torch.cat([torch.ones(prefix.shape[:2], dtype=tokens.attention_mask.dtype, device=self.device),
                          tokens.attention_mask], dim=1)
        out = self.opt_model(inputs_embeds=embeds, attention_mask=mask,
                             labels=torch.cat([prefix_targets, targets], dim=1))
        return {"loss": out.loss}

    def prompts_of(self, prompt, batch):
        """``batch`` prompts from a string, a list of ``batch`` (None: the model's prompt, as a caption
        item without one carries) or None (the model's prompt for all)."""
        prompts = [prompt] * batch if prompt is None or isinstance(prompt, str) else list(prompt)
        one_per_cloud(len(prompts), batch, "prompts")
        return [self.prompt if p is None else p for p in prompts]

    def check_positions(self, fix, **lengths):
        """OPT's learned positions end at max_position_embeddings; past it, a bare IndexError in the
        embedding (a device assert on CUDA). ``lengths``: the parts' token counts, by name."""
        limit = self.opt_model.config.max_position_embeddings
        if sum(lengths.values()) > limit:
            raise ValueError(f"point_opt: {' + '.join(lengths)} = {' + '.join(map(str, lengths.values()))} tokens "
                             f"exceeds the LM's max_position_embeddings ({limit}): {fix}")

    def prompt_length(self, prompt):
        """Tokens of ``prompt`` inside ``prompt + text``. A trailing space is left out: byte-level BPE
        joins it to the next word (" a"), and counting it alone would mask a caption token."""
        return len(self.opt_tokenizer(without_joining_space(prompt)).input_ids)

    @torch.no_grad()
    def generate(self, samples, use_nucleus_sampling=False, num_beams=5, max_length=30, min_length=1,
                 top_p=0.9, repetition_penalty=1.0, length_penalty=1.0, num_captions=1, temperature=1.0,
                 prompt=None, use_cache=True):
        """Captions (or answers) for ``samples["point"]``: a list of B * num_captions strings, the
        captions of cloud i at [i * num_captions, (i + 1) * num_captions). ``prompt`` (a string or a
        list of B strings, None for the model's) defaults to ``samples["prompt"]`` and then the model's prompt.
        Lengths count generated tokens. Nucleus sampling draws ``num_captions`` independent samples:
        ``num_beams`` is ignored there (as BLIP-2 does), not turned into beam sampling."""
        if use_nucleus_sampling:
            num_beams = 1
        prefix = self.prefix_embeds(samples["point"])
        batch = prefix.shape[0]
        # The prompt's trailing space belongs to the first generated word ("of" + " a"), as in training.
        prompts = [without_joining_space(p) for p in self.prompts_of(
            prompt if prompt is not None else samples.get("prompt"), batch)]
        options = dict(do_sample=use_nucleus_sampling, top_p=top_p, temperature=temperature, num_beams=num_beams,
                       eos_token_id=self.end_token_id, pad_token_id=self.opt_tokenizer.pad_token_id,
                       repetition_penalty=repetition_penalty, length_penalty=length_penalty,
                       num_return_sequences=num_captions, use_cache=use_cache)
        lengths = [len(ids) for ids in self.opt_tokenizer(prompts).input_ids]
        self.check_positions("lower max_length or shorten the prompt", prefix=prefix.shape[1],
                             prompt=max(lengths), max_length=max_length)
        groups = {}  # items by prompt length in tokens
        for i, n in enumerate(lengths):
            groups.setdefault(n if num_beams > 1 else 0, []).append(i)
        # Beam search divides a beam's score by its length, left padding included: prompts of unequal
        # length in one call made an answer depend on the other questions of the batch. One call per
        # prompt length (one call in all for captions, whose prompt is one).
        texts = [None] * (batch * num_captions)
        for items in groups.values():
            out = self._generate(prefix[items], [prompts[i] for i in items], max_length, min_length, options)
            for k, i in enumerate(items):
                texts[i * num_captions:(i + 1) * num_captions] = out[k * num_captions:(k + 1) * num_captions]
        return texts

    def _generate(self, prefix, prompts, max_length, min_length, options):
        self.opt_tokenizer.padding_side = "left"  # generation continues right after each prompt
        tokens = self.opt_tokenizer(prompts, return_tensors="pt", padding="longest").to(self.device)
        prompt_len = tokens.input_ids.shape[1]
        outputs = self.opt_model.generate(
            input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, prefix_embeds=prefix,
            max_length=prompt_len + max_length, min_length=prompt_len + min_length, **options)
        texts = self.opt_tokenizer.batch_decode(outputs[:, prompt_len:], skip_special_tokens=True)
        return [t.strip() for t in texts]

    def predict_answers(self, samples, num_beams=5, inference_method="generate", max_len=10, min_len=1,
                        num_ans_candidates=128, answer_list=None, prompt="", **kwargs):
        """LAVIS's VQA interface: ``samples["text_input"]`` holds the questions. Answers are generated
        (other ``kwargs`` go to ``generate``); ``answer_list`` and ``num_ans_candidates``, which LAVIS's
        VQA tasks pass for ranking, are unused."""
        if inference_method != "generate":
            raise ValueError(f"point_opt answers by generation only, not inference_method "
                             f"{inference_method!r}: set run.inference_method: generate")
        questions = self.texts_of(samples)
        prompts = [prompt.format(q) if prompt else q for q in questions]
        return self.generate(samples, num_beams=num_beams, max_length=max_len, min_length=min_len,
                             prompt=prompts, **kwargs)
