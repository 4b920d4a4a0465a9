"""Every family: contract (neurons, heads, vocabulary) -> physically smaller weights -> save -> load_model
-> identical outputs; decoders still generate, and only original ids the domain uses."""
import json

import pytest
import torch

import pyshrink
from pyshrink.arch import adapter_for
from pyshrink.arch.linears import in_features, out_features
from pyshrink.data import builtin_text
from pyshrink.models import load_model, num_params

TEXT = builtin_text("pydoc")[:12000]


def _out(model, ids):
    with torch.no_grad():
        res = model(input_ids=ids)
    return res.logits if hasattr(res, "logits") else res.last_hidden_state


@pytest.fixture(scope="module")
def contracted(tiny_folder, tmp_path_factory):
    made = {}

    def make(family):
        if family not in made:
            out = tmp_path_factory.mktemp(f"contracted-{family}") / "out"
            res = pyshrink.contract(tiny_folder(family), 0.5, 2, calibration=TEXT, prune_heads=True,
                                    prune_vocab=True, seq_len=64, calibration_tokens=1024, eval_tokens=256,
                                    out=out, progress=False)
            made[family] = (res, out)
        return made[family]

    return make


from pyshrink_tiny_models import families  # noqa: E402


@pytest.mark.parametrize("family", families())
def test_physical_shapes_and_params(family, contracted, tiny_folder):
    res, out = contracted(family)
    model, s = res.model, res.summary
    ad = adapter_for(model)
    src = load_model(tiny_folder(family), with_tokenizer=False)
    full = ad.mlp_width(ad.blocks(src)[0])
    assert len(s["layers"]) == 2
    for row in s["layers"]:
        blk = ad.blocks(model)[row["layer"]]
        assert row["width_after"] == full - round(0.5 * full) == ad.mlp_width(blk)
        for m in ad.mlp_in_modules(blk):
            assert out_features(m) == row["width_after"]
            assert tuple(m.weight.shape) in ((row["width_after"], in_features(m)), (in_features(m), row["width_after"]))
        assert row["heads_after"] < row["heads_before"]
        n_q, n_kv = ad.head_counts(blk, model.config)
        assert n_q % n_kv == 0  # grouped-query layout stays valid
    untouched = set(range(ad.depth(model))) - {r["layer"] for r in s["layers"]}
    for i in untouched:
        assert ad.mlp_width(ad.blocks(model)[i]) == full
    assert s["params_after"] == num_params(model) < s["params_before"] == num_params(src)
    assert s["vocab"]["vocab_after"] < s["vocab"]["vocab_before"]
    meta = json.loads((out / "pyshrink.json").read_text())
    kinds = [t["kind"] for t in meta["transforms"]]
    assert kinds.count("contract.mlp") == 2 and kinds.count("contract.heads") == 2 and "contract.vocab" in kinds
    assert meta["contraction"]["settings"]["contraction_ratio"] == 0.5


@pytest.mark.parametrize("family", families())
def test_save_load_identical_outputs(family, contracted):
    res, out = contracted(family)
    loaded, tok = load_model(out)
    ids = torch.randint(0, res.model.config.vocab_size, (2, 17))
    assert torch.equal(_out(res.model, ids), _out(loaded, ids))
    assert num_params(loaded) == res.summary["params_after"]


@pytest.mark.parametrize("family", [f for f in families() if f != "bert"])
def test_generate_after_load_returns_kept_original_ids(family, contracted):
    res, out = contracted(family)
    loaded, tok = load_model(out)
    emb = loaded.get_input_embeddings()
    kept = set(loaded.get_output_embeddings().kept_ids.tolist())
    prompt = tok("The class statement", return_tensors="pt").input_ids
    gen = loaded.generate(input_ids=prompt, max_new_tokens=12, do_sample=False)
    new = gen[0, prompt.shape[1]:].tolist()
    assert len(new) > 0 and all(t in kept for t in new)
    assert emb.num_embeddings == loaded.config.vocab_size  # ids keep their original meaning
    assert isinstance(tok.decode(gen[0]), str)
    sampled = loaded.generate(input_ids=prompt, max_new_tokens=12, do_sample=True, top_k=0)
    assert all(t in kept for t in sampled[0, prompt.shape[1]:].tolist())


