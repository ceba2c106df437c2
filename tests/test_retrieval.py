"""Point-text retrieval: recall@K and its chance level, positives by instance or by attributes,
matching-head re-ranking of the top k_test, and the task through evaluate.py in one process and
under torchrun (every cloud and caption counted once)."""
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import lavis_point  # noqa: F401
from lavis_point.tasks import retrieval
from lavis_point.models.point_qformer import PointQFormer
from lavis_point.tasks.ranking_metrics import chance_recall_at_k, recall_at_k
from lavis_point.tasks.retrieval import PointRetrievalTask, collective_device, retrieval_pairs
from tests.understanding_runs import SIZES, evaluate


def test_recall_counts_a_query_right_when_a_positive_is_in_the_top_k():
    scores = np.array([[0.9, 0.1, 0.0], [0.8, 0.5, 0.1], [0.7, 0.6, 0.1]])
    assert recall_at_k(scores, [[0], [1], [2]], ks=(1, 2, 3)) == {1: 1 / 3, 2: 2 / 3, 3: 1.0}


def test_ties_count_against_the_query():
    """A model that scores everything alike must not look perfect."""
    assert recall_at_k(np.zeros((4, 4)), [[i] for i in range(4)], ks=(1, 4)) == {1: 0.0, 4: 1.0}


def test_nan_scores_rank_last():
    """A diverged model (NaN everywhere) misses every query; a NaN candidate never beats a real score."""
    assert recall_at_k(np.full((4, 4), np.nan), [[i] for i in range(4)], ks=(1, 4)) == {1: 0.0, 4: 1.0}
    scores = np.array([[np.nan, 0.2, 0.1], [0.1, np.nan, 0.5], [0.3, 0.1, 0.2]])
    assert recall_at_k(scores, [[0], [2], [0]], ks=(1, 2)) == {1: 2 / 3, 2: 2 / 3}  # query 0's positive is NaN


def test_chance_level_of_one_positive_among_n_is_k_over_n():
    chance = chance_recall_at_k(20, [[3]] * 5, ks=(1, 5, 10))
    assert chance == pytest.approx({1: 0.05, 5: 0.25, 10: 0.5})
    assert chance_recall_at_k(20, [[1, 2]], ks=(1,))[1] == pytest.approx(0.1)


class CaptionSet:
    def __init__(self, references, attributes=None):
        self.references, self.attributes = references, attributes


def test_positives_are_own_captions_or_all_captions_of_clouds_with_the_same_attributes():
    data = CaptionSet({"a": ["red cube", "a red cube"], "b": ["blue cone"], "c": ["the red cube"]},
                      {"a": {"color": "red"}, "b": {"color": "blue"}, "c": {"color": "red"}})
    ids, texts, p2t, t2p = retrieval_pairs(data)
    assert ids == ["a", "b", "c"] and len(texts) == 4
    assert p2t == [[0, 1], [2], [3]] and t2p == [[0], [0], [1], [2]]
    _, _, p2t, t2p = retrieval_pairs(data, match_by=["color"])
    assert p2t == [[0, 1, 3], [2], [0, 1, 3]] and t2p[3] == [0, 2]
    with pytest.raises(ValueError, match="attributes"):
        retrieval_pairs(CaptionSet({"a": ["x"]}), match_by=["color"])


class FakeStage1(nn.Module):
    """Clouds and captions are indices; ``sim[p, t]`` is the contrastive similarity and
    ``itm[p, t]`` the matching head's logit of "matches"."""

    def __init__(self, sim, itm):
        super().__init__()
        self.sim, self.itm = torch.tensor(sim, dtype=torch.float32), torch.tensor(itm, dtype=torch.float32)
        self.unused = nn.Parameter(torch.zeros(1))  # the task reads the device from the parameters

    def tokenize(self, texts):
        ids = torch.tensor([[int(t)] for t in texts])
        return SimpleNamespace(input_ids=ids, attention_mask=torch.ones_like(ids))

    def encode_points(self, points):
        index = points[:, 0, 0].long()  # (B,)
        feats = torch.nn.functional.one_hot(index, self.sim.shape[0]).float()[:, None]  # (B, 1, P)
        return None, index[:, None, None].float(), feats

    def encode_text(self, tokens):
        return self.sim[:, tokens.input_ids[:, 0]].t()  # (T, P): feature t . one-hot(p) = sim[p, t]

    point_text_similarity = staticmethod(PointQFormer.point_text_similarity)

    def match_logits(self, point_tokens, input_ids, attention_mask):
        match = self.itm[point_tokens[:, 0, 0].long(), input_ids[:, 0]]
        return torch.stack([-match, match], dim=1)


def run_task(sim, itm, k_test):
    n = len(sim)
    data = CaptionSet({f"cloud{i}": [str(i)] for i in range(n)})
    loader = [{"point": torch.arange(n, dtype=torch.float32)[:, None, None].expand(n, 4, 6),
               "instance_id": [f"cloud{i}" for i in range(n)]}]
    task = PointRetrievalTask(k_test=k_test)
    task.before_evaluation(None, data)
    return task.evaluation(FakeStage1(sim, itm), loader)


