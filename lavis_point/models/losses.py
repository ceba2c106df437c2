"""Stage-1 losses beside the model: point-text contrastive (ITC) and hard-negative sampling for
matching (ITM). One code path: with one process ``gather`` returns its input unchanged."""
import torch
import torch.distributed as dist
import torch.nn.functional as F


def world():
    """(rank, world_size), (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward sums the gathered gradient over ranks (all_reduce: gloo and nccl
    both have it) and returns this rank's slice."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        rank, size = world()
        return grad.chunk(size, dim=0)[rank]


def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, differentiably: each rank's loss sends gradient
    back to every rank's features, so DDP's averaged gradient equals the one-process gradient of the
    whole batch (keeping only this rank's slice differentiable would drop the other ranks' terms).
    Every rank must pass the same shape."""
    _, size = world()
    if size == 1:
        return x
    return _GatherWithGrad.apply(x.contiguous())


def contrastive_similarities(point_feats, text_feat, temp, all_text=None):
    """point_feats (B, Q, D) and text_feat (B, D), both normalised -> (sim_p2t, sim_t2p), each
    (B, world*B): the best-matching query decides a point cloud's similarity to a text (BLIP-2).
    ``all_text``: ``gather(text_feat)`` when the caller already has it (one gather for two terms)."""
    all_points = gather(point_feats)
    all_text = gather(text_feat) if all_text is None else all_text
    sim_p2t = torch.einsum("bqd,td->bqt", point_feats, all_text).max(dim=1).values / temp
    sim_t2p = torch.einsum("td,bqd->tbq", text_feat, all_points).max(dim=-1).values / temp
    return sim_p2t, sim_t2p


def contrastive_loss(sim_p2t, sim_t2p, label_smoothing=0.1, positives=None):
    """Cross-entropy both ways. Targets: each item's own pair, or with ``positives`` ((B, world*B)
    bool, row i: the gathered items alike to local item i, its own pair included) all of them, in equal
    shares (BLIP's retrieval targets for an image's captions)."""
    rank, _ = world()
    batch = sim_p2t.shape[0]
    targets = torch.arange(batch, device=sim_p2t.device) + rank * batch
    if positives is not None:
        targets = positives.float() / positives.sum(dim=1, keepdim=True)
    return (
        F.cross_entropy(sim_p2t, targets, label_smoothing=label_smoothing)
        + F.cross_entropy(sim_t2p, targets, label_smoothing=label_smoothing)
    ) / 2


@torch.no_grad()
def sample_hard_negatives(sim, same):
    """For each row of a local (B, B) similarity, one column drawn with probability softmax(sim),
    never a positive (``same``: (B, B) bool, True where the pair matches, diagonal included).
    Rows with no negative at all fall back to a uniformly random other column. Vectorised: no loop.
    A batch of one has no other column: refused, as multinomial would fail with a cryptic error."""
    if sim.shape[0] < 2:
        raise ValueError(f"the matching (ITM) loss draws each item's negative from the other items of its "
                         f"rank's batch, so it needs at least 2 per rank, got {sim.shape[0]}: "
                         f"set run.batch_size_train to 2 or more")
    # Positives masked before the softmax, as BLIP-2 does: masked after, a positive far above the
    # negatives (a low temperature) left them all 0 and the fallback below could draw a positive.
    weights = torch.softmax(sim.float().masked_fill(same, -torch.inf), dim=1).nan_to_num(0.0)
    empty = same.all(1)
    if empty.any():
        weights[empty] = (~torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device))[empty].float()
    return torch.multinomial(weights, 1).squeeze(1)
