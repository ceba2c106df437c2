"""Stage-1 training step: achieved share of the machine's matrix-multiply peak, where the time goes,
and the peak resident memory of a GPT4Point-size step.

Model: the ``pretrain`` Q-Former width (bert-base: 768 wide, 12 layers, 32 queries, cross-attention
every 2nd layer to point tokens projected to 1408) with the ``tiny`` Point-BERT, randomly initialised
(no BERT weights are needed to measure speed). One step = forward (ITC + ITM + ITG) + backward + AdamW.
- FLOPs: torch's FlopCounterMode over forward + backward (matmuls and attention; AdamW's ~10 flops
  per parameter are listed apart).
- Peak: the best of several fp32 square matmuls in this process, same thread count.
- Breakdown: torch.profiler's self CPU time per op, grouped; grouping runs outside torch ops and is
  timed on its own.
- Memory (``--memory``): a child process runs one step of the GPT4Point-size config (12-layer
  Point-BERT on 8192 points, frozen, as GPT4Point trains stage 1) at batch 32 and reports its peak RSS.

    python scripts/bench_train_step.py [--batch 8] [--threads 2] [--bf16] [--memory]
"""
import argparse
import os
import resource
import subprocess
import sys
import time
from collections import defaultdict

import torch
from torch.utils.flop_counter import FlopCounterMode

from lavis_point.models import grouping
from lavis_point.models.point_qformer import PointQFormer

QFORMER = dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, encoder_width=1408,
               cross_attention_freq=2)
CAPTIONS = ["a small red cube", "a large blue sphere resting on its side", "a green torus",
            "a medium yellow cone pointing up", "a purple helix", "a white cylinder", "an orange pyramid",
            "a large black cross"]
# Op name fragments -> part of the step (first match wins).
PARTS = (
    ("attention (SDPA)", ("scaled_dot_product", "_flash_attention", "_efficient_attention")),
    ("matmuls (linear/bmm)", ("addmm", "aten::mm", "bmm", "aten::linear", "aten::matmul", "einsum")),
    ("point encoder convs", ("convolution", "conv1d", "batch_norm")),
    ("loss (softmax/CE)", ("cross_entropy", "log_softmax", "nll_loss", "multinomial", "softmax")),
    ("optimizer (AdamW)", ("adam", "_foreach")),
    ("norms/activations", ("layer_norm", "gelu", "relu")),
    ("copies/reshapes", ("copy_", "cat", "contiguous", "clone", "index", "gather", "to_copy", "expand")),
)


def build(encoder_type, batch, num_points, freeze_encoder):
    model = PointQFormer(embed_dim=256, max_txt_len=32, point_encoder_cfg=dict(model_type=encoder_type),
                         qformer_cfg=QFORMER, num_query_token=32, freeze_encoder=freeze_encoder)
    samples = {"point": torch.rand(batch, num_points, 6) * 2 - 1,
               "text_input": [CAPTIONS[i % len(CAPTIONS)] + f" number {i}" for i in range(batch)]}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                                  weight_decay=0.05)
    return model.train(), samples, optimizer


def step(model, samples, optimizer, bf16):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(samples)["loss"]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def matmul_peak(size=2048, repeats=5):
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size ** 3 / best


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure_memory():
    """Child process: one GPT4Point-size stage-1 step at batch 32; prints peak RSS."""
    model, samples, optimizer = build("gpt4point", 32, 8192, freeze_encoder=True)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds = _timed(lambda: step(model, samples, optimizer, bf16=False))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB -> GiB
    print(f"GPT4Point-size stage-1 step, batch 32, 8192 points: peak RSS {peak:.2f} GiB "
          f"(model + optimizer built: {before / 2 ** 20:.2f} GiB), step {seconds:.1f} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CPUs with bf16 matmul units)")
    parser.add_argument("--memory", action="store_true", help="also measure a batch-32 GPT4Point-size step")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.memory_child:
        return measure_memory()

    print(f"threads {args.threads}, batch {args.batch}, {'bf16 autocast' if args.bf16 else 'fp32'}; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    peak = matmul_peak()
    print(f"fp32 matmul peak (2048^3, best of 5): {peak / 1e9:.1f} GFLOP/s")

    model, samples, optimizer = build("tiny", args.batch, 1024, freeze_encoder=False)
    step(model, samples, optimizer, args.bf16)  # warm-up: allocations, kernel compilation
    with FlopCounterMode(display=False) as counter:
        step(model, samples, optimizer, args.bf16)
    flops = counter.get_total_flops()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    seconds = min(_timed(lambda: step(model, samples, optimizer, args.bf16)) for _ in range(args.steps))
    achieved = flops / seconds
    print(f"stage-1 step: {flops / 1e9:.1f} GFLOP (forward + backward; AdamW adds ~{10 * trainable / 1e9:.2f}), "
          f"{seconds:.2f} s -> {achieved / 1e9:.1f} GFLOP/s = {100 * achieved / peak:.0f}% of the measured peak")

    grouping_time = [0.0]
    original = grouping.group_points

    def timed_group_points(*a, **kw):
        start = time.perf_counter()
        out = original(*a, **kw)
        grouping_time[0] += time.perf_counter() - start
        return out

    import lavis_point.models.point_bert as point_bert
    point_bert.group_points = timed_group_points
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        wall = _timed(lambda: step(model, samples, optimizer, args.bf16))
    point_bert.group_points = original
    parts = defaultdict(float)
    for event in prof.key_averages():
        name = event.key.lower()
        part = next((p for p, keys in PARTS if any(k in name for k in keys)), "other ops")
        parts[part] += event.self_cpu_time_total / 1e6
    parts["grouping (FPS + kNN)"] = grouping_time[0]
    parts["Python / outside ops"] = max(wall - sum(parts.values()), 0.0)
    print(f"where a profiled step's {wall:.2f} s go (self CPU time per op; profiling adds overhead):")
    for part, secs in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"  {part:28s} {secs:6.2f} s  {100 * secs / wall:5.1f}%")

    if args.memory:
        child = subprocess.run([sys.executable, __file__, "--memory-child", "--threads", str(args.threads)],
                               capture_output=True, text=True, check=True)
        print(child.stdout.strip())
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
