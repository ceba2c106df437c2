"""Distributed parity: one stage-1 step with 2 gloo processes x batch B gives the loss and gradients of
1 process x batch 2B (same seed, same data order). DDP on CPU, as torchrun runs it.

What makes that true, and what the test pins down honestly:
- ITC gathers features from every rank differentiably (``losses.gather``): each rank's loss sends
  gradient to every rank's features, so DDP's averaged gradient is the one-process gradient.
- ITM draws one hard negative per row from the process's own batch (point tokens never cross
  processes). The two set-ups draw from different candidate sets, so no seed makes their draws agree;
  both runs here take a fixed choice instead (the next item of the same B-sized group), so everything
  else in ITM is compared.
- ITG averages over caption tokens within each process and DDP averages the processes' means; that
  is the one-process token mean when both halves hold as many tokens, as these captions do (with
  uneven lengths the two weigh tokens slightly differently, as any token-mean loss under DDP).
- BatchNorm in the encoder's mini-PointNet normalises with each process's own batch (DDP's default;
  torch's SyncBatchNorm runs on GPUs only). So: with BatchNorm in eval mode, 2 x B equals 1 x 2B;
  in train mode, 2 x B equals one process that encodes each half on its own, and differs from plain
  1 x 2B: per-process statistics are the only difference.
"""

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from lavis_point.models import point_qformer
from tests.small_models import small_stage1
from tests.two_ranks import run_two_ranks

B = 4
CAPTIONS = ["a red cube", "a blue sphere", "a green cone", "a small ring",
            "a large helix", "a white cross", "a tiny pyramid", "a black cylinder"]
CASES = ("batchnorm_eval", "batchnorm_train", "match_ids")
# Items alike across the two halves (a dataset's match_by): ITC's positives must see the other rank's ids.
MATCH_IDS = torch.tensor([0, 1, 2, 3, 4, 0, 6, 2])


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.rand(2 * B, 256, 6, generator=g) * 2 - 1, CAPTIONS


