import pytest
import torch
from transformers import BertModel

import lavis_point  # noqa: F401
from lavis_point.models.point_base import bert_tokenizer, resolve_bert_path
from lavis_point.models.qformer import QFormer, init_qformer_from_bert
from tests.layouts import qformer_layout, shapes_of

SMALL = dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, encoder_width=24, vocab_size=50,
             max_position_embeddings=16, dropout=0.0)


def test_bert_base_qformer_reproduces_the_lavis_blip2_layout():
    assert shapes_of(QFormer().state_dict()) == qformer_layout()


def test_query_only_qformer_is_gpt4point_stage2_layout():
    assert shapes_of(QFormer(query_only=True).state_dict()) == qformer_layout(query_only=True)


def test_text_pass_equals_the_bert_it_was_initialised_from():
    """MiniLM (shipped offline) -> our Q-Former: a text-only pass reproduces BertModel exactly
    (token type 0 folded into the positions, cross-attention unused by text)."""
    path = resolve_bert_path("minilm")
    tok = bert_tokenizer()
    q = QFormer(hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536, encoder_width=384,
                vocab_size=len(tok)).eval()
    assert init_qformer_from_bert(q, path) > 0
    bert = BertModel.from_pretrained(path, add_pooling_layer=False).eval()
    t = tok(["a small red cube", "there is a large blue sphere coloured green"], padding=True, return_tensors="pt")
    ours = q(input_ids=t.input_ids, attention_mask=t.attention_mask)
    theirs = bert(input_ids=t.input_ids, attention_mask=t.attention_mask).last_hidden_state
    keep = t.attention_mask.bool()
    assert torch.allclose(ours[keep], theirs[keep], atol=1e-4)


def test_causal_mode_queries_ignore_text_and_text_ignores_later_text():
    q = QFormer(**SMALL).eval()
    queries, points = torch.randn(1, 3, 32), torch.randn(1, 5, 24)
    ids = torch.tensor([[1, 7, 8, 9]])
    other = torch.tensor([[1, 7, 20, 21]])
    a = q(query_embeds=queries, input_ids=ids, points=points, causal=True)
    b = q(query_embeds=queries, input_ids=other, points=points, causal=True)
    assert torch.allclose(a[:, :3], b[:, :3], atol=1e-6)  # queries: unchanged
    assert torch.allclose(a[:, 3:5], b[:, 3:5], atol=1e-6)  # text before the change: unchanged
    assert not torch.allclose(a[:, 5:], b[:, 5:])
    queries_alone = q(query_embeds=queries, points=points)
    assert torch.allclose(a[:, :3], queries_alone, atol=1e-5)  # = the contrastive pass' queries


def test_bidirectional_mode_lets_queries_see_text():
    q = QFormer(**SMALL).eval()
    queries, points = torch.randn(1, 3, 32), torch.randn(1, 5, 24)
    a = q(query_embeds=queries, input_ids=torch.tensor([[1, 7, 8]]), points=points)
    b = q(query_embeds=queries, input_ids=torch.tensor([[1, 7, 30]]), points=points)
    assert not torch.allclose(a[:, :3], b[:, :3])


def test_points_reach_queries_only():
    q = QFormer(**SMALL).eval()
    queries, ids = torch.randn(1, 3, 32), torch.tensor([[1, 7, 8]])
    text_a = q(input_ids=ids, points=torch.randn(1, 5, 24))
    text_b = q(input_ids=ids, points=torch.randn(1, 5, 24))
    assert torch.allclose(text_a, text_b)
    qa = q(query_embeds=queries, points=torch.randn(1, 5, 24))
    qb = q(query_embeds=queries, points=torch.randn(1, 5, 24))
    assert not torch.allclose(qa, qb)


