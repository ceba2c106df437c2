import pytest
import torch
import torch.nn.functional as F

import lavis_point  # noqa: F401
from lavis_point.models.checkpoint import trainable_state_dict
from tests.small_models import small_stage2

CAPTIONS = ["a small red cube", "a large blue sphere"]


def clouds():
    g = torch.Generator().manual_seed(1)
    return torch.rand(2, 128, 6, generator=g) * 2 - 1


def trained(steps=60):
    model = small_stage2()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = {"point": clouds(), "text_input": CAPTIONS}
    for _ in range(steps):
        opt.zero_grad()
        model(data)["loss"].backward()
        opt.step()
    return model.eval()


def test_loss_counts_caption_tokens_only():
    model = small_stage2().eval()
    pts = clouds()[:1]
    loss = model({"point": pts, "text_input": [CAPTIONS[0]]})["loss"]
    tok = model.opt_tokenizer
    prompt_ids = tok(model.prompt.rstrip()).input_ids  # BOS + prompt; its trailing space joins " a"
    caption_ids = tok(" " + CAPTIONS[0] + "\n", add_special_tokens=False).input_ids
    ids = torch.tensor([prompt_ids + caption_ids])
    with torch.no_grad():
        prefix = model.prefix_embeds(pts)
        embeds = torch.cat([prefix, model.opt_model.get_input_embeddings()(ids)], dim=1)
        logits = model.opt_model(inputs_embeds=embeds).logits[0]
    start = prefix.shape[1] + len(prompt_ids)  # first caption token's position
    predicted = logits[start - 1: start - 1 + len(caption_ids)]
    expected = F.cross_entropy(predicted, torch.tensor(caption_ids))
    assert torch.allclose(loss, expected, atol=1e-5)


def test_greedy_generation_equals_step_by_step_argmax_without_cache():
    model = trained(20)
    pts = clouds()
    got = model.generate({"point": pts}, num_beams=1, max_length=6, min_length=1)
    tok = model.opt_tokenizer
    for i in range(2):
        ids = tok(model.prompt.rstrip()).input_ids
        n_prompt = len(ids)
        with torch.no_grad():
            prefix = model.prefix_embeds(pts[i: i + 1])
            for _ in range(6):
                embeds = torch.cat([prefix, model.opt_model.get_input_embeddings()(torch.tensor([ids]))], dim=1)
                nxt = int(model.opt_model(inputs_embeds=embeds).logits[0, -1].argmax())
                ids.append(nxt)
                if nxt == model.end_token_id:
                    break
        assert got[i] == tok.decode(ids[n_prompt:], skip_special_tokens=True).strip()


def test_cached_and_uncached_beam_search_agree():
    model = trained(20)
    kw = dict(num_beams=3, max_length=8, min_length=2, num_captions=2)
    cached = model.generate({"point": clouds()}, use_cache=True, **kw)
    uncached = model.generate({"point": clouds()}, use_cache=False, **kw)
    assert cached == uncached and len(cached) == 4


def test_trained_model_captions_each_cloud_with_its_own_caption_by_beam_search():
    model = trained()
    captions = model.generate({"point": clouds()}, num_beams=3, max_length=10, num_captions=2)
    assert captions[0] == CAPTIONS[0] and captions[2] == CAPTIONS[1]
    assert len(captions) == 4


def test_nucleus_sampling_returns_several_captions_per_cloud():
    model = small_stage2().eval()
    torch.manual_seed(3)
    out = model.generate({"point": clouds()}, use_nucleus_sampling=True, top_p=0.95, num_captions=3,
                         max_length=6)
    assert len(out) == 6 and all(isinstance(c, str) for c in out)
    assert len(set(out)) > 1  # an untrained model's samples differ


def test_trained_model_sampling_at_low_temperature_gives_the_caption():
    model = trained()
    out = model.generate({"point": clouds()}, use_nucleus_sampling=True, top_p=0.5, num_captions=3,
                         max_length=10)
    assert out[:3] == [CAPTIONS[0]] * 3 and out[3:] == [CAPTIONS[1]] * 3


def test_frozen_opt_gets_no_gradient_and_is_left_out_of_checkpoints():
    model = small_stage2(freeze_opt=True).train()
    assert not model.opt_model.training
    model({"point": clouds(), "text_input": CAPTIONS})["loss"].backward()
    assert all(p.grad is None for p in model.opt_model.parameters())
    assert model.opt_proj.weight.grad is not None
    saved = trainable_state_dict(model)
    assert not any(k.startswith("opt_model.") for k in saved) and "opt_proj.weight" in saved


def test_prompts_per_cloud_are_supported():
    model = small_stage2().eval()
    out = model.generate({"point": clouds(), "prompt": ["Question: what colour is it? Answer:", "a"]},
                         num_beams=2, max_length=4)
    assert len(out) == 2