def test_matching_head_reranks_the_top_k_and_cannot_promote_what_lies_outside():
    # Contrastive similarity ranks each cloud's caption second; the matching head knows better.
    sim = [[0.5, 0.9, 0.1], [0.1, 0.5, 0.9], [0.9, 0.1, 0.5]]
    itm = np.eye(3) * 10.0
    contrastive = run_task(sim, np.zeros((3, 3)), k_test=2)
    assert contrastive["point_to_text_r1"] == 0.0 and contrastive["point_to_text_r1_itc"] == 0.0
    reranked = run_task(sim, itm, k_test=2)
    assert reranked["point_to_text_r1"] == 1.0 and reranked["text_to_point_r1"] == 1.0
    assert reranked["point_to_text_r1_itc"] == 0.0  # the contrastive-only recall is reported beside it
    outside = run_task(sim, itm, k_test=1)  # the right caption is not in the top 1: not re-scored
    assert outside["point_to_text_r1"] == 0.0
    assert reranked["point_to_text_r1_chance"] == pytest.approx(1 / 3)


def test_a_diverged_model_scores_no_hit_and_the_task_says_how_many_scores_are_not_finite(caplog):
    nan = np.full((3, 3), np.nan)
    with caplog.at_level(logging.WARNING):
        metrics = run_task(nan, nan, k_test=3)
    assert all(metrics[f"{d}_r{k}{kind}"] == 0.0 for d in ("point_to_text", "text_to_point") for k in (1,)
               for kind in ("", "_itc"))
    assert "9 of 9 contrastive similarities and 9 of 9 re-ranked scores are not finite" in caplog.text


def test_a_k_test_below_the_largest_k_is_named_in_a_warning(caplog):
    sim = [[0.5, 0.9, 0.1], [0.1, 0.5, 0.9], [0.9, 0.1, 0.5]]
    with caplog.at_level(logging.WARNING):
        run_task(sim, np.zeros((3, 3)), k_test=10)
    assert "run.k_test" not in caplog.text
    with caplog.at_level(logging.WARNING):
        run_task(sim, np.zeros((3, 3)), k_test=2)
    assert "run.k_test=2 is below the largest K (10)" in caplog.text


def test_unreadable_clouds_are_dropped_with_their_captions_and_counted():
    """cloud1 and cloud3 cannot be read (cloud3 alone in its batch): retrieval runs over cloud0 and
    cloud2 and their captions, and says how many it skipped; a cloud nobody evaluated is still an error."""
    sim = np.eye(4) + 0.1
    data = CaptionSet({f"cloud{i}": [str(i)] for i in range(4)})

    def loader(cloud3_reported=True):
        return [{"point": torch.tensor([0.0, 2.0])[:, None, None].expand(2, 4, 6),
                 "instance_id": ["cloud0", "cloud2"], "skipped": ["item 1 (id 'cloud1', c1.npy): NaN"]},
                {"skipped": ["item 3 (id 'cloud3', c3.pkl): truncated"] if cloud3_reported else []}]

    task = PointRetrievalTask(k_test=2)
    task.before_evaluation(None, data)
    metrics = task.evaluation(FakeStage1(sim, np.zeros((4, 4))), loader())
    assert (metrics["num_points"], metrics["num_texts"], metrics["num_skipped"]) == (2, 2, 2)
    assert metrics["point_to_text_r1"] == metrics["text_to_point_r1"] == 1.0
    assert metrics["point_to_text_r1_chance"] == pytest.approx(1 / 2)  # among the 2 left, not 4
    # cloud3 neither read nor reported: a bug, not a bad file
    with pytest.raises(RuntimeError, match="2 clouds of the split were not evaluated by any rank, 1 of them"):
        task.evaluation(FakeStage1(sim, np.zeros((4, 4))), loader(cloud3_reported=False))


def test_collectives_run_on_this_rank_gpu_under_nccl_and_on_cpu_under_gloo(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)  # what init_distributed set
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    assert collective_device() == torch.device("cuda", 1)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert collective_device() == torch.device("cpu")


def test_rerank_scores_are_all_reduced_on_the_collective_device(monkeypatch):
    """nccl takes CUDA tensors only: the re-ranked scores, built on the CPU, must be moved first.
    No GPU here, so the collective device is faked as "meta" and the all-reduce stops the run."""
    class Reduced(Exception):
        pass

    def all_reduce(tensor, *args, **kwargs):
        raise Reduced(tensor.device)

    monkeypatch.setattr(retrieval, "is_dist_avail_and_initialized", lambda: True)
    monkeypatch.setattr(retrieval, "collective_device", lambda: torch.device("meta"))
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    with pytest.raises(Reduced) as reduced:
        run_task([[0.5, 0.9], [0.9, 0.5]], np.eye(2), k_test=2)
    assert reduced.value.args[0] == torch.device("meta")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("retrieval"))
    cfg, builder = "projects/embedded/retrieval_eval.yaml", "shapes_point_caption"
    one = evaluate(cfg, out, "one", builder, "model.finetuned=null", "run.k_test=4")
    two = evaluate(cfg, out, "two", builder, "model.finetuned=null", "run.k_test=4", nproc=2)
    return one, two


def test_retrieval_through_evaluate_counts_every_cloud_and_caption_once(runs):
    for metrics in runs:
        assert metrics["num_points"] == SIZES["test"] and metrics["num_texts"] == 5 * SIZES["test"]
        for direction in ("point_to_text", "text_to_point"):
            for k in (1, 5, 10):
                assert 0.0 <= metrics[f"{direction}_r{k}"] <= 1.0
                assert 0.0 < metrics[f"{direction}_r{k}_chance"] < 1.0


def test_torchrun_gives_the_single_process_result(runs):
    one, two = runs
    assert two["point_to_text_r1_chance"] == pytest.approx(one["point_to_text_r1_chance"])
    for key in ("point_to_text_r1", "point_to_text_r5", "text_to_point_r1", "text_to_point_r5"):
        assert two[key] == pytest.approx(one[key], abs=0.07), key  # one near-tie may flip between batchings
