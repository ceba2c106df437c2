"""Stage-1 training step: achieved share of the machine's matrix-multiply peak, where the time goes,
and the peak resident memory of a GPT4Point-size step.

Model: the ``pretrain`` Q-Former width (bert-base: 768 wide, 12 layers, 32 queries, cross-attention
every 2nd layer to point tokens projected to 1408) with the ``tiny`` Point-BERT, randomly initialised
(no BERT weights are needed to measure speed). One step = forward (ITC + ITM + ITG) + backward + AdamW
as ``runner_point`` builds it (``fused=True``; LAVIS's RunnerBase uses the defaults: on CPU, a Python
loop over the tensors).
- FLOPs: torch's FlopCounterMode over forward + backward (matmuls and attention; AdamW's ~10 flops
  per parameter are listed apart).
- Peak: the best of several fp32 square matmuls in this process, same thread count. The share is
  given per wall second and per CPU second: on a shared machine the wall figure also counts the
  time other processes held the cores, the CPU figure does not.
- Breakdown: torch.profiler's self time per op, by phase (forward, backward, optimizer) and by kind.
  An op's kind is its own name for matmuls, else the nearest enclosing op that names a layer
  (dropout, attention, LayerNorm, GELU, embedding, loss, encoder convs), else the arithmetic it does.
  Grouping (numba, outside torch ops) is timed on its own.
- Page faults: large fresh tensors are mapped anew by glibc (or reused after it returned them to
  the system) on every step, and each new page costs a fault; the step's minor faults and this
  machine's first-touch rate say what that costs. The AdamW line compares RunnerBase's loop with
  runner_point's ``fused=True`` on the same gradients. Right after the plain step, the same step
  after what runner_point does on CPU, keeping freed memory for reuse (``runners/host_memory.py``):
  its faults and time, and the ratio; the profile and the AdamW line then run with it, as training
  does.
- Generation head: the 30523-word head and its loss alone, forward + backward, on the batch's captions,
  over every text position (as before) and over the positions with a target only (as point_qformer
  computes it now: padding has no target), alternating, best of 3 each.
- Memory (``--memory``): a child process runs one step of the GPT4Point-size config (12-layer
  Point-BERT on 8192 points, frozen, as GPT4Point trains stage 1) at batch 32 (``--memory-batch``)
  and reports its peak RSS. Its address space is capped (``--memory-limit-gb`` beyond what it maps
  at start, and never within 2.5 GB of the machine's available memory) so it fails with a lower
  bound instead of pushing the machine out of memory.

    python scripts/bench_train_step.py [--batch 8] [--threads 1] [--bf16] [--memory]
"""
import argparse
import contextlib
import os
import resource
import subprocess
import sys
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.profiler import record_function
from torch.utils.flop_counter import FlopCounterMode

from lavis_point.models import grouping
from lavis_point.models.point_qformer import PointQFormer
from lavis_point.runners.host_memory import keep_freed_memory

QFORMER = dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, encoder_width=1408,
               cross_attention_freq=2)
CAPTIONS = ["a small red cube", "a large blue sphere resting on its side", "a green torus",
            "a medium yellow cone pointing up", "a purple helix", "a white cylinder", "an orange pyramid",
            "a large black cross"]
PHASES = ("forward", "backward", "optimizer")
MATMULS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "einsum", "_scaled_dot_product_flash_attention_for_cpu",
           "_scaled_dot_product_flash_attention_for_cpu_backward"}
# Enclosing ops (forward names, backward node names), matched as lower-case fragments, nearest first.
LAYERS = (
    ("dropout masks (p=0.1)", ("dropout",)),
    ("losses (CE, log-softmax)", ("cross_entropy", "log_softmax", "nll_loss", "logsoftmax", "nllloss")),
    ("attention softmax + mask", ("scaled_dot_product", "softmaxbackward", "_softmax")),
    ("LayerNorm", ("layer_norm", "layernorm")),
    ("GELU", ("gelu",)),
    ("embeddings (dense grads)", ("embedding",)),
    ("point encoder BatchNorm", ("convolution", "batch_norm", "batchnorm")),  # its 1x1 convs are matmuls
)
COPIES = {"copy_", "clone", "cat", "contiguous", "_to_copy", "to", "index", "index_select", "gather",
          "slice_backward", "select_backward", "index_put_", "masked_select", "stack", "repeat"}
REDUCTIONS = {"sum", "mean", "max", "amax", "norm", "linalg_vector_norm", "all", "any"}
VIEWS = {"view", "reshape", "transpose", "t", "as_strided", "empty", "empty_strided", "expand", "permute",
         "unsqueeze", "squeeze", "select", "slice", "detach", "alias", "_unsafe_view", "resolve_conj",
         "resolve_neg", "lift_fresh", "empty_like", "split", "chunk", "narrow", "unbind", "result_type",
         "is_nonzero", "item", "_local_scalar_dense", "zeros", "ones", "new_zeros", "new_empty", "linear"}


