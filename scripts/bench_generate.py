"""Generation speed: beam search with the key/value cache over the prefix vs without, one process.

The model is stage 2 with a randomly initialised OPT of OPT-125m's shape (768 wide, 12 layers) behind
32 query tokens, as GPT4Point's prefix is; no weights are downloaded. ``min_length = max_length`` so
both runs generate the same number of tokens; the two runs must return the same captions.

    python scripts/bench_generate.py [--beams 5] [--batch 2] [--max-length 30] [--threads 1]
"""
import argparse
import os
import time

import torch

from lavis_point.models.point_opt import PointOPT

OPT_125M_SHAPE = dict(hidden_size=768, word_embed_proj_dim=768, num_hidden_layers=12, num_attention_heads=12,
                      ffn_dim=3072, max_position_embeddings=256, dropout=0.0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--beams", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = PointOPT(
        opt_config=OPT_125M_SHAPE, opt_tokenizer="asset:tiny_opt_tokenizer", freeze_opt=True,
        prompt="a 3D point cloud of ", point_encoder_cfg=dict(model_type="tiny"),
        qformer_cfg=dict(hidden_size=384, num_layers=4, num_heads=12, intermediate_size=1536, encoder_width=384),
        num_query_token=32,
    ).eval()
    points = torch.rand(args.batch, 1024, 6) * 2 - 1
    print(f"stage 2, OPT-125m shape (random), 32 query tokens; batch {args.batch}, beam {args.beams}, "
          f"{args.max_length} tokens each; threads {args.threads}; load average {os.getloadavg()[0]:.2f}")

    def run(use_cache):
        start = time.perf_counter()
        captions = model.generate({"point": points}, num_beams=args.beams, max_length=args.max_length,
                                  min_length=args.max_length, use_cache=use_cache)
        return captions, time.perf_counter() - start

    run(True)  # warm-up
    results = {flag: run(flag) for flag in (True, False)}
    tokens = args.batch * args.max_length
    rate = {flag: tokens / seconds for flag, (_, seconds) in results.items()}
    print(f"  cached    {results[True][1]:7.2f} s  {rate[True]:7.1f} tokens/s")
    print(f"  uncached  {results[False][1]:7.2f} s  {rate[False]:7.1f} tokens/s")
    print(f"cached / uncached tokens per second: {rate[True] / rate[False]:.1f}x (beam {args.beams})")
    same = results[True][0] == results[False][0]
    print(f"same captions with and without the cache: {same}; load average after {os.getloadavg()[0]:.2f}")
    if not same:
        raise SystemExit("cached and uncached generation disagree")


if __name__ == "__main__":
    main()
