"""Two gloo processes forked from a test: they start with everything imported (seconds, not a minute
of imports each) and with what the test set up (monkeypatches, weights made before the fork)."""
import datetime
import multiprocessing
import traceback

import torch
import torch.distributed as dist


def _rank(work, rank, folder, group_timeout_s):
    try:
        torch.set_num_threads(1)
        timeout = {} if group_timeout_s is None else {"timeout": datetime.timedelta(seconds=group_timeout_s)}
        dist.init_process_group("gloo", init_method=f"file://{folder / 'init'}", rank=rank, world_size=2, **timeout)
        result = work(rank)
        dist.destroy_process_group()
        torch.save(result, folder / f"rank{rank}.pt")
    except BaseException:
        (folder / f"rank{rank}.error").write_text(traceback.format_exc())
        raise


def run_two_ranks(work, folder, join_timeout_s=120, group_timeout_s=None):
    """``work(rank)`` in each of two ranks of one gloo group; -> [rank 0's result, rank 1's] (anything
    ``torch.load(weights_only=True)`` reads back). Fails with the ranks' tracebacks if either fails."""
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_rank, args=(work, r, folder, group_timeout_s)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=join_timeout_s)
    errors = [(folder / f"rank{r}.error").read_text() for r in range(2) if (folder / f"rank{r}.error").exists()]
    assert all(p.exitcode == 0 for p in procs), errors
    return [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(2)]
