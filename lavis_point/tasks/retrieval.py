"""Point-text retrieval (``point_retrieval``): recall@1/5/10 point -> text and text -> point on any
point-caption dataset, as BLIP-2 evaluates image-text retrieval.

1. Contrastive similarity of every cloud with every caption (the best query's cosine, stage 1's
   ``point_text_similarity``).
2. For each query, its ``k_test`` most similar candidates are re-scored with the matching head
   (logit of "matches") added to their similarity; the others stay below every re-scored one, so
   re-ranked R@K for K > k_test is R@k_test (a warning says so). A NaN score ranks last (a miss);
   a warning counts the scores that are not finite.

Under torchrun each rank encodes its share of the clouds; the small projected features are gathered
so every rank holds the full similarity matrix, while the large point tokens the matching head needs
stay on the rank that owns the cloud: a rank re-scores the (cloud, caption) pairs of its own clouds,
both directions, and one all-reduce merges them. A cloud the sampler repeated to pad a rank's batch is
owned by one rank only, so every cloud and caption counts once. A cloud that cannot be read is
dropped with its captions and counted (``num_skipped``), as the other tasks drop bad items.

Positives: a cloud's own captions, or with ``run.match_by: [shape, color, size]`` every caption of a
cloud with the same attributes (the embedded set repeats attribute combinations across clouds, so
instance-level retrieval would punish a right answer). Chance levels are reported beside each recall.
"""
import logging
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from lavis.common.dist_utils import get_rank, is_dist_avail_and_initialized, is_main_process
from lavis.common.registry import registry
from lavis.datasets.data_utils import prepare_sample

from lavis_point.tasks.base import PointBaseTask, collective_device, model_device, report_skipped
from lavis_point.tasks.eval_io import all_gather_objects, write_metrics
from lavis_point.tasks.ranking_metrics import chance_recall_at_k, recall_at_k

KS = (1, 5, 10)


def retrieval_pairs(dataset, match_by=None, keep=None, references=None):
    """(cloud ids, captions, positives point -> text, positives text -> point); with ``keep`` (ids),
    only those clouds and their captions (the others' clouds could not be read). ``references``:
    ``dataset.references`` when the caller has it already (the property builds the whole dict)."""
    references = dataset.references if references is None else references  # id -> captions, in order
    ids = [i for i in references if keep is None or i in keep]
    texts, text_cloud = [], []
    for i, cloud_id in enumerate(ids):
        texts += references[cloud_id]
        text_cloud += [i] * len(references[cloud_id])
    if match_by:
        attributes = dataset.attributes
        if attributes is None:
            raise ValueError(f"run.match_by={list(match_by)} needs a dataset whose annotations carry attributes")
        key = [tuple(attributes[c][a] for a in match_by) for c in ids]
    else:
        key = list(range(len(ids)))
    clouds_of_key, texts_of_key = {}, {}
    for i, k in enumerate(key):
        clouds_of_key.setdefault(k, []).append(i)
    for t, i in enumerate(text_cloud):
        texts_of_key.setdefault(key[i], []).append(t)
    p2t = [texts_of_key[key[i]] for i in range(len(ids))]
    t2p = [clouds_of_key[key[i]] for i in text_cloud]
    return ids, texts, p2t, t2p