def test_a_prompt_ending_in_a_space_leaves_the_first_caption_word_in_the_loss():
    """'... cloud of ' + 'a small red cube': byte-level BPE makes ' a' one token; the prompt's
    length must not count the space as a token of its own, or 'a' is never learned."""
    model = small_stage2()
    full = model.opt_tokenizer(model.prompt + CAPTIONS[0]).input_ids
    n = model.prompt_length(model.prompt)
    assert model.opt_tokenizer.decode(full[n:]) == " " + CAPTIONS[0]  # the space travels with "a"


def encoder_calls(model):
    """Clouds the point encoder has encoded so far (a forward hook counts its batch sizes)."""
    count = []
    model.point_encoder.register_forward_hook(lambda module, args, out: count.append(len(args[0])))
    return count


def test_point_token_cache_encodes_each_cloud_once_and_changes_nothing():
    torch.manual_seed(0)
    cached = small_stage2(freeze_encoder=True, point_token_cache_size=10).train()
    plain = small_stage2(freeze_encoder=True).train()
    plain.load_state_dict(cached.state_dict())
    calls = encoder_calls(cached)
    pts = clouds()
    for step in range(3):
        batch = {"point": pts if step != 1 else pts.flip(0), "text_input": CAPTIONS}
        losses = [m(batch)["loss"] for m in (cached, plain)]
        assert torch.allclose(losses[0], losses[1], atol=1e-6)
        for loss in losses:
            loss.backward()
    assert sum(calls) == 2  # the two clouds once each; steps 2 and 3 are hits
    assert (cached.token_cache.hits, cached.token_cache.misses) == (4, 2)
    for (name, p), q in zip(cached.named_parameters(), plain.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, atol=1e-6), name
    # a changed cloud (augmentation, say) misses; evaluation never uses the cache
    moved = pts.clone()
    moved[0, :, 0] += 0.1
    cached({"point": moved, "text_input": CAPTIONS})
    assert sum(calls) == 3
    cached.eval()({"point": pts, "text_input": CAPTIONS})
    assert sum(calls) == 5


def test_point_token_cache_holds_at_most_its_capacity():
    model = small_stage2(freeze_encoder=True, point_token_cache_size=1).train()
    calls = encoder_calls(model)
    for _ in range(2):
        model({"point": clouds(), "text_input": CAPTIONS})
    assert len(model.token_cache.entries) == 1 and sum(calls) == 3  # the second cloud is encoded each time


def test_point_token_cache_refuses_a_trainable_encoder():
    with pytest.raises(ValueError, match="freeze_encoder"):
        small_stage2(freeze_encoder=False, point_token_cache_size=8)


def test_lavis_vqa_task_gets_generated_answers_from_predict_answers():
    from lavis.tasks.vqa import VQATask  # its valid_step passes answer_list, inference_method, ...
    model = small_stage2().eval()
    prompt = "Question: {} Answer:"
    questions = ["what colour is it?", "how big is it?"]
    task = VQATask(num_beams=2, max_len=4, min_len=1, evaluate=True, num_ans_candidates=128,
                   inference_method="generate", prompt=prompt)
    samples = {"point": clouds(), "text_input": questions, "question_id": torch.tensor([7, 8])}
    got = task.valid_step(model, samples)
    expected = model.generate({"point": clouds()}, num_beams=2, max_length=4, min_length=1,
                              prompt=[prompt.format(q) for q in questions])
    assert got == [{"question_id": 7, "answer": expected[0]}, {"question_id": 8, "answer": expected[1]}]


def test_ranking_answers_is_refused_with_the_setting_to_change():
    model = small_stage2().eval()
    with pytest.raises(ValueError, match="inference_method"):
        model.predict_answers({"point": clouds(), "text_input": ["what is it?"] * 2}, inference_method="rank",
                              answer_list=["cube", "sphere"])


def test_nucleus_sampling_samples_instead_of_beam_sampling():
    model = small_stage2().eval()
    rows = []  # batch rows of each OPT forward pass: 2 clouds x 3 captions when sampling, x num_beams more if not
    model.opt_model.register_forward_pre_hook(lambda m, a, kw: rows.append(kw["attention_mask"].shape[0]),
                                              with_kwargs=True)
    torch.manual_seed(0)
    out = model.generate({"point": clouds()}, use_nucleus_sampling=True, num_beams=5, num_captions=3, max_length=3)
    assert len(out) == 6 and set(rows) == {6}