def next_in_group(sim, same):
    """Row j's negative: the next item of its B-sized group (the same pairs in both set-ups)."""
    j = torch.arange(sim.shape[0])
    return (j // B) * B + (j % B + 1) % B


_TRAINED = {}


def trained_state():
    """Untrained, every cloud's features are nearly alike and match ids would barely move the loss: the
    weights after a few contrastive steps on the whole batch, in one process on one thread, made once
    before the ranks fork (so they inherit the very same weights; a rank would gather its copy)."""
    if "state" not in _TRAINED:
        assert not dist.is_initialized(), "made before the ranks start"
        torch.manual_seed(0)
        model = small_stage1().train()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        points, captions = batch()
        for _ in range(10):
            opt.zero_grad()
            model({"point": points, "text_input": captions})["loss_itc"].backward()
            opt.step()
        torch.set_num_threads(threads)
        _TRAINED["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return _TRAINED["state"]


def model_for(case):
    torch.manual_seed(0)
    model = small_stage1().train()
    if case == "match_ids":
        model.load_state_dict(trained_state())
    if case in ("batchnorm_eval", "match_ids"):
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.eval()
    return model


def one_step(model, points, captions, match_ids=None):
    samples = {"point": points, "text_input": captions}
    if match_ids is not None:
        samples["match_id"] = match_ids
    out = model(samples)
    out["loss"].backward()
    return {k: v.item() for k, v in out.items()}


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def every_case_on(rank):
    points, captions = batch()
    mine = slice(rank * B, (rank + 1) * B)
    result = {}
    for case in CASES:
        model = model_for(case)
        ids = MATCH_IDS[mine] if case == "match_ids" else None
        losses = one_step(DistributedDataParallel(model), points[mine], captions[mine], ids)
        result[case] = {"losses": losses, "grads": grads(model)}
    return result


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parity")
    mp = pytest.MonkeyPatch()
    mp.setattr(point_qformer, "sample_hard_negatives", next_in_group)  # forked ranks inherit it
    trained_state()  # and these weights
    yield run_two_ranks(every_case_on, tmp, join_timeout_s=300)
    mp.undo()


def one_process(case, encode_halves_apart=False, monkeypatch=None, match_ids=MATCH_IDS):
    model = model_for(case)
    if encode_halves_apart:  # what per-process BatchNorm statistics compute, in one process
        encode = model.point_encoder.forward
        monkeypatch.setattr(model.point_encoder, "forward", lambda p: torch.cat([encode(h) for h in p.chunk(2)]))
    # One thread, as each rank runs: reductions split across threads round differently, and the
    # contrastive temperature's gradient (a sum that mostly cancels) magnifies that past 1e-4.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        losses = one_step(model, *batch(), match_ids if case == "match_ids" else None)
    finally:
        torch.set_num_threads(threads)
    return losses, grads(model)


def assert_parity(ranks, case, losses, single_grads):
    for key, value in losses.items():
        ddp = (ranks[0][case]["losses"][key] + ranks[1][case]["losses"][key]) / 2  # what DDP optimises
        assert ddp == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert set(ranks[0][case]["grads"]) == set(single_grads)
    for name, g in single_grads.items():
        assert torch.equal(ranks[0][case]["grads"][name], ranks[1][case]["grads"][name]), name  # DDP synced
        torch.testing.assert_close(ranks[0][case]["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_the_captions_hold_as_many_tokens_in_each_half():
    tokenizer = small_stage1().tokenizer
    lengths = [len(tokenizer(c).input_ids) for c in CAPTIONS]
    assert sum(lengths[:B]) == sum(lengths[B:])


def test_two_processes_equal_one_process_with_batchnorm_in_eval(two_processes, monkeypatch):
    monkeypatch.setattr(point_qformer, "sample_hard_negatives", next_in_group)
    losses, g = one_process("batchnorm_eval")
    assert losses["loss_itc"] > 0 and losses["loss_itm"] > 0 and losses["loss_itg"] > 0
    assert_parity(two_processes, "batchnorm_eval", losses, g)


def test_with_batchnorm_training_per_process_statistics_are_the_only_difference(two_processes, monkeypatch):
    monkeypatch.setattr(point_qformer, "sample_hard_negatives", next_in_group)
    losses, g = one_process("batchnorm_train", encode_halves_apart=True, monkeypatch=monkeypatch)
    assert_parity(two_processes, "batchnorm_train", losses, g)
    _, plain = one_process("batchnorm_train")  # whole-batch statistics: measurably different gradients
    ddp = two_processes[0]["batchnorm_train"]["grads"]
    assert not all(torch.allclose(ddp[n], g, rtol=1e-4, atol=1e-6) for n, g in plain.items())


def test_alike_items_on_different_ranks_are_positives_as_in_one_process(two_processes, monkeypatch):
    monkeypatch.setattr(point_qformer, "sample_hard_negatives", next_in_group)
    losses, g = one_process("match_ids")
    plain = one_process("match_ids", match_ids=None)[0]  # the same model without the ids
    # The ids move the loss ten times further than parity's tolerance, so parity below tests them.
    assert abs(losses["loss_itc"] - plain["loss_itc"]) > 10 * 1e-5 * plain["loss_itc"]
    assert_parity(two_processes, "match_ids", losses, g)


def step_with_ids_on_rank_0_only(rank):
    points, captions = batch()
    mine = slice(rank * B, (rank + 1) * B)
    # LAVIS's ConcatDataset drops a key some items of a batch lack: one rank's batch may have it
    ids = MATCH_IDS[mine] if rank == 0 else None
    return one_step(DistributedDataParallel(model_for("match_ids")), points[mine], captions[mine], ids)


def test_a_step_where_only_one_rank_has_match_ids_runs_the_same_collectives_on_both(tmp_path):
    trained_state()
    # a 30 s group timeout: the old code hung on a gather
    for losses in run_two_ranks(step_with_ids_on_rank_0_only, tmp_path, group_timeout_s=30):
        assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
