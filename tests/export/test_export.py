"""Export of every family: ONNX Runtime agrees with PyTorch on a prompt and over KV-cache steps."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from onnx_helpers import (DECODERS, VOCAB, contracted_llama, outlier_llama, quantized, random_prompt, tiny_model,
                          vocab_contracted)
from pyshrink import export_onnx
from pyshrink.arch import adapter_for
from pyshrink.errors import InvalidSetting
from pyshrink.export import ExportValidationError
from pyshrink.export.validate import INT4_RTOL
from pyshrink.export.weights import WeightPolicy, apply_substitutions
from pyshrink.runtime import DecoderSession

ORT_MAX_IR = 10  # what pyshrink writes; onnxruntime >= 1.18 reads it


def _steps_parity(folder, model, prompt_len=7, steps=4, seed=1, substitutions=None):
    """Largest |ORT - torch| (relative to max(1, max|logit|)) over a prefill and ``steps`` cached steps."""
    ids = random_prompt(prompt_len + steps, seed)
    sess = DecoderSession(folder)
    state = sess.new_state(prompt_len + steps)
    got = [sess.step(state, ids[:prompt_len])] + [sess.step(state, ids[prompt_len + k: prompt_len + k + 1])
                                                   for k in range(steps)]
    worst = 0.0
    with torch.no_grad(), apply_substitutions(model, substitutions or {}):
        for k in range(steps + 1):
            ref = model(torch.tensor([ids[: prompt_len + k]])).logits[0, -1].numpy()
            worst = max(worst, float(np.abs(got[k] - ref).max() / max(1.0, np.abs(ref).max())))
    return worst


@pytest.mark.parametrize("family", DECODERS)
def test_decoder_export_matches_pytorch_over_kv_cache_steps(family, exported):
    folder = exported(family)
    meta = json.loads((folder / "pyshrink_onnx.json").read_text())
    assert meta["kind"] == "decoder" and meta["validation"]["kv_steps"] >= 3
    assert meta["validation"]["max_abs_diff"] <= meta["validation"]["tolerance"]
    assert {"model.onnx", "tokenizer.json", "genai_config.json", "pyshrink_onnx.json"} <= {p.name for p in folder.iterdir()}
    assert _steps_parity(folder, tiny_model(family)) < 1e-4


@pytest.mark.parametrize("family", DECODERS)
def test_right_padded_batch_matches_each_row_alone(family, exported):
    """A batch of an 8-token and a 5-token prompt, the shorter padded on the right (GroupQueryAttention's
    convention), then two cached steps: every row's logits are its own prompt's. The prefill used to return the
    last column's logits, a pad's, for the shorter row."""
    meta = json.loads((exported(family) / "pyshrink_onnx.json").read_text())
    assert meta["padding"] == "right"
    sess = ort.InferenceSession(str(exported(family) / "model.onnx"), providers=["CPUExecutionProvider"])
    model = tiny_model(family)
    ids = random_prompt(16, seed=3)
    rows = [ids[:8], ids[8:13]]
    inp, mask = np.zeros((2, 8), np.int64), np.zeros((2, 8), np.int64)
    for r, row in enumerate(rows):
        inp[r, :len(row)], mask[r, :len(row)] = row, 1
    feeds = {f"past_key_values.{i}.{k}": np.zeros((2, layer["num_kv_heads"], 0, layer["head_dim"]), np.float32)
             for i, layer in enumerate(meta["layers"]) for k in ("key", "value")}
    names = [o.name for o in sess.get_outputs()]
    for step in range(3):
        out = dict(zip(names, sess.run(None, {"input_ids": inp, "attention_mask": mask, **feeds})))
        for r, row in enumerate(rows):
            with torch.no_grad():
                ref = model(torch.tensor([row])).logits[0, -1].numpy()
            assert np.abs(out["logits"][r, -1] - ref).max() < 1e-4 * max(1.0, np.abs(ref).max()), (step, r)
        nxt = [int(t) for t in out["logits"][:, -1].argmax(-1)]
        rows = [row + [t] for row, t in zip(rows, nxt)]
        inp, mask = np.array([[t] for t in nxt]), np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        feeds = {k: out[k.replace("past_key_values.", "present.")] for k in feeds}


def test_all_logits_export_validates_and_decodes(tmp_path):
    from onnx_helpers import word_tokenizer

    model = tiny_model("llama")
    out = export_onnx(model, tmp_path / "all", logits="all", tokenizer=word_tokenizer())
    assert json.loads((out / "pyshrink_onnx.json").read_text())["logits"] == "all"
    # a prompt, then one-token steps: the logits' length changes between runs of one bound session
    assert _steps_parity(out, model) < 1e-4
    ids = random_prompt(6, 2)
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    feed = {i.name: np.zeros([1] + [d if isinstance(d, int) else 0 for d in i.shape[1:]], dtype=np.float32)
            for i in sess.get_inputs()[2:]}  # empty past: [1, kv_heads, 0, head_dim]
    logits = sess.run(["logits"], {"input_ids": np.array([ids]), "attention_mask": np.ones((1, 6), np.int64),
                                   **feed})[0]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits.numpy()
    assert logits.shape == ref.shape and np.abs(logits - ref).max() < 1e-4


@pytest.mark.parametrize("family", DECODERS)
def test_kv_cache_inputs_outputs_and_ir_version(family, exported):
    folder = exported(family)
    m = onnx.load(str(folder / "model.onnx"))
    assert m.ir_version == ORT_MAX_IR
    ins = [i.name for i in m.graph.input]
    outs = [o.name for o in m.graph.output]
    n = adapter_for(tiny_model(family)).depth(tiny_model(family))
    assert ins[:2] == ["input_ids", "attention_mask"]
    assert [f"past_key_values.{i}.{k}" for i in range(n) for k in ("key", "value")] == ins[2:]
    assert outs[0] == "logits" and outs[1:] == [f"present.{i}.{k}" for i in range(n) for k in ("key", "value")]
    ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])  # loads as written
    for int4 in (False, True):  # standard ops in the ONNX domain (ORT's own ones under com.microsoft only)
        onnx.checker.check_model(onnx.load(str(exported(family, int4=int4) / "model.onnx")), full_check=True)


def test_encoder_export_matches_pytorch(exported):
    folder = exported("bert")
    onnx.checker.check_model(onnx.load(str(folder / "model.onnx")), full_check=True)
    meta = json.loads((folder / "pyshrink_onnx.json").read_text())
    assert meta["kind"] == "encoder" and "last_hidden_state" in meta["outputs"]
    model = tiny_model("bert")
    ids = torch.tensor([random_prompt(11, 3)])
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(["last_hidden_state"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
                                           "token_type_ids": torch.zeros_like(ids).numpy()})[0]
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    assert np.abs(got - ref)[0, :8].max() < 1e-4


def test_encoder_with_a_contracted_vocabulary_reads_original_ids(tmp_path):
    model = vocab_contracted(tiny_model("bert"), list(range(0, VOCAB, 3)))
    export_onnx(model, tmp_path / "bert")
    ids = torch.tensor([[i * 3 for i in random_prompt(9, 5)]]) % (VOCAB - VOCAB % 3)  # kept ids, the high ones too
    sess = ort.InferenceSession(str(tmp_path / "bert" / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(["last_hidden_state"], {"input_ids": ids.numpy(), "attention_mask": torch.ones_like(ids).numpy(),
                                           "token_type_ids": torch.zeros_like(ids).numpy()})[0]
    with torch.no_grad():
        ref = model(input_ids=ids).last_hidden_state.numpy()
    assert ids.max() >= model.embeddings.word_embeddings.weight.shape[0]  # an id past the kept rows' count
    assert np.abs(got - ref).max() < 1e-4


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_a_model_off_the_cpu_is_refused_before_any_work(tmp_path, family):
    model = tiny_model(family).to("meta")  # stands in for a CUDA model on this CPU-only machine
    with pytest.raises(InvalidSetting, match="needs the model on the CPU.*tensors on meta.*model.cpu"):
        export_onnx(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_a_head_size_that_is_not_a_multiple_of_8_is_refused_before_any_work(tmp_path):
    import transformers as tf

    cfg = tf.PhiConfig(vocab_size=128, hidden_size=80, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, partial_rotary_factor=0.4, max_position_embeddings=256)
    with pytest.raises(InvalidSetting, match="heads have 20 dimensions.*multiple of 8"):
        export_onnx(tf.PhiForCausalLM(cfg).eval(), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_max_length_beyond_the_models_positions_is_refused(tmp_path):
    model = tiny_model("llama")  # 256 positions
    with pytest.raises(InvalidSetting, match="max_length=1000 is more than the model's 256 positions"):
        export_onnx(model, tmp_path / "x", max_length=1000)
    assert not (tmp_path / "x").exists()


def test_encoder_with_a_task_head_is_refused_in_memory_and_exported_from_a_folder(tmp_path):
    import transformers as tf

    from pyshrink import models

    model = tf.BertForSequenceClassification(tiny_model("bert").config).eval()
    with pytest.raises(InvalidSetting, match="BertForSequenceClassification adds a task head.*model.base_model"):
        export_onnx(model, tmp_path / "cls")
    assert not (tmp_path / "cls").exists()
    src = models.save(model, None, tmp_path / "saved")  # config.architectures names the task class
    export_onnx(str(src), tmp_path / "from-folder")  # loads it, exports (and validates) its encoder
    meta = json.loads((tmp_path / "from-folder" / "pyshrink_onnx.json").read_text())
    assert meta["kind"] == "encoder" and meta["validation"]["max_abs_diff"] < 1e-4


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_int4_export_matches_the_dequantized_pytorch_model(family, tmp_path):
    """accuracy_level 0 (float activations): the graph computes exactly with the dequantized 4-bit weights."""
    model = tiny_model(family)
    export_onnx(model, tmp_path / "o", int4=True, accuracy_level=0)
    policy = WeightPolicy(int4=True, group_size=32)
    from pyshrink.export.spec import decoder_spec

    decoder_spec(model, policy)  # the same round-to-nearest, to substitute in PyTorch
    assert _steps_parity(tmp_path / "o", model, substitutions=policy.substitutions) < 1e-4
    meta = json.loads((tmp_path / "o" / "pyshrink_onnx.json").read_text())
    assert meta["weights"]["projections"]["rtn"] > 0 and meta["weights"]["projections"]["float"] == 0
    assert meta["weights"]["group_size"] == 32 and meta["weights"]["block_sizes"] == [32]
    ops = {n.op_type for n in onnx.load(str(tmp_path / "o" / "model.onnx")).graph.node}
    assert "MatMulNBits" in ops and "MatMul" not in ops


def test_int4_accuracy_level_4_within_its_stated_bound(exported):
    meta = json.loads((exported("llama", int4=True) / "pyshrink_onnx.json").read_text())
    v = meta["validation"]
    assert v["relative_tolerance"] == INT4_RTOL and v["max_abs_diff"] <= v["tolerance"]
    assert v["exact_twin_max_abs_diff"] <= 1e-3 * v["scale"]  # the same graph with float activations: exact


def test_int4_encoder_export_is_checked_exactly_with_float_activations_too(exported):
    v = json.loads((exported("bert", int4=True) / "pyshrink_onnx.json").read_text())["validation"]
    assert v["relative_tolerance"] == INT4_RTOL and v["max_abs_diff"] <= v["tolerance"]
    assert v["exact_twin_max_abs_diff"] is not None and v["exact_twin_max_abs_diff"] <= 1e-3 * v["scale"]


def test_quantized_model_is_exported_by_byte_copy(tmp_path):
    model = quantized(tiny_model("llama"), group_size=32, symmetric=False)
    export_onnx(model, tmp_path / "q", accuracy_level=0)
    m = onnx.load(str(tmp_path / "q" / "model.onnx"))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    attn = model.model.layers[0].self_attn
    packed = np.concatenate([attn.q_proj.packed.numpy(), attn.k_proj.packed.numpy(), attn.v_proj.packed.numpy()])
    assert np.array_equal(inits["layers.0.attn.qkv.qweight"], packed)  # the very bytes, not re-quantized
    zps = np.concatenate([attn.q_proj.zero_points.numpy(), attn.k_proj.zero_points.numpy(), attn.v_proj.zero_points.numpy()])
    assert np.array_equal(inits["layers.0.attn.qkv.qzeros"], zps.reshape(-1))
    meta = json.loads((tmp_path / "q" / "pyshrink_onnx.json").read_text())
    assert meta["weights"]["projections"]["copied"] == 3 * 7 and meta["weights"]["projections"]["rtn"] == 0
    assert meta["weights"]["group_size"] is None and meta["weights"]["block_sizes"] == [32]  # what the graph holds
    assert _steps_parity(tmp_path / "q", model) < 1e-4


def test_8bit_quantized_model_exports_exactly(tmp_path):
    model = quantized(tiny_model("gpt2"), bits=8)
    export_onnx(model, tmp_path / "q8", accuracy_level=0)
    meta = json.loads((tmp_path / "q8" / "pyshrink_onnx.json").read_text())
    assert meta["weights"]["projections"]["copied"] == 3 * 4
    assert _steps_parity(tmp_path / "q8", model) < 1e-4


def test_contracted_model_with_per_layer_widths_and_heads(tmp_path):
    model = contracted_llama()
    export_onnx(model, tmp_path / "c")
    meta = json.loads((tmp_path / "c" / "pyshrink_onnx.json").read_text())
    assert [l["mlp_width"] for l in meta["layers"]] == [40, 96, 17]
    assert [(l["num_heads"], l["num_kv_heads"]) for l in meta["layers"]] == [(4, 2), (2, 1), (4, 2)]
    assert _steps_parity(tmp_path / "c", model) < 1e-4


def test_partial_rotary_with_a_head_size_gqa_cannot_rotate(tmp_path):
    """Phi with head size 40 (not a multiple of 16, which GroupQueryAttention needs to rotate inside) and a rotary
    half-width of 8: the rotation runs in plain operators, and the export matches PyTorch."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.PhiConfig(vocab_size=VOCAB, hidden_size=80, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, partial_rotary_factor=0.4,
                       max_position_embeddings=64)
    model = tf.PhiForCausalLM(cfg).eval()
    export_onnx(model, tmp_path / "phi")
    assert _gqa_rotary(tmp_path / "phi") == {0}
    assert _steps_parity(tmp_path / "phi", model) < 1e-4


