"""Point-encoder speed, each figure against its baseline in the same process:

1. The encoder's tokenizer (MiniPointNet): its forward (1x1 convs as channels-last matmuls, the
   concat split into a per-group and a per-point half) vs the modules applied as written
   (``point_bert.conv_forward``: Conv1d on (BG, C, k), concat), forward and forward + backward, at
   the embedded default's size and at GPT4Point's (512 groups of 32).
2. The embedded default's stage-2 step (frozen encoder, batch 32): the encoder run every step vs its
   tokens served from ``point_token_cache_size`` (what every epoch after the first does).

    python scripts/bench_encoder.py [--threads 2] [--repeats 5]
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lavis_point  # noqa: E402,F401
from lavis.common.registry import registry  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from lavis_point.models.point_bert import MiniPointNet, conv_forward  # noqa: E402
from scripts.bench_grouping import median_ms  # noqa: E402

SIZES = {  # name: (pointnet dims, encoder dims, batch, groups, group size)
    "embedded default (tiny)": ((64, 128, 256), 128, 32, 64, 16),
    "GPT4Point": ((128, 256, 512), 256, 8, 512, 32),
}


def median_s(fn, repeats):
    fn()  # warm-up
    return median_ms(fn, repeats) / 1000


def tokenizer(repeats):
    for name, (dims, out_dim, batch, groups, k) in SIZES.items():
        torch.manual_seed(0)
        net = MiniPointNet(6, dims, out_dim).train()
        x = torch.randn(batch, groups, k, 6)
        runs = {
            "forward": (lambda: conv_forward(net, x), lambda: net(x)),
            "forward + backward": (lambda: conv_forward(net, x).sum().backward(),
                                   lambda: net(x).sum().backward()),
        }
        for what, (reference, ours) in runs.items():
            grad = torch.enable_grad() if "backward" in what else torch.no_grad()
            with grad:
                base, fast = median_s(reference, repeats), median_s(ours, repeats)
            print(f"tokenizer, {name}, batch {batch} x {groups} groups of {k}, {what}: "
                  f"conv modules {1000 * base:.1f} ms, ours {1000 * fast:.1f} ms, {base / fast:.2f}x")


def stage2_step(repeats):
    cls = registry.get_model_class("point_opt")
    cfg = OmegaConf.load(cls.default_config_path("caption_tiny")).model
    cfg.freeze_encoder, cfg.point_token_cache_size = True, 64
    torch.manual_seed(0)
    model = cls.from_config(cfg).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    batch = {"point": torch.rand(32, 1024, 6) * 2 - 1, "text_input": ["a small red cube of medium size"] * 32}

    def step():
        optimizer.zero_grad()
        model(batch)["loss"].backward()
        optimizer.step()

    times = {}
    for name, capacity in (("encoder every step", 0), ("cached tokens", 64)):
        model.token_cache.capacity = capacity
        times[name] = median_s(step, repeats)
    uncached, cached = times.values()
    print(f"stage-2 step, embedded default, batch 32: encoder every step {1000 * uncached:.0f} ms, "
          f"cached tokens {1000 * cached:.0f} ms, {uncached / cached:.2f}x ({model.token_cache.summary()})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}; load average before: {os.getloadavg()[0]:.2f}")
    tokenizer(args.repeats)
    stage2_step(args.repeats)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
