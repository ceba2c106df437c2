"""Build the byte-level BPE tokenizer of the embedded default's tiny OPT (run once; output is
committed under lavis_point/assets/tiny_opt_tokenizer). Byte-level BPE, like OPT's GPT-2 BPE, so any
text tokenizes; merges are learned from the embedded captions, questions and the prompt, which keeps
the vocabulary (and the tiny LM's softmax) small. Deterministic: same inputs, same files.

    python scripts/make_tiny_tokenizer.py
"""
import itertools
import json
import os

from tokenizers import ByteLevelBPETokenizer

from lavis_point.datasets import shapes
from lavis_point.paths import asset_path

SPECIAL = ["<s>", "<pad>", "</s>", "<unk>"]  # OPT's ids 0..3


def corpus():
    prompts = ["a 3D point cloud of ", "Question: what colour is it? Answer:", "Question: what shape is it? Answer:",
               "Question: what size is it? Answer:"]
    yield from prompts
    for t, s, c, z in itertools.product(shapes.TEMPLATES, shapes.SHAPES, shapes.COLORS, shapes.SIZES):
        yield prompts[0] + shapes._fill(t, s, c, z) + "\n"


def main(out=asset_path("tiny_opt_tokenizer"), vocab_size=600):
    os.makedirs(out, exist_ok=True)
    tok = ByteLevelBPETokenizer(add_prefix_space=False)
    tok.train_from_iterator(list(corpus()), vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL,
                            show_progress=False)
    tok.save_model(out)
    config = {"tokenizer_class": "GPT2Tokenizer", "add_bos_token": True, "add_prefix_space": False,
              "bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "<pad>",
              "model_max_length": 1024}
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out, "special_tokens_map.json"), "w") as f:
        json.dump({k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, f, indent=2)
    print(f"wrote {out}: vocab {tok.get_vocab_size()}")


if __name__ == "__main__":
    main()