def test_padding_does_not_change_real_tokens():
    q = QFormer(**SMALL).eval()
    short = q(input_ids=torch.tensor([[1, 7, 8]]), attention_mask=torch.tensor([[1, 1, 1]]))
    padded = q(input_ids=torch.tensor([[1, 7, 8, 0, 0]]), attention_mask=torch.tensor([[1, 1, 1, 0, 0]]))
    assert torch.allclose(short, padded[:, :3], atol=1e-6)


def test_lm_decoder_is_the_word_embeddings_as_in_blip2_even_after_growing_the_vocabulary():
    q = QFormer(**SMALL)
    assert q.cls.predictions.decoder.weight is q.bert.embeddings.word_embeddings.weight
    q.resize_token_embeddings(SMALL["vocab_size"] + 1)
    assert q.cls.predictions.decoder.weight is q.bert.embeddings.word_embeddings.weight
    assert q.cls.predictions.decoder.weight.shape[0] == SMALL["vocab_size"] + 1
    assert len(list(q.parameters())) < len(list(q.named_parameters(remove_duplicate=False)))  # counted once


def test_growing_the_vocabulary_keeps_an_untied_decoders_trained_rows():
    q = QFormer(**{**SMALL, "tie_word_embeddings": False})
    with torch.no_grad():
        q.cls.predictions.decoder.weight.add_(1.0)  # trained apart from the embeddings
    decoder, embeddings = q.cls.predictions.decoder.weight.clone(), q.bert.embeddings.word_embeddings.weight.clone()
    q.resize_token_embeddings(SMALL["vocab_size"] + 1)
    n = SMALL["vocab_size"]
    assert torch.equal(q.cls.predictions.decoder.weight[:n], decoder)
    assert torch.allclose(q.cls.predictions.decoder.weight[n], decoder.mean(0))
    assert torch.equal(q.bert.embeddings.word_embeddings.weight[:n], embeddings)
    assert q.cls.predictions.decoder.weight is not q.bert.embeddings.word_embeddings.weight


def test_a_checkpoint_whose_tied_tensors_differ_is_refused_naming_the_file():
    from lavis_point.models.checkpoint import CheckpointError, load_state_dict_checked
    q = QFormer(**SMALL)
    state = {k: v.clone() for k, v in q.state_dict().items()}
    state["cls.predictions.decoder.weight"] += 1  # trained with an untied head: one of the two would be lost
    with pytest.raises(CheckpointError, match="(?s)untied.pth.*tied keys with different values"):
        load_state_dict_checked(q, state, source="untied.pth")
    state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"]
    load_state_dict_checked(q, state, source="tied.pth")


def test_lm_head_bias_is_tied_to_decoder_bias():
    q = QFormer(**SMALL)
    assert q.cls.predictions.bias is q.cls.predictions.decoder.bias


def _legacy_bert_folder(tmp_path, layers=2):
    """A small BertForMaskedLM saved as bert-base-uncased's own file is: LayerNorm parameters named
    gamma and beta (a TensorFlow conversion), the masked-LM head beside the encoder. Every tensor is
    random, LayerNorms included, so a tensor left at its initial value shows."""
    from transformers import BertConfig, BertForMaskedLM
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=16, layer_norm_eps=1e-12)
    model = BertForMaskedLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(0.3, 0.7)
    state = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
             for k, v in model.state_dict().items()}
    assert any(k.endswith("LayerNorm.gamma") for k in state)
    cfg.save_pretrained(tmp_path)
    torch.save(state, tmp_path / "pytorch_model.bin")
    return model