@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
def test_sliding_window_attention_past_the_window(kind, tmp_path):
    """Mistral (every layer) and Qwen2 (layers from max_window_layers on) attend to the last sliding_window
    positions only: a prompt and steps well past an 8-token window match PyTorch. The graph used to attend to
    everything (validation's 8-token prompt is shorter than real windows, so it passed)."""
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, sliding_window=8)
    if kind == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(**common)).eval()
    else:
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(use_sliding_window=True, max_window_layers=1, **common)).eval()
    export_onnx(model, tmp_path / kind)
    windows = {next((onnx.helper.get_attribute_value(a) for a in n.attribute if a.name == "local_window_size"), -1)
               for n in onnx.load(str(tmp_path / kind / "model.onnx")).graph.node if n.op_type == "GroupQueryAttention"}
    assert windows == ({8} if kind == "mistral" else {-1, 8})
    assert _steps_parity(tmp_path / kind, model, prompt_len=20, steps=10) < 1e-4


def _gqa_rotary(folder) -> set:
    """The do_rotary attributes of the graph's GroupQueryAttention nodes."""
    return {next((onnx.helper.get_attribute_value(a) for a in n.attribute if a.name == "do_rotary"), 0)
            for n in onnx.load(str(folder / "model.onnx")).graph.node if n.op_type == "GroupQueryAttention"}