def build(encoder_type, batch, num_points, freeze_encoder):
    model = PointQFormer(embed_dim=256, max_txt_len=32, point_encoder_cfg=dict(model_type=encoder_type),
                         qformer_cfg=QFORMER, num_query_token=32, freeze_encoder=freeze_encoder)
    samples = {"point": torch.rand(batch, num_points, 6) * 2 - 1,
               "text_input": [CAPTIONS[i % len(CAPTIONS)] + f" number {i}" for i in range(batch)]}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                                  weight_decay=0.05, fused=True)
    return model.train(), samples, optimizer


def step(model, samples, optimizer, bf16, mark=False):
    """One training step; ``mark`` labels its phases for the profiler."""
    phase = record_function if mark else (lambda name: contextlib.nullcontext())
    with phase("forward"), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(samples)["loss"]
    with phase("backward"):
        loss.backward()
    with phase("optimizer"):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _timed(fn):
    """(wall seconds, CPU seconds of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def _best(fn, repeats):
    times = [_timed(fn) for _ in range(repeats)]
    return min(t[0] for t in times), min(t[1] for t in times)


def _best_and_faults(fn, repeats):
    """_best, and the bytes this process first touched (minor faults) per call."""
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    wall, cpu = _best(fn, repeats)
    faulted = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return wall, cpu, faulted * resource.getpagesize() / repeats


def matmul_peak(size=2048, repeats=5):
    """Best fp32 matmul rate, (per wall second, per CPU second)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    wall, cpu = _best(lambda: a @ b, repeats)
    return 2 * size ** 3 / wall, 2 * size ** 3 / cpu


def first_touch_seconds_per_gib(mib=512):
    """Seconds per GiB that writing fresh (just mapped) memory costs beyond writing memory in use."""
    used = torch.empty(mib * 2 ** 18)
    used.fill_(1.0)
    fresh = min(_timed(lambda: torch.empty(mib * 2 ** 18).fill_(1.0))[0] for _ in range(3))
    reused = min(_timed(lambda: used.fill_(2.0))[0] for _ in range(3))
    return (fresh - reused) * 1024 / mib


def kind_of(event):
    name = event.name.removeprefix("aten::")
    if name in MATMULS:
        return "matrix multiplies"
    node = event
    while node is not None:
        lowered = node.name.lower()
        for kind, fragments in LAYERS:
            if any(f in lowered for f in fragments):
                return kind
        node = node.cpu_parent
    parent = event.cpu_parent.name if event.cpu_parent is not None else ""
    if name in ("add", "add_") and (parent.startswith("autograd::engine::evaluate_function")
                                    or "AccumulateGrad" in parent):
        return "gradient accumulation (+)"
    if event.name.startswith("autograd::") or event.name.endswith(("Backward0", "Backward1")) \
            or "AccumulateGrad" in event.name:
        return "autograd engine"
    if name in ("fill_", "zero_"):
        return "zero fills"
    if name in REDUCTIONS:
        return "reductions (bias grads, pooling)"
    if name in COPIES:
        return "copies, cat, indexing"
    if name in VIEWS:
        return "views, allocation, dispatch"
    if not event.name.startswith("aten::"):
        return "Python between ops"
    return "elementwise arithmetic"


def breakdown(model, samples, optimizer, bf16):
    """Profile one step; print self time by kind x phase and the matmuls' achieved rate."""
    grouping_time = [0.0]
    original = grouping.group_points

    def timed_group_points(*a, **kw):
        start = time.perf_counter()
        out = original(*a, **kw)
        grouping_time[0] += time.perf_counter() - start
        return out

    import lavis_point.models.point_bert as point_bert
    point_bert.group_points = timed_group_points
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_flops=True) as prof:
        wall, cpu = _timed(lambda: step(model, samples, optimizer, bf16, mark=True))
    point_bert.group_points = original

    table = defaultdict(lambda: [0.0] * len(PHASES))
    other = defaultdict(float)
    matmul_flops = matmul_time = 0.0
    for event in prof.events():
        root = event
        while root.cpu_parent is not None:
            root = root.cpu_parent
        if root.name not in PHASES:
            continue
        phase, seconds = PHASES.index(root.name), event.self_cpu_time_total / 1e6
        kind = "AdamW update + zero_grad" if root.name == "optimizer" else kind_of(event)
        if event.name == "forward":  # the forward's own time includes the grouping kernels
            seconds -= grouping_time[0]
            table["grouping (FPS + kNN)"][0] += grouping_time[0]
        table[kind][phase] += seconds
        if kind == "matrix multiplies":
            matmul_flops += event.flops or 0
            matmul_time += seconds
        if kind == "elementwise arithmetic":
            other[event.name.removeprefix("aten::")] += seconds
    table["outside the profiled phases"][0] = max(wall - sum(sum(v) for v in table.values()), 0.0)

    print(f"where a profiled step's {wall:.2f} s go (self time per op; profiling adds overhead):")
    print(f"  {'kind':34s} {'forward':>8s} {'backward':>9s} {'optimizer':>9s} {'total':>7s} {'share':>6s}")
    for kind, secs in sorted(table.items(), key=lambda kv: -sum(kv[1])):
        print(f"  {kind:34s} " + " ".join(f"{s:8.2f}s" for s in secs)
              + f" {sum(secs):6.2f}s {100 * sum(secs) / wall:5.1f}%")
    top = ", ".join(f"{n} {s:.2f}s" for n, s in sorted(other.items(), key=lambda kv: -kv[1])[:6])
    print(f"  elementwise arithmetic by op: {top}")
    return matmul_flops, matmul_time, wall, cpu


