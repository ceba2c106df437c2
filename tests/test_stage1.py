import pytest
import torch

import lavis_point  # noqa: F401
from lavis_point.models.losses import contrastive_loss, contrastive_similarities, sample_hard_negatives
from tests.small_models import small_stage1

TEXTS = ["a small red cube", "a large blue sphere", "a green cone", "a white torus"]


def batch(n=4):
    """Clouds the encoder can tell apart: random xyz, one solid colour each."""
    points = torch.rand(n, 128, 6) * 2 - 1
    colours = torch.tensor([[1.0, -1, -1], [-1, -1, 1], [-1, 1, -1], [1, 1, 1]])[:n]
    points[..., 3:] = colours[:, None, :]
    return {"point": points, "text_input": TEXTS[:n]}


def test_forward_gives_three_finite_losses_that_sum_to_the_loss():
    out = small_stage1()(batch())
    for key in ("loss_itc", "loss_itm", "loss_itg"):
        assert torch.isfinite(out[key])
    assert torch.allclose(out["loss"], out["loss_itc"] + out["loss_itm"] + out["loss_itg"])


def test_every_trainable_part_gets_a_gradient():
    model = small_stage1()
    model(batch())["loss"].backward()
    for name in ("point_encoder.reduce_dim.weight", "pc_projection", "query_tokens", "point_proj.weight",
                 "text_proj.weight", "itm_head.weight", "temp", "Qformer.cls.predictions.transform.dense.weight",
                 "Qformer.bert.encoder.layer.0.crossattention.self.key.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_global_term_adds_a_contrastive_loss_over_the_max_pooled_encoder_tokens():
    model = small_stage1(global_itc_weight=0.5)
    out = model(batch())
    assert torch.allclose(out["loss"], out["loss_itc"] + out["loss_itm"] + out["loss_itg"]
                          + 0.5 * out["loss_global_itc"])
    # Its own gradient reaches the encoder directly, not only through the Q-Former's cross-attention.
    out["loss_global_itc"].backward()
    assert model.global_proj.weight.grad.abs().sum() > 0
    assert model.point_encoder.reduce_dim.weight.grad.abs().sum() > 0
    assert model.Qformer.bert.encoder.layer[0].crossattention.self.key.weight.grad is None


def test_without_the_global_term_the_model_has_no_global_head():
    model = small_stage1()
    assert "loss_global_itc" not in model(batch()) and not hasattr(model, "global_proj")


def test_frozen_encoder_gets_no_gradient_and_keeps_batchnorm_statistics():
    model = small_stage1(freeze_encoder=True).train()
    before = model.point_encoder.encoder.first_conv[1].running_mean.clone()
    model(batch())["loss"].backward()
    assert all(p.grad is None for p in model.point_encoder.parameters())
    assert torch.equal(before, model.point_encoder.encoder.first_conv[1].running_mean)


def test_contrastive_loss_is_low_for_aligned_features():
    feats = torch.nn.functional.normalize(torch.randn(6, 16), dim=-1)
    aligned = contrastive_loss(*contrastive_similarities(feats[:, None].repeat(1, 3, 1), feats, 0.05))
    shuffled = contrastive_loss(*contrastive_similarities(feats[:, None].repeat(1, 3, 1), feats.flip(0), 0.05))
    assert aligned < shuffled


def test_hard_negatives_are_never_positives():
    sim = torch.randn(5, 5) * 10
    same = torch.eye(5, dtype=torch.bool)
    same[0, 1] = same[1, 0] = True  # two identical captions
    for _ in range(50):
        picks = sample_hard_negatives(sim, same)
        assert not same[torch.arange(5), picks].any()


def test_a_row_with_only_positives_falls_back_to_another_column():
    same = torch.ones(3, 3, dtype=torch.bool)
    picks = sample_hard_negatives(torch.zeros(3, 3), same)
    assert (picks != torch.arange(3)).all()


def test_hard_negatives_are_never_positives_even_when_a_positive_dwarfs_them():
    """At a low temperature a positive's logit can exceed the negatives' by more than float32's
    exp range: masked after the softmax, every negative was 0 and the fallback drew positives."""
    sim = torch.tensor([[1e4, 1e4, 0.0], [1e4, 1e4, 0.0], [0.0, 1e4, 1e4]])
    same = torch.tensor([[True, True, False], [True, True, False], [False, False, True]])
    for _ in range(50):
        picks = sample_hard_negatives(sim, same)
        assert picks.tolist()[:2] == [2, 2] and picks[2] == 1


def test_training_on_one_batch_lowers_every_loss():
    model = small_stage1()
    data = batch()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = model(data)
    for _ in range(60):  # ITC leaves ln(4) only after ~40 steps (at 30 it moved by rounding alone)
        opt.zero_grad()
        model(data)["loss"].backward()
        opt.step()
    last = model(data)
    assert last["loss_itc"] < first["loss_itc"] and last["loss_itg"] < first["loss_itg"]


def test_similarity_api_ranks_the_matching_text_first_after_training():
    model = small_stage1(itg_delay_steps=1000)  # contrastive + matching only (see itg_delay_steps)
    data = batch()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(80):
        opt.zero_grad()
        model(data)["loss"].backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        _, _, point_feats = model.encode_points(data["point"])
        sim = model.point_text_similarity(point_feats, model.encode_text(data["text_input"]))
    assert sim.shape == (4, 4)
    assert (sim.argmax(dim=1) == torch.arange(4)).all()


def test_mean_text_pooling_tells_captions_apart_where_minilm_cls_cannot():
    """The shipped MiniLM was trained with mean pooling: its [CLS] output is one vector for every
    caption, so the embedded default pools the mean (``text_pooling: mean``)."""
    qformer = dict(hidden_size=384, num_layers=4, num_heads=12, intermediate_size=1536, encoder_width=32)
    texts = ["a small red cube", "a small red sphere", "a small blue cube"]
    cos = {}
    for pooling in ("cls", "mean"):
        model = small_stage1(qformer_cfg=qformer, qformer_init="minilm", text_pooling=pooling, embed_dim=384).eval()
        with torch.no_grad():  # an identity projection: compare what is pooled
            model.text_proj.weight.copy_(torch.eye(384))
            model.text_proj.bias.zero_()
            feats = model.encode_text(texts)
        cos[pooling] = (feats @ feats.T)[0, 1:]
    assert (cos["cls"] > 0.999).all()
    assert (cos["mean"] < 0.97).all()


def test_unknown_text_pooling_is_refused():
    with pytest.raises(ValueError, match="text_pooling"):
        small_stage1(text_pooling="max")


def test_projecting_the_point_tokens_once_gives_the_losses_and_gradients_of_one_projection_per_pass(
        monkeypatch):
    """The three passes share the cross-attention keys and values (Qformer.project_points); with it
    replaced by the identity, every pass projects the point tokens itself, as before the sharing."""
    model = small_stage1(global_itc_weight=0.5)

    def run():
        torch.manual_seed(0)  # the same hard negatives both times
        model.zero_grad()
        out = model(batch())
        out["loss"].backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    shared, shared_grads = run()
    monkeypatch.setattr(model.Qformer, "project_points", lambda points: points)
    separate, separate_grads = run()
    for key in ("loss", "loss_itc", "loss_itm", "loss_itg"):
        assert torch.allclose(shared[key], separate[key], atol=1e-6), key
    assert shared_grads.keys() == separate_grads.keys()
    for name, grad in shared_grads.items():
        assert torch.allclose(grad, separate_grads[name], atol=1e-6, rtol=1e-4), name


def test_positives_of_each_item_alone_give_the_plain_contrastive_loss():
    feats = torch.nn.functional.normalize(torch.randn(5, 16), dim=-1)
    sims = contrastive_similarities(feats[:, None].repeat(1, 2, 1), feats.flip(0), 0.1)
    assert contrastive_loss(*sims, positives=torch.eye(5, dtype=torch.bool)) == pytest.approx(
        contrastive_loss(*sims).item(), rel=1e-6)


def test_alike_items_share_the_contrastive_target():
    """Items 0 and 1 alike: each row's target is split between them, so their cross similarity is
    pulled up (negative gradient), where the plain loss pushes it down."""
    feats = torch.nn.functional.normalize(torch.randn(4, 16), dim=-1)
    positives = torch.eye(4, dtype=torch.bool)
    positives[0, 1] = positives[1, 0] = True
    grads = []
    for pos in (None, positives):
        sim = (feats @ feats.T).requires_grad_()  # temperature 1: every pair keeps some probability
        contrastive_loss(sim, sim.T, positives=pos).backward()
        grads.append(sim.grad[0, 1].item())
    assert grads[0] > 0 > grads[1]


def test_match_ids_make_alike_items_positives_and_never_matching_negatives(monkeypatch):
    from lavis_point.models import point_qformer
    drawn, targets = [], []

    def record_negatives(sim, same):
        drawn.append(same.clone())
        return sample_hard_negatives(sim, same)

    def record_loss(sim_p2t, sim_t2p, positives=None):
        targets.append(positives)
        return contrastive_loss(sim_p2t, sim_t2p, positives=positives)

    monkeypatch.setattr(point_qformer, "sample_hard_negatives", record_negatives)
    monkeypatch.setattr(point_qformer, "contrastive_loss", record_loss)
    model = small_stage1(global_itc_weight=1.0)
    data = batch()
    model(data)
    model({**data, "match_id": torch.tensor([7, 7, 3, 5])})
    expected = torch.eye(4, dtype=torch.bool)
    expected[0, 1] = expected[1, 0] = True
    own = torch.eye(4, dtype=torch.bool)  # no ids: each item its own pair (ITC, global term)
    assert torch.equal(targets[0], own) and torch.equal(targets[1], own)
    assert torch.equal(targets[2], expected) and torch.equal(targets[3], expected)
    # ITM never draws an alike item as a negative (both ways), nor, as before, an identical caption
    assert torch.equal(drawn[0], torch.eye(4, dtype=torch.bool))
    assert torch.equal(drawn[2], expected) and torch.equal(drawn[3], expected)


def test_a_batch_of_one_is_refused_with_the_batch_size_to_raise():
    with pytest.raises(ValueError, match="batch_size_train"):
        sample_hard_negatives(torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="batch_size_train"):
        small_stage1().train()({"point": torch.rand(1, 64, 6) * 2 - 1, "text_input": ["a red cube"]})


def test_generation_loss_scores_only_positions_with_a_target_and_equals_the_loss_over_every_position():
    """The LM head (a vocabulary-wide matmul) runs only where a token follows (padding has no target),
    and the loss is the one over every position with padding ignored, as BLIP-2 computes it."""
    model = small_stage1()
    samples = batch()
    samples["text_input"] = ["a cube", "a large blue sphere with a long caption here", "a cone", "a torus"]
    captured, head_rows = {}, []
    model.Qformer.register_forward_hook(
        lambda module, args, kwargs, out: captured.update(hidden=out) if kwargs.get("causal") else None,
        with_kwargs=True)
    model.Qformer.cls.predictions.register_forward_hook(
        lambda module, args, out: head_rows.append(args[0].reshape(-1, args[0].shape[-1]).shape[0]))
    loss_itg = model(samples)["loss_itg"]

    tokens = model.tokenize(samples["text_input"])
    targets = tokens.input_ids.masked_fill(tokens.attention_mask == 0, -100)[:, 1:]
    assert head_rows == [int((targets != -100).sum())] and head_rows[0] < targets.numel()
    every = model.Qformer.lm_logits(captured["hidden"][:, model.query_tokens.shape[1]:-1])
    expected = torch.nn.functional.cross_entropy(every.reshape(-1, every.shape[-1]), targets.reshape(-1),
                                                 ignore_index=-100, label_smoothing=0.1)
    assert torch.allclose(loss_itg, expected, atol=1e-6)


def test_captions_not_one_per_cloud_are_refused_with_both_counts():
    samples = batch()
    for texts in ("a small red cube", TEXTS[:3]):  # a string is one caption, not a list of its characters
        with pytest.raises(ValueError, match="4 point clouds but 1 text_input|4 point clouds but 3 text_input"):
            small_stage1()({**samples, "text_input": texts})


def test_similarity_is_computed_in_chunks_of_clouds_with_the_same_result(monkeypatch):
    """The (P, Q, T) products before the max over queries took P * Q * T * 4 bytes at once: 16 GB for
    5000 clouds x 25000 captions. Chunks of clouds give each row exactly as before."""
    from lavis_point.models import point_qformer

    points, texts = torch.randn(37, 4, 8), torch.randn(11, 8)
    whole = torch.einsum("pqd,td->pqt", points, texts).max(dim=1).values
    sizes = []
    monkeypatch.setattr(point_qformer, "SIMILARITY_CHUNK_VALUES", 4 * 11 * 5)  # 5 clouds at a time
    monkeypatch.setattr(torch, "einsum", lambda eq, a, b, einsum=torch.einsum: sizes.append(len(a)) or einsum(eq, a, b))
    assert torch.equal(point_qformer.PointQFormer.point_text_similarity(points, texts), whole)
    assert max(sizes) == 5 and sum(sizes) == 37