@registry.register_task("point_retrieval")
class PointRetrievalTask(PointBaseTask):
    def __init__(self, k_test=128, match_by=None, rerank_batch_size=128):
        super().__init__()
        self.k_test, self.match_by, self.rerank_batch_size = k_test, match_by, rerank_batch_size
        self.dataset = None

    @classmethod
    def setup_task(cls, cfg):
        run = cfg.run_cfg
        match_by = run.get("match_by")
        return cls(k_test=run.get("k_test", 128), match_by=list(match_by) if match_by else None,
                   rerank_batch_size=run.get("rerank_batch_size", 128))

    def before_evaluation(self, model, dataset, **kwargs):
        self.dataset = dataset

    def evaluation(self, model, data_loader, cuda_enabled=None):
        if self.k_test < max(KS):
            logging.warning("run.k_test=%d is below the largest K (%d): re-ranked recall@K for K > %d is capped "
                            "at recall@%d (a candidate outside a query's top k_test is never re-scored)",
                            self.k_test, max(KS), self.k_test, self.k_test)
        device = model_device(model)
        # This rank's clouds: features for everyone, point tokens kept here for the matching head, in host
        # memory (on the GPU, 5000 clouds' GPT4Point-size tokens took 14 GB, twice that in the cat).
        # A cloud that cannot be read is dropped with its captions, counted (num_skipped).
        local_ids, local_feats, local_tokens, failures = [], [], [], []
        for samples in data_loader:
            failures.extend(samples.pop("skipped", ()))
            if not samples:  # every cloud of this batch was bad
                continue
            samples = prepare_sample(samples, cuda_enabled=device.type == "cuda")
            _, tokens, feats = model.encode_points(samples["point"])
            local_ids += list(samples["instance_id"])
            local_feats.append(feats.cpu())
            local_tokens.append(tokens.cpu())
        self.skipped_in_evaluation = report_skipped(failures, "evaluation", distinct=True)
        local_tokens = torch.cat(local_tokens) if local_tokens else None

        feats_of, owner, owner_row = {}, {}, {}  # cloud id -> its features, rank, row there
        for rank, (cloud_ids, feats) in enumerate(all_gather_objects((local_ids, local_feats))):
            for row, (cloud_id, f) in enumerate(zip(cloud_ids, torch.cat(feats) if feats else ())):
                if cloud_id not in owner:
                    feats_of[cloud_id], owner[cloud_id], owner_row[cloud_id] = f, rank, row
        references = self.dataset.references
        ids, texts, pos_p2t, pos_t2p = retrieval_pairs(self.dataset, self.match_by, keep=owner, references=references)
        missing = len(references) - len(ids)
        if missing != self.skipped_in_evaluation:
            raise RuntimeError(f"{missing} clouds of the split were not evaluated by any rank, "
                               f"{self.skipped_in_evaluation} of them unreadable")
        if not ids:
            raise RuntimeError(f"no cloud of the split could be read ({missing} unreadable; see the warnings)")
        point_feats = torch.stack([feats_of[c] for c in ids])
        owner, owner_row = [owner[c] for c in ids], [owner_row[c] for c in ids]

        # Every rank encodes all captions (cheap next to the clouds) and so holds the full matrix.
        # Identical captions (templated sets repeat them) are scored once and share a column.
        position = {t: u for u, t in enumerate(dict.fromkeys(texts))}
        unique_texts, column = list(position), torch.tensor([position[t] for t in texts])
        tokens = model.tokenize(unique_texts)
        text_feats = torch.cat([
            model.encode_text(SimpleNamespace(input_ids=tokens.input_ids[s: s + 256],
                                              attention_mask=tokens.attention_mask[s: s + 256])).cpu()
            for s in range(0, len(unique_texts), 256)])
        sim = model.point_text_similarity(point_feats, text_feats)  # (P, U)

        # The top k_test of each query in each direction; the matching head scores each pair once.
        in_top_p2t, in_top_t2p = torch.zeros_like(sim, dtype=torch.bool), torch.zeros_like(sim, dtype=torch.bool)
        in_top_p2t.scatter_(1, sim.topk(min(self.k_test, sim.shape[1]), dim=1).indices, True)
        in_top_t2p.scatter_(0, sim.topk(min(self.k_test, sim.shape[0]), dim=0).indices, True)
        me = get_rank()
        pairs = [(i, u) for i, u in (in_top_p2t | in_top_t2p).nonzero().tolist() if owner[i] == me]
        logging.info("Re-ranking %d cloud-caption pairs with the matching head on this rank", len(pairs))
        reranked, done = torch.zeros_like(sim), torch.zeros_like(sim)
        for (i, u), score in zip(pairs, self.match_scores(model, pairs, local_tokens, owner_row, tokens, device)):
            reranked[i, u], done[i, u] = sim[i, u] + score, 1.0
        if is_dist_avail_and_initialized():
            both = torch.stack([reranked, done]).to(collective_device())
            dist.all_reduce(both)  # each pair was scored on exactly one rank
            reranked, done = both.cpu()
        below = torch.tensor(-float("inf"))
        p2t = torch.where(in_top_p2t & (done > 0), reranked, below)[:, column]  # (P, T)
        t2p = torch.where(in_top_t2p & (done > 0), reranked, below).t()[column]  # (T, P)
        sim, rescored = sim[:, column], reranked[:, column][done[:, column] > 0]

        if not is_main_process():
            return None
        bad_sim, bad_rescored = int((~torch.isfinite(sim)).sum()), int((~torch.isfinite(rescored)).sum())
        if bad_sim or bad_rescored:
            logging.warning("retrieval: %d of %d contrastive similarities and %d of %d re-ranked scores are not "
                            "finite (a diverged model?); NaN ranks last, as a miss", bad_sim, sim.numel(),
                            bad_rescored, rescored.numel())
        metrics = {"num_points": len(ids), "num_texts": len(texts), "k_test": self.k_test,
                   "num_skipped": self.skipped_in_evaluation}
        for name, scores, itc, positives, candidates in (
                ("point_to_text", p2t, sim, pos_p2t, len(texts)),
                ("text_to_point", t2p, sim.t(), pos_t2p, len(ids))):
            chance = chance_recall_at_k(candidates, positives, KS)
            for k, r in recall_at_k(scores.numpy(), positives, KS).items():
                metrics[f"{name}_r{k}"] = r
                metrics[f"{name}_r{k}_chance"] = chance[k]
            for k, r in recall_at_k(itc.numpy(), positives, KS).items():
                metrics[f"{name}_r{k}_itc"] = r
        metrics["agg_metrics"] = float(np.mean([metrics[f"{d}_r{k}"] for d in ("point_to_text", "text_to_point")
                                                for k in KS]))
        return metrics

    def match_scores(self, model, pairs, local_tokens, owner_row, tokens, device):
        """Matching-head logit of "matches" for each (cloud, caption) pair of this rank's clouds."""
        scores = []
        for s in range(0, len(pairs), self.rerank_batch_size):
            chunk = pairs[s: s + self.rerank_batch_size]
            rows = torch.tensor([owner_row[i] for i, _ in chunk])
            texts = torch.tensor([t for _, t in chunk])
            logits = model.match_logits(local_tokens[rows].to(device), tokens.input_ids[texts].to(device),
                                        tokens.attention_mask[texts].to(device))
            scores.append(logits[:, 1].float().cpu())
        return torch.cat(scores) if scores else torch.zeros(0)

    def after_evaluation(self, val_result, split_name, epoch, **kwargs):
        logging.info("%s retrieval: %s", split_name, val_result)
        write_metrics(split_name, val_result)
        return val_result
