"""Vocabulary pruning keeps original ids working: kept ids score exactly as before, removed ids are -inf."""
import torch

from pyshrink.contract import vocab

from pyshrink_tiny_models import tiny_model


def test_compact_vocab_keeps_kept_logits_and_masks_removed():
    model = tiny_model("llama")  # tied embeddings
    ids = torch.randint(5, 200, (2, 12))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    kept = vocab.kept_ids(torch.arange(5, 200), None, model.config)
    assert {1, 2, 3} <= set(kept.tolist())  # bos/eos/pad (named by the config) are protected
    info = vocab.apply(model, kept)
    assert info == {"vocab_before": model.config.vocab_size, "vocab_after": len(kept)}
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert after.shape == before.shape
    torch.testing.assert_close(after[..., kept], before[..., kept])
    removed = torch.ones(model.config.vocab_size, dtype=torch.bool)
    removed[kept] = False
    assert torch.isneginf(after[..., removed]).all()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert model.get_input_embeddings().weight.shape[0] == len(kept)


def test_untied_head_and_removed_input_ids():
    model = tiny_model("gpt2")
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    kept = vocab.kept_ids(torch.arange(10, 50), None, model.config)
    vocab.apply(model, kept)
    emb = model.get_input_embeddings()
    assert model.get_output_embeddings().weight is not emb.weight
    # a removed id still embeds (to the fallback row) instead of failing
    out = emb(torch.tensor([[300, 11]]))
    assert out.shape == (1, 2, model.config.n_embd)


def test_removed_ids_read_the_tokenizers_unk_row():
    # BertConfig names no unk id: the tokenizer's (passed by contract) must pick the row, not row 0 ([PAD] in BERT)
    model = tiny_model("bert")
    assert getattr(model.config, "unk_token_id", None) is None
    original = model.get_input_embeddings().weight.detach().clone()
    kept = vocab.kept_ids(torch.arange(10, 50), None, model.config)
    assert kept[0] != 7 and 7 not in kept.tolist()
    kept = torch.cat([kept, torch.tensor([7])]).sort().values  # 7 plays the tokenizer's unk
    vocab.apply(model, kept, unk_id=7)
    emb = model.get_input_embeddings()
    torch.testing.assert_close(emb(torch.tensor([[300]]))[0, 0], original[7])
    torch.testing.assert_close(emb(torch.tensor([[7]]))[0, 0], original[7])


def test_the_unknown_row_is_the_tokenizers_unk_only_when_it_is_no_end_of_text_token():
    from types import SimpleNamespace

    bert_like = SimpleNamespace(unk_token_id=100, eos_token_id=None, bos_token_id=None, pad_token_id=0)
    gpt2_like = SimpleNamespace(unk_token_id=50256, eos_token_id=50256, bos_token_id=50256, pad_token_id=None)
    assert vocab.unknown_token_id(bert_like) == 100
    assert vocab.unknown_token_id(gpt2_like) is None  # removed ids must not read as the end of the text
    assert vocab.unknown_token_id(None) is None