def compare_adamw(model, samples, optimizer, bf16, repeats=2):
    """optimizer.step on the same gradients: RunnerBase's loop vs runner_point's fused (wall seconds)."""
    baseline = torch.optim.AdamW(optimizer.param_groups[0]["params"], lr=1e-4, weight_decay=0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(samples)["loss"]
    loss.backward()
    baseline.step()  # creates its state
    loop = min(_timed(baseline.step)[0] for _ in range(repeats))
    fast = min(_timed(optimizer.step)[0] for _ in range(repeats))
    optimizer.zero_grad(set_to_none=True)
    return loop, fast


def compare_generation_head(model, samples, repeats=3):
    """The 30523-word generation head and its loss, forward + backward, on this batch's captions: over
    every text position (as before) vs only the positions that have a target (padding has none), as
    point_qformer computes it. Returns (share of positions with a target, seconds every, seconds targeted)."""
    tokens = model.tokenize(samples["text_input"])
    targets = tokens.input_ids.masked_fill(tokens.attention_mask == 0, -100)[:, 1:]
    has_target = targets != -100
    hidden = torch.randn(*targets.shape, model.Qformer.cfg["hidden_size"], requires_grad=True)

    def every():
        logits = model.Qformer.lm_logits(hidden)
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                        label_smoothing=0.1).backward()
        model.zero_grad(set_to_none=True)

    def targeted():
        F.cross_entropy(model.Qformer.lm_logits(hidden[has_target]), targets[has_target],
                        label_smoothing=0.1).backward()
        model.zero_grad(set_to_none=True)

    every(), targeted()  # warm-up
    times = {every: [], targeted: []}
    for _ in range(repeats):  # alternating, so both meet the same load
        for fn in times:
            times[fn].append(_timed(fn)[0])
    return float(has_target.float().mean()), min(times[every]), min(times[targeted])


def _available_bytes():
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info["MemAvailable"]


def _mapped_bytes():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))