def test_gqa_rotates_inside_where_onnx_runtime_can(exported):
    assert _gqa_rotary(exported("llama")) == {1}  # head size 16, rotary half-width 8


def test_contracted_vocabulary_maps_ids_and_logits(tmp_path):
    keep = list(range(0, VOCAB, 2))  # even ids only
    model = vocab_contracted(tiny_model("llama"), keep)
    export_onnx(model, tmp_path / "v")
    meta = json.loads((tmp_path / "v" / "pyshrink_onnx.json").read_text())
    assert meta["vocab_size"] == VOCAB and meta["vocab_keep"] == keep
    sess = DecoderSession(tmp_path / "v")
    state = sess.new_state(8)
    logits = sess.step(state, [4, 8, 10, 3])  # tokenizer ids; 3 was removed (reads the fallback row)
    assert logits.shape == (VOCAB,) and np.isneginf(logits[1::2]).all()
    with torch.no_grad():
        ref = model(torch.tensor([[4, 8, 10, 3]])).logits[0, -1].numpy()
    assert np.abs(logits[0::2] - ref[0::2]).max() < 1e-4
    inits = {t.name for t in onnx.load(str(tmp_path / "v" / "model.onnx")).graph.initializer}
    assert "embed_tokens.weight" in inits and "vocab_remap" in inits