def test_tied_embeddings_stay_tied(contracted):
    res, out = contracted("llama")  # the tiny llama ties its head to the embedding
    for model in (res.model, load_model(out, with_tokenizer=False)):
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_ppl_final_is_not_flattered_by_the_pruned_vocabulary(tiny_folder):
    """The kept vocabulary holds the evaluation text's ids, so after the drop the softmax is renormalised over them;
    ppl_final must be the full-vocabulary figure: the same as the same contraction without vocabulary pruning."""
    kw = dict(calibration=TEXT, seq_len=64, calibration_tokens=1024, eval_tokens=256, progress=False)
    plain = pyshrink.contract(tiny_folder("llama"), 0.5, 2, **kw).summary
    pruned = pyshrink.contract(tiny_folder("llama"), 0.5, 2, prune_vocab=True, **kw).summary
    assert pruned["vocab"]["vocab_after"] < pruned["vocab"]["vocab_before"]
    assert pruned["ppl_final"] == plain["ppl_final"]
    assert pruned["vocab"]["ppl_renormalised_over_kept_ids"] < pruned["ppl_final"]


def test_a_pruned_vocabulary_is_not_pruned_again(contracted):
    from pyshrink.errors import InvalidSetting

    res, _ = contracted("llama")
    with pytest.raises(InvalidSetting, match="has a pruned vocabulary already"):
        pyshrink.contract((res.model, res.tokenizer), 0.5, 1, calibration=TEXT, prune_vocab=True, seq_len=64,
                          calibration_tokens=1024, eval_tokens=256, progress=False)



def test_a_bfloat16_source_is_saved_in_bfloat16_as_it_was_measured(tiny_folder, tmp_path):
    """A contracted bf16 model was stored in float32: fewer parameters than the source, but more bytes."""
    from safetensors import safe_open

    model, tok = pyshrink.load_model(tiny_folder("llama"))
    pyshrink.save(model.to(torch.bfloat16), tok, tmp_path / "src")
    res = pyshrink.contract(tmp_path / "src", 0.5, 1, calibration=TEXT, seq_len=64, calibration_tokens=1024,
                            eval_tokens=256, progress=False, out=tmp_path / "c")
    with safe_open(str(tmp_path / "c" / "model.safetensors"), "pt") as st:
        assert {st.get_slice(k).get_dtype() for k in st.keys()} == {"BF16"}
    assert (tmp_path / "c" / "model.safetensors").stat().st_size < (tmp_path / "src" / "model.safetensors").stat().st_size
    loaded, _ = pyshrink.load_model(tmp_path / "c")  # float32, as res.model: the bf16 values it was measured with
    ids = torch.randint(5, 300, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, res.model(input_ids=ids).logits, rtol=0, atol=0)


def test_quantizing_a_vocabulary_pruned_model_says_its_perplexity_is_over_the_kept_ids(tiny_folder, tmp_path):
    from pyshrink.quantize import QuantConfig
    from pyshrink.quantize.pipeline import quantize_to_folder

    pyshrink.contract(tiny_folder("llama"), 0.5, 1, calibration=TEXT, prune_vocab=True, seq_len=64,
                      calibration_tokens=1024, eval_tokens=256, progress=False, out=tmp_path / "c")
    (tmp_path / "t.txt").write_text(TEXT)
    run = quantize_to_folder(tmp_path / "c", tmp_path / "q", QuantConfig(method="rtn", seq_len=64, progress=False),
                             calibration=tmp_path / "t.txt", eval_tokens=256, progress=False)
    kept = len(json.loads((tmp_path / "c" / "pyshrink.json").read_text())["transforms"][-1]["kept_ids"])
    assert f"over the {kept:,} ids the pruned vocabulary keeps" in run.summary["eval_source"]