def test_a_bert_with_gamma_beta_names_and_an_mlm_head_loads_whole(tmp_path):
    """bert-base-uncased's own file: every LayerNorm (gamma/beta) and the masked-LM head's transform
    and bias reach the Q-Former (they once stayed at 1 and 0, and random, without an error)."""
    bert = _legacy_bert_folder(tmp_path)
    q = QFormer(**{**SMALL, "vocab_size": 51})
    init_qformer_from_bert(q, str(tmp_path))
    src, own = bert.state_dict(), q.state_dict()
    layer_norms = [k for k in own if "LayerNorm" in k and ".crossattention." not in k and k.startswith("bert.")]
    assert layer_norms
    for k in layer_norms:
        source = k[len("bert."):].replace("_query.", ".")
        assert torch.equal(own[k], src["bert." + source]), k
    for k in ("transform.dense.weight", "transform.dense.bias", "transform.LayerNorm.weight"):
        assert torch.equal(own["cls.predictions." + k], src["cls.predictions." + k]), k
    assert torch.equal(own["cls.predictions.bias"][:50], src["cls.predictions.bias"])
    assert torch.equal(q.cls.predictions.decoder.weight, own["bert.embeddings.word_embeddings.weight"])
    ours = q.eval()(input_ids=torch.tensor([[1, 7, 8, 9]]))
    theirs = bert.bert(input_ids=torch.tensor([[1, 7, 8, 9]])).last_hidden_state
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_a_bert_lacking_layers_is_refused_naming_the_file(tmp_path):
    _legacy_bert_folder(tmp_path, layers=1)
    with pytest.raises(ValueError, match="not a BERT checkpoint this Q-Former can start from") as caught:
        init_qformer_from_bert(QFormer(**{**SMALL, "vocab_size": 51}), str(tmp_path))
    assert str(tmp_path) in str(caught.value) and "layer.1." in str(caught.value)


def test_an_untied_lm_decoder_is_its_own_parameter_started_from_the_embeddings(tmp_path):
    _legacy_bert_folder(tmp_path)
    q = QFormer(**{**SMALL, "vocab_size": 51, "tie_word_embeddings": False})
    init_qformer_from_bert(q, str(tmp_path))
    assert q.cls.predictions.decoder.weight is not q.bert.embeddings.word_embeddings.weight
    assert torch.equal(q.cls.predictions.decoder.weight, q.bert.embeddings.word_embeddings.weight)


# --- a BERT folder whose model.safetensors is not the weights -------------------------------------

LFS_POINTER = b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 440449768\n"


def test_a_git_lfs_pointer_for_model_safetensors_is_named_with_what_to_do(tmp_path):
    """A git clone of bert-base-uncased without git-lfs leaves a text pointer: safetensors said only
    "Error while deserializing header: header too large", naming neither the file nor the cause."""
    from lavis_point.models.checkpoint import CheckpointError

    (tmp_path / "model.safetensors").write_bytes(LFS_POINTER)
    with pytest.raises(CheckpointError, match="a git-lfs pointer, not the weights.*git lfs pull") as caught:
        init_qformer_from_bert(QFormer(**SMALL), str(tmp_path))
    assert str(tmp_path / "model.safetensors") in str(caught.value)


def test_an_unreadable_safetensors_file_is_named(tmp_path):
    from safetensors.torch import save_file

    from lavis_point.models.checkpoint import CheckpointError

    path = tmp_path / "bert.safetensors"
    save_file({"embeddings.word_embeddings.weight": torch.ones(50, 32)}, str(path))
    path.write_bytes(path.read_bytes()[:100])  # an interrupted download
    with pytest.raises(CheckpointError, match="not a readable safetensors file") as caught:
        init_qformer_from_bert(QFormer(**SMALL), str(path))
    assert str(path) in str(caught.value) and "download it again" in str(caught.value)


def test_a_folder_whose_model_safetensors_is_a_pointer_reads_its_pytorch_model_bin(tmp_path, caplog):
    bert = _legacy_bert_folder(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(LFS_POINTER)
    q = QFormer(**{**SMALL, "vocab_size": 51})
    with caplog.at_level("WARNING"):
        init_qformer_from_bert(q, str(tmp_path))
    assert torch.equal(q.state_dict()["bert.encoder.layer.1.output.dense.weight"],
                       bert.state_dict()["bert.encoder.layer.1.output.dense.weight"])
    assert str(tmp_path / "model.safetensors") in caplog.text and "pytorch_model.bin instead" in caplog.text