def test_failed_validation_leaves_nothing_behind(tmp_path):
    out = tmp_path / "fail"
    with pytest.raises(ExportValidationError, match="largest \\|difference\\|"):
        export_onnx(tiny_model("llama"), out, tolerance=0.0)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder either


def test_an_onnx_runtime_error_in_validation_is_a_failed_validation(tmp_path, monkeypatch):
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

    import pyshrink.export.validate as validate

    def refuse(*args, **kwargs):
        raise InvalidArgument("idx=13550 must be within the inclusive range [-793,792]")

    monkeypatch.setattr(validate, "validate_decoder", refuse)
    for kw in (dict(), dict(int4=True, accuracy_level="auto")):  # no accuracy level is advised or tried
        with pytest.raises(ExportValidationError, match=r"ONNX Runtime could not run the exported graph: idx=13550"
                                                        r"[^;]*$"):
            export_onnx(tiny_model("llama"), tmp_path / "x", **kw)
        assert list(tmp_path.iterdir()) == []


def test_existing_output_is_not_replaced_without_overwrite(exported, monkeypatch):
    import pyshrink.models

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(pyshrink.models, "load_model", no_loading)
    with pytest.raises(FileExistsError):
        export_onnx(tiny_model("llama"), exported("llama"))
    with pytest.raises(FileExistsError):  # from a path: refused before the model loads
        export_onnx(str(exported("gpt2")), exported("llama"))