def test_point_token_cache_forgets_tokens_of_weights_loaded_since():
    model = small_stage2(freeze_encoder=True, point_token_cache_size=10).train()
    pts = clouds()
    old = model.token_cache.tokens(pts, model.point_encoder)
    other = small_stage2(freeze_encoder=True)
    model.point_encoder.load_state_dict(other.point_encoder.state_dict())  # a checkpoint, say
    with torch.no_grad():
        fresh = model.point_encoder.eval()(pts)
    assert not torch.allclose(old, fresh)
    assert torch.equal(model.token_cache.tokens(pts, model.point_encoder), fresh)


def test_a_prompt_ending_in_a_newline_keeps_it_out_of_the_loss():
    """Only one trailing space is the next word's; a newline is a token of the prompt."""
    model = small_stage2()
    tok = model.opt_tokenizer
    for prompt in ("Question: what colour? Answer:\n", "a 3D point cloud of ", "Answer:\t"):
        n = model.prompt_length(prompt)
        ids = tok(prompt + "red").input_ids
        assert ids[:n] == tok(prompt[:-1] if prompt.endswith(" ") else prompt).input_ids
        assert tok.decode(ids[n:]).strip() == "red"


def test_beam_answers_do_not_depend_on_the_other_questions_of_the_batch(monkeypatch):
    """transformers divides a beam's score by its length, left padding included: one call per prompt
    length, so that no answer is scored with another question's padding, and answers in batch order."""
    model = trained().eval()
    questions = ["what colour is it?", "what kind of object is this point cloud, and how large is it?"]
    prompt = "Question: {} Answer: "
    alone = [model.predict_answers({"point": clouds()[i:i + 1], "text_input": [q]}, prompt=prompt)[0]
             for i, q in enumerate(questions)]
    calls, generate = [], model.opt_model.generate
    monkeypatch.setattr(model.opt_model, "generate", lambda **kw: calls.append(kw["attention_mask"]) or generate(**kw))
    assert model.predict_answers({"point": clouds(), "text_input": questions}, prompt=prompt) == alone
    assert len(calls) == 2 and all(bool(mask.all()) for mask in calls)  # no padding in any call
    model.predict_answers({"point": clouds(), "text_input": questions}, prompt=prompt, num_beams=1)
    assert len(calls) == 3  # greedy has no length term: one call


def test_a_question_or_caption_given_as_one_string_is_one_text_not_its_characters(monkeypatch):
    """As LAVIS's VQA models do, a string ``text_input`` is a list of one."""
    model = small_stage2().eval()
    pts = clouds()[:1]
    question, prompt = "what colour is it?", "Question: {} Answer: "
    asked, generate = [], model.generate
    monkeypatch.setattr(model, "generate", lambda samples, **kw: asked.append(kw["prompt"]) or generate(samples, **kw))
    for beams in (1, 2):
        got = model.predict_answers({"point": pts, "text_input": question}, prompt=prompt, num_beams=beams)
        assert len(got) == 1 and asked[-1] == [prompt.format(question)]
    one = model({"point": pts, "text_input": CAPTIONS[0]})["loss"]
    assert torch.allclose(one, model({"point": pts, "text_input": [CAPTIONS[0]]})["loss"])


def test_prompts_or_texts_not_one_per_cloud_are_refused_with_both_counts():
    model = small_stage2().eval()
    two, one = clouds(), clouds()[:1]
    with pytest.raises(ValueError, match="2 point clouds but 1 prompts"):
        model.generate({"point": two, "prompt": ["a"]}, num_beams=2, max_length=3)
    with pytest.raises(ValueError, match="2 point clouds but 1 prompts"):
        model.generate({"point": two}, prompt=["a"], num_beams=1, max_length=3)
    with pytest.raises(ValueError, match="1 point clouds but 2 prompts"):
        model.generate({"point": one, "prompt": ["a", "b"]}, num_beams=1, max_length=3)
    with pytest.raises(ValueError, match="2 point clouds but 1 prompts"):
        model({"point": two, "text_input": CAPTIONS, "prompt": ["a"]})
    with pytest.raises(ValueError, match="2 point clouds but 1 text_input"):
        model({"point": two, "text_input": CAPTIONS[:1]})
    with pytest.raises(ValueError, match="1 point clouds but 2 text_input"):
        model.predict_answers({"point": one, "text_input": ["what is it?", "how big?"]}, num_beams=1)


def test_a_prompt_that_leaves_no_room_for_the_text_within_max_txt_len_is_refused():
    """Its sample would have no token with loss (and a batch of such samples a NaN loss)."""
    model = small_stage2(max_txt_len=8)
    prompt = "Question: what colour is this small object? Answer: "
    n = model.prompt_length(prompt)
    assert n >= 8
    with pytest.raises(ValueError, match=f"{n} tokens.*max_txt_len \\(8\\)"):
        model({"point": clouds(), "text_input": ["red", "blue"], "prompt": [prompt, "a"]})
    loss = model({"point": clouds(), "text_input": CAPTIONS, "prompt": ["a", "the"]})["loss"]
    assert torch.isfinite(loss)  # a long caption is cut at max_txt_len, as in BLIP-2