def measure_memory(batch, limit_gb):
    """Child process: one GPT4Point-size stage-1 step under an address-space cap; prints peak RSS, or
    a lower bound when the cap is hit."""
    budget = min(limit_gb * 2 ** 30, _available_bytes() - 2.5 * 2 ** 30)
    resource.setrlimit(resource.RLIMIT_AS, (int(_mapped_bytes() + budget),) * 2)
    print(f"child: address space capped at {budget / 2 ** 30:.1f} GiB beyond the "
          f"{_mapped_bytes() / 2 ** 30:.1f} GiB mapped at start", flush=True)

    def rss():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB -> GiB

    try:
        model, samples, optimizer = build("gpt4point", batch, 8192, freeze_encoder=True)
        built = rss()
        seconds, _ = _timed(lambda: step(model, samples, optimizer, bf16=False))
    except (MemoryError, RuntimeError) as error:
        if not isinstance(error, MemoryError) and not any(w in str(error).lower() for w in ("memory", "alloc")):
            raise
        print(f"GPT4Point-size stage-1 step, batch {batch}, 8192 points: peak RSS >= {rss():.2f} GiB "
              f"(address-space cap of {budget / 2 ** 30:.1f} GiB hit: {str(error).splitlines()[0][:120]})")
        return
    print(f"GPT4Point-size stage-1 step, batch {batch}, 8192 points: peak RSS {rss():.2f} GiB "
          f"(model + optimizer built: {built:.2f} GiB), step {seconds:.1f} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CPUs with bf16 matmul units)")
    parser.add_argument("--memory", action="store_true", help="also measure a batch-32 GPT4Point-size step")
    parser.add_argument("--memory-batch", type=int, default=32)
    parser.add_argument("--memory-limit-gb", type=float, default=17.0,
                        help="address space the memory child may add to what it maps at start")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.memory_child:
        return measure_memory(args.memory_batch, args.memory_limit_gb)

    print(f"threads {args.threads}, batch {args.batch}, {'bf16 autocast' if args.bf16 else 'fp32'}; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    if args.memory:  # first, while this process holds no model
        start = time.perf_counter()
        command = [sys.executable, __file__, "--memory-child", "--threads", str(args.threads),
                   "--memory-batch", str(args.memory_batch), "--memory-limit-gb", str(args.memory_limit_gb)]
        child = subprocess.run(command, capture_output=True, text=True)
        print(child.stdout.strip())
        if child.returncode:
            print(f"memory child failed (exit {child.returncode}): {child.stderr.strip()[-500:]}")
        print(f"memory child wall time {time.perf_counter() - start:.0f} s")

    peak, peak_cpu = matmul_peak()
    print(f"fp32 matmul peak (2048^3, best of 5): {peak / 1e9:.1f} GFLOP/s per wall second, "
          f"{peak_cpu / 1e9:.1f} per CPU second")

    model, samples, optimizer = build("tiny", args.batch, 1024, freeze_encoder=False)
    step(model, samples, optimizer, args.bf16)  # warm-up: allocations, kernel compilation
    with FlopCounterMode(display=False) as counter:
        step(model, samples, optimizer, args.bf16)
    flops = counter.get_total_flops()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    seconds, cpu, faulted = _best_and_faults(lambda: step(model, samples, optimizer, args.bf16), args.steps)
    print(f"stage-1 step: {flops / 1e9:.1f} GFLOP (forward + backward; AdamW adds "
          f"~{10 * trainable / 1e9:.2f}), "
          f"{seconds:.2f} s wall, {cpu:.2f} s CPU -> {flops / seconds / 1e9:.1f} GFLOP/s = "
          f"{100 * flops / seconds / peak:.0f}% of the measured peak per wall second, "
          f"{100 * flops / cpu / peak_cpu:.0f}% per CPU second")
    per_gib = first_touch_seconds_per_gib()
    print(f"page faults: {faulted / 2 ** 30:.2f} GiB first touched per step; first touch costs "
          f"{per_gib:.2f} s/GiB here -> ~{faulted / 2 ** 30 * per_gib:.2f} s of the step")
    # What runner_point does on CPU (host_memory.py), right after the baseline and before anything
    # else allocates: it is process-wide and cannot be undone, so what follows runs with it too.
    if keep_freed_memory():
        step(model, samples, optimizer, args.bf16)  # the first step after it still maps afresh
        kept_seconds, kept_cpu, kept_faulted = _best_and_faults(lambda: step(model, samples, optimizer, args.bf16),
                                                                args.steps)
        print(f"freed memory kept for reuse (runner_point on CPU): {kept_faulted / 2 ** 30:.2f} GiB first touched "
              f"per step; step {kept_seconds:.2f} s wall, {kept_cpu:.2f} s CPU: {seconds / kept_seconds:.2f}x wall, "
              f"{cpu / kept_cpu:.2f}x CPU against the step above")

    matmul_flops, matmul_time, wall, cpu = breakdown(model, samples, optimizer, args.bf16)
    # Self times are wall time; the profiled step's CPU/wall ratio converts them to CPU seconds.
    rate, fraction = matmul_flops / (matmul_time * cpu / wall), matmul_time / wall
    print(f"matmuls in the profiled step: {matmul_flops / 1e9:.0f} GFLOP in {matmul_time:.2f} s "
          f"({100 * fraction:.0f}% of it) at {rate / 1e9:.1f} GFLOP/s per CPU second = "
          f"{100 * rate / peak_cpu:.0f}% of the peak: share ~ {100 * rate / peak_cpu:.0f}% x "
          f"{100 * fraction:.0f}% = {rate * fraction / peak_cpu * 100:.0f}% (profiled step: {wall:.2f} s wall, "
          f"{cpu:.2f} s CPU)")
    loop, fast = compare_adamw(model, samples, optimizer, args.bf16)
    print(f"AdamW step alone, {trainable / 1e6:.0f}M parameters: RunnerBase's default (loop) {loop:.2f} s, "
          f"runner_point's fused=True {fast:.2f} s ({loop / fast:.1f}x)")

    share, every, targeted = compare_generation_head(model, samples)
    print(f"generation head + loss alone (forward + backward), {100 * share:.0f}% of the text positions with a "
          f"target: every position {every:.3f} s, only those {targeted:.3f} s ({every / targeted:.2f}x)")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