def test_external_data(tmp_path):
    export_onnx(tiny_model("gpt2"), tmp_path / "x", external_data=True)
    names = {p.name for p in (tmp_path / "x").iterdir()}
    assert "model.onnx.data" in names
    assert (tmp_path / "x" / "model.onnx").stat().st_size < 200_000 < (tmp_path / "x" / "model.onnx.data").stat().st_size
    assert json.loads((tmp_path / "x" / "pyshrink_onnx.json").read_text())["external_data"] == "model.onnx.data"


@pytest.mark.parametrize("kw, match", [({"group_size": 48}, "group_size"), ({"accuracy_level": 2.5}, "accuracy_level"),
                                       ({"opset": 12}, "opset"), ({"logits": "some"}, "logits")])
def test_bad_settings_are_clear_errors(kw, match, tmp_path):
    from pyshrink.errors import InvalidSetting

    with pytest.raises(InvalidSetting, match=match):
        export_onnx(tiny_model("llama"), tmp_path / "o", **kw)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_tied_embedding_with_padded_groups(symmetric, tmp_path):
    """hidden 80 is not a multiple of the group (32): the shared 4-bit embedding rows are cut back to 80."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=80, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=5, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
                         tie_word_embeddings=True)
    model = tf.LlamaForCausalLM(cfg).eval()
    export_onnx(model, tmp_path / "p", int4=True, group_size=32, symmetric=symmetric, accuracy_level=0)
    ops = {n.op_type for n in onnx.load(str(tmp_path / "p" / "model.onnx")).graph.node}
    assert "GatherBlockQuantized" in ops
    meta = json.loads((tmp_path / "p" / "pyshrink_onnx.json").read_text())
    assert meta["embedding"] == "4-bit, the head's bytes" and meta["validation"]["max_abs_diff"] < 1e-4


def test_int4_untied_quantized_head_gets_its_own_4bit_embedding(tmp_path):
    """pyshrink.quantize(skip=()) unties the head into a QuantLinear: the export copies the head's bytes and
    rounds the float embedding into bytes of its own, read by GatherBlockQuantized (not a float table)."""
    import transformers as tf

    import pyshrink

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=80, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=5, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
                         tie_word_embeddings=True)
    model = tf.LlamaForCausalLM(cfg).eval()
    pyshrink.quantize(model, bits=4, group_size=32, method="rtn", skip=())
    assert type(model.lm_head).__name__ == "QuantLinear"  # untied: the embedding stays a float table
    export_onnx(model, tmp_path / "u", int4=True, group_size=32, accuracy_level=0)
    m = onnx.load(str(tmp_path / "u" / "model.onnx"))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}
    assert "embed_tokens.weight" not in inits and "embed_tokens.qweight" in inits
    gbq = [n for n in m.graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(gbq) == 1
    assert np.array_equal(inits["lm_head.qweight"], model.lm_head.packed.numpy())  # copied, not re-rounded
    meta = json.loads((tmp_path / "u" / "pyshrink_onnx.json").read_text())
    assert meta["embedding"] == "4-bit" and meta["weights"]["projections"]["rtn"] == 0
    # the reference runs with the same rounded embedding, so ORT and PyTorch agree to float32 noise
    assert meta["validation"]["max_abs_diff"] < 1e-4


def _levels(folder) -> dict:
    from pyshrink.export.accuracy import levels_of

    return levels_of(onnx.load(str(folder / "model.onnx")))


def test_accuracy_level_auto_keeps_level_4_where_it_validates(tmp_path):
    """A model int8 activations do not hurt: every projection at 4, nothing measured, choice recorded."""
    export_onnx(tiny_model("llama"), tmp_path / "auto", int4=True, accuracy_level="auto")
    meta = json.loads((tmp_path / "auto" / "pyshrink_onnx.json").read_text())
    levels = _levels(tmp_path / "auto")
    assert meta["weights"]["accuracy_levels"] == levels and set(levels.values()) == {4}
    assert len(levels) == 3 * 4 + 1  # qkv, o, gate|up, down per layer + the head
    assert "level4_effect" not in meta["weights"] and "rejected" not in meta["validation"]


@pytest.mark.parametrize("external", [False, True])
def test_accuracy_level_auto_uses_level_0_only_where_int8_activations_break(external, tmp_path):
    """An input channel 10^4x its block's others: level 4 on every projection fails validation (an error
    for accuracy_level=4); 'auto' measures each projection, puts exactly that one at 0, and validates."""
    model = outlier_llama()
    with pytest.raises(ExportValidationError, match="accuracy_level='auto'"):
        export_onnx(model, tmp_path / "four", int4=True, accuracy_level=4)
    assert not (tmp_path / "four").exists()
    out = tmp_path / "auto"
    export_onnx(model, out, int4=True, accuracy_level="auto", external_data=external)
    assert (out / "model.onnx.data").is_file() == external and not (out / "probe.onnx").exists()
    meta = json.loads((out / "pyshrink_onnx.json").read_text())
    w, v = meta["weights"], meta["validation"]
    assert w["accuracy_level"] == "auto" and w["accuracy_levels"] == _levels(out)
    assert {n for n, lvl in w["accuracy_levels"].items() if lvl == 0} == {"layers.1.mlp.gate_up"}
    effect = w["level4_effect"]
    assert effect["layers.1.mlp.gate_up"] > INT4_RTOL  # alone, it moves the logits past the bound
    assert max(d for n, d in effect.items() if n != "layers.1.mlp.gate_up") < 0.2 * INT4_RTOL
    assert v["relative_tolerance"] == INT4_RTOL and v["max_abs_diff"] <= v["tolerance"]
    assert len(v["rejected"]) == 1 and "accuracy_level 4 on every projection" in v["rejected"][0]
    if not external:  # the same graph with float activations everywhere is exact (checked in memory)
        assert v["exact_twin_max_abs_diff"] <= 1e-3 * v["scale"]


def test_accuracy_level_0_and_4_mean_every_projection(tmp_path):
    model = outlier_llama()
    export_onnx(model, tmp_path / "zero", int4=True, accuracy_level=0)
    assert set(_levels(tmp_path / "zero").values()) == {0}
    export_onnx(model, tmp_path / "four", int4=True, accuracy_level=4, validate=False)
    assert set(_levels(tmp_path / "four").values()) == {4}


def test_accuracy_level_auto_falls_back_to_0_when_nothing_else_validates(tmp_path):
    """A bound only float activations can meet: 'auto' ends on 0 everywhere, validated at that bound."""
    export_onnx(tiny_model("llama"), tmp_path / "auto", int4=True, accuracy_level="auto", tolerance=2e-5)
    meta = json.loads((tmp_path / "auto" / "pyshrink_onnx.json").read_text())
    assert set(_levels(tmp_path / "auto").values()) == {0} == set(meta["weights"]["accuracy_levels"].values())
    assert meta["validation"]["max_abs_diff"] <= meta["validation"]["tolerance"]
    assert meta["validation"]["rejected"][0].startswith("accuracy_level 4 on every projection")


def test_auto_without_validation_is_level_4(tmp_path):
    out = export_onnx(tiny_model("llama"), tmp_path / "o", int4=True, accuracy_level="auto", validate=False)
    meta = json.loads((out / "pyshrink_onnx.json").read_text())
    assert meta["weights"]["accuracy_level"] == 4 and set(_levels(out).values()) == {4}


def test_a_model_tokenizer_pair_exports_and_the_model_keeps_its_mode(tmp_path):
    from onnx_helpers import word_tokenizer

    model, tok = tiny_model("llama").train(), word_tokenizer()
    out = export_onnx((model, tok), tmp_path / "out")
    assert (out / "tokenizer.json").exists() and model.training  # handed back in training mode, as it came
    with pytest.raises(InvalidSetting, match="a \\(model, tokenizer\\) pair and also tokenizer="):
        export_onnx((model, tok), tmp_path / "out2", tokenizer=tok)


def test_a_token_added_to_the_tokenizer_beyond_the_embedding_is_allowed(tmp_path):
    from onnx_helpers import word_tokenizer

    tok = word_tokenizer()
    tok.add_special_tokens({"pad_token": "<newpad>"})  # len(tok) == VOCAB + 1, the embedding not resized
    assert len(tok) == VOCAB + 1
    out = export_onnx(tiny_model("llama"), tmp_path / "out", tokenizer=tok)
    assert (out / "tokenizer.json").exists()
    # a prompt that uses the added token is the client's error (400), not the server's (500)
    from pyshrink.runtime import OnnxLM
    from pyshrink.runtime.server import ApiError, CompletionService

    with pytest.raises(ApiError, match=r"token id 128, which the model does not know \(it takes ids 0\.\.127\)") as e:
        CompletionService(OnnxLM(out)).parse({"prompt": "w5 <newpad>"})
    assert e.value.status == 400


def test_another_models_larger_tokenizer_is_refused(tmp_path):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models as tkm, pre_tokenizers

    big = Tokenizer(tkm.WordLevel({f"w{i}": i for i in range(VOCAB + 50)}, unk_token="w0"))
    big.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=big, unk_token="w0")
    with pytest.raises(InvalidSetting, match=f"the tokenizer has {VOCAB + 50} ids but the model takes {VOCAB}"):
        export_onnx(tiny_model("llama"), tmp_path / "out", tokenizer=tok)
    assert not (tmp_path / "out").exists()


def test_a_float_export_records_no_accuracy_level(tmp_path):
    out = export_onnx(tiny_model("llama"), tmp_path / "o")  # no 4-bit projection for a level to apply to
    w = json.loads((out / "pyshrink_onnx.json").read_text())["weights"]
    assert w["accuracy_level"] is None and w["projections"].get("copied", 0) + w["projections"].get("rtn", 0) == 0