def test_running_past_the_position_table_is_refused_with_the_lengths():
    model = small_stage2(max_txt_len=200).eval()  # 4 query tokens, max_position_embeddings 64
    n = model.prompt_length(model.prompt.rstrip())
    with pytest.raises(ValueError, match=f"= 4 \\+ {n} \\+ 70 tokens.*max_position_embeddings \\(64\\)"):
        model.generate({"point": clouds()}, num_beams=1, max_length=70, min_length=60)
    with pytest.raises(ValueError, match="max_position_embeddings \\(64\\)"):
        model.predict_answers({"point": clouds()[:1], "text_input": ["is it " + "very " * 60 + "red?"]},
                              prompt="Question: {} Answer: ", num_beams=2)
    with pytest.raises(ValueError, match="max_position_embeddings \\(64\\)"):
        model({"point": clouds(), "text_input": ["a " + "very " * 70 + "red cube", "a sphere"]})
    assert len(model.generate({"point": clouds()}, num_beams=1, max_length=64 - 4 - n)) == 2  # just fits


# --- a frozen OPT that no file gives weights ----------------------------------------------------


def stage2_config(**model):
    """A point_opt config of the small models, its OPT built from opt_config (no opt_model)."""
    from omegaconf import OmegaConf

    from tests.small_models import ENCODER, OPT, QFORMER

    return OmegaConf.create(dict(point_encoder=ENCODER, qformer=QFORMER, num_query_token=4, opt_config=OPT,
                                 opt_tokenizer="asset:tiny_opt_tokenizer", prompt="a 3D point cloud of ", **model))


@pytest.mark.parametrize("freeze", [{}, {"freeze_opt": True}])  # freeze_opt defaults to true
def test_a_config_freezing_a_random_opt_is_refused(tmp_path, freeze):
    """A frozen random OPT learns nothing and no runner checkpoint holds it: evaluation built another
    random OPT, and nobody was told. A run's checkpoint without the OPT does not make it any better."""
    from lavis_point.models.point_opt import PointOPT

    with pytest.raises(ValueError, match=r"model\.freeze_opt is true.*model\.opt_model is null") as caught:
        PointOPT.from_config(stage2_config(**freeze))
    assert "Set model.freeze_opt: false" in str(caught.value)
    frozen = small_stage2(freeze_opt=True)
    runner_file = str(tmp_path / "checkpoint_best.pth")  # what our runner saves of a frozen OPT: nothing
    torch.save({"model": trainable_state_dict(frozen)}, runner_file)
    lavis_file = str(tmp_path / "lavis_runner.pth")  # LAVIS's keeps the head tied to the embeddings, no layer
    torch.save({"model": {**trainable_state_dict(frozen),
                          "opt_model.lm_head.weight": frozen.opt_model.lm_head.weight}}, lavis_file)
    for path in (runner_file, lavis_file):
        with pytest.raises(ValueError, match=r"model\.freeze_opt is true.*model\.opt_model is null") as caught:
            PointOPT.from_config(stage2_config(finetuned=path, **freeze))
        assert f"{path} holds no opt_model weights" in str(caught.value)
    assert not PointOPT.from_config(stage2_config(freeze_opt=False)).frozen_parts()


def test_building_with_the_default_freeze_opt_and_no_opt_model_is_refused():
    """freeze_opt defaults to true; without opt_model that froze a random OPT. Passing freeze_opt=True
    says the caller loads the OPT's weights itself (as from_config does from its files)."""
    from lavis_point.models.point_opt import PointOPT
    from tests.small_models import ENCODER, OPT, QFORMER

    with pytest.raises(ValueError, match=r"freeze_opt is true but opt_model is null.*Set freeze_opt: false"):
        PointOPT(opt_config=OPT, opt_tokenizer="asset:tiny_opt_tokenizer", point_encoder_cfg=ENCODER,
                 qformer_cfg=QFORMER, num_query_token=4)
    assert small_stage2(freeze_opt=True).frozen_parts() == ["opt_model"]


def test_a_frozen_opt_without_opt_model_builds_when_its_checkpoint_holds_the_opt(tmp_path):
    """A file holding the whole OPT (run.save_frozen_parts, or a trained OPT) gives it its weights."""
    from lavis_point.models.point_opt import PointOPT

    source = small_stage2()
    path = str(tmp_path / "whole.pth")
    torch.save({"model": source.state_dict()}, path)
    model = PointOPT.from_config(stage2_config(finetuned=path))
    assert model.frozen_parts() == ["opt_model"]
    assert all(torch.equal(a, b) for a, b in zip(model.opt_model.state_dict().values(),
                                                 source.opt_model.state_dict().values()))
