import copy
import math

import pytest
import torch
import transformers as tf

from heal_helpers import SEQ, word_tokenizer
from pyshrink.errors import DataError, InvalidSetting, PyshrinkError
from pyshrink.heal import IncompatibleModels, heal
from tiny import tiny_model

TINY = dict(seq_len=SEQ, batch_size=4, grad_accum=2, eval_tokens=512, progress=False, tokens=256)


@pytest.mark.parametrize("tokens", [0, -100, 1.5, True])
def test_a_budget_that_is_not_a_positive_integer_is_refused(student, teacher, tokenizer, texts, tokens):
    with pytest.raises(InvalidSetting, match="tokens"):
        heal((student, tokenizer), (teacher, tokenizer), texts["train"], **{**TINY, "tokens": tokens})


@pytest.mark.parametrize("setting", [{"alpha": 1.5}, {"temperature": 0}, {"lr": -1.0}, {"schedule": "step"},
                                     {"trainable": "attention"}, {"seq_len": 1}, {"seq_len": 1 << 19},
                                     {"grad_accum": 0}, {"lr": "1e-3"}, {"alpha": None}])
def test_bad_settings_are_refused(student, teacher, tokenizer, texts, setting):
    with pytest.raises(InvalidSetting):
        heal((student, tokenizer), (teacher, tokenizer), texts["train"], **{**TINY, **setting})


def test_different_vocabularies_are_refused(student, tokenizer, texts):
    cfg = tf.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    other = tf.LlamaForCausalLM(cfg).eval()
    with pytest.raises(IncompatibleModels, match="different vocabularies"):
        heal((student, tokenizer), (other, tokenizer), texts["train"], **TINY)


def test_a_vocabulary_pruned_student_is_told_to_heal_before_pruning(teacher, tokenizer, texts):
    cfg = tf.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    pruned = tf.LlamaForCausalLM(cfg).eval()  # fewer tokens than the teacher, as after --prune-vocab
    with pytest.raises(IncompatibleModels, match="different vocabularies.*--heal-tokens N --prune-vocab"):
        heal((pruned, tokenizer), (teacher, tokenizer), texts["train"], **TINY)


def test_the_default_window_fits_the_students_positions(student, teacher, tokenizer, texts):
    kw = {k: v for k, v in TINY.items() if k != "seq_len"}
    r = heal((student, tokenizer), (teacher, tokenizer), texts["train"], **{**kw, "tokens": 256 * 8})
    assert r.config["seq_len"] == student.config.max_position_embeddings == 256  # 512 shortened, as eval does
    assert repr(r).startswith("HealResult(out=None, stopped=") and "Linear" not in repr(r)  # no module tree
    with pytest.raises(InvalidSetting, match="seq_len must be in 2..256, got 257"):
        heal((student, tokenizer), (teacher, tokenizer), texts["train"], **{**kw, "seq_len": 257})


def test_an_existing_output_is_refused_before_any_model_is_loaded(tokenizer, texts, tmp_path):
    (tmp_path / "out").mkdir()  # even empty, as every command refuses an existing output
    missing = tmp_path / "not-a-model"  # loading it would fail: the output check must come first
    with pytest.raises(FileExistsError, match="already exists"):
        heal(str(missing), str(missing), texts["train"], out=tmp_path / "out", **TINY)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        heal(str(missing), str(missing), texts["train"], out=tmp_path / "file", overwrite=True, **TINY)
    assert (tmp_path / "file").read_text() == "x" and not any((tmp_path / "out").iterdir())


def test_same_size_but_different_tokenizers_are_refused(student, teacher, tokenizer, texts):
    with pytest.raises(IncompatibleModels, match="different tokenizers"):
        heal((student, tokenizer), (teacher, word_tokenizer("v")), texts["train"], **TINY)


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_a_quantized_model_is_refused(student, teacher, tokenizer, texts, role):
    from pyshrink import quantize

    pair = {"student": copy.deepcopy(student), "teacher": copy.deepcopy(teacher)}
    quantize(pair[role], bits=4, group_size=32, method="rtn")
    with pytest.raises(InvalidSetting, match=f"the {role} is quantized"):
        heal((pair["student"], tokenizer), (pair["teacher"], tokenizer), texts["train"], **TINY)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_16_bit_student_is_refused_but_a_16_bit_teacher_is_not(student, teacher, tokenizer, texts, dtype):
    low = copy.deepcopy(student).to(dtype)
    with pytest.raises(InvalidSetting, match=f"float32, but its weights are {str(dtype)[6:]}.*student.float"):
        heal((low, tokenizer), (teacher, tokenizer), texts["train"], **TINY)
    res = heal((copy.deepcopy(student), tokenizer), (copy.deepcopy(teacher).to(dtype), tokenizer), texts["train"],
               **TINY)
    assert math.isfinite(res.ppl_best)


def test_a_student_that_is_not_smaller_is_refused(teacher, tokenizer, texts):
    with pytest.raises(IncompatibleModels, match="not smaller"):
        heal((copy.deepcopy(teacher), tokenizer), (teacher, tokenizer), texts["train"], **TINY)


def test_empty_or_too_short_text_is_refused(student, teacher, tokenizer, texts, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(DataError, match="empty"):
        heal((student, tokenizer), (teacher, tokenizer), [empty], **TINY)
    with pytest.raises(DataError, match="at least"):
        heal((student, tokenizer), (teacher, tokenizer), "w3 w4 w5\nw6", **TINY)
    with pytest.raises(DataError):
        heal((student, tokenizer), (teacher, tokenizer), None, **TINY)


def test_encoders_and_resume_without_output_are_refused(student, teacher, tokenizer, texts):
    with pytest.raises(InvalidSetting, match="decoder"):
        heal((tiny_model("bert"), tokenizer), (tiny_model("bert"), tokenizer), texts["train"], **TINY)
    with pytest.raises(InvalidSetting, match="resume"):
        heal((student, tokenizer), (teacher, tokenizer), texts["train"], resume=True, **TINY)
    assert issubclass(IncompatibleModels, PyshrinkError)


def test_an_output_that_overlaps_a_model_folder_is_refused_before_anything_is_deleted(student, teacher, tokenizer,
                                                                                         texts, tmp_path):
    from pyshrink import models

    src = tmp_path / "runs" / "contracted"
    models.save(student, tokenizer, src)
    files = sorted(p.name for p in src.iterdir())
    for out in (tmp_path / "runs", src, src / "healed"):
        with pytest.raises(InvalidSetting, match="overlaps the source"):
            heal(str(src), (teacher, tokenizer), texts["train"], out=out, overwrite=True, **TINY)
    assert sorted(p.name for p in src.iterdir()) == files



def test_teacher_topk_with_a_hidden_state_loss_is_refused(student, teacher, tokenizer, texts):
    with pytest.raises(InvalidSetting, match="teacher_topk.*hidden_weight"):
        heal((student, tokenizer), (teacher, tokenizer), texts["train"], teacher_topk=8, hidden_weight=0.1, **TINY)


@pytest.mark.parametrize("norm", [-1.0, float("nan")])
def test_a_bad_max_grad_norm_is_refused(student, teacher, tokenizer, texts, norm):
    with pytest.raises(InvalidSetting, match="max_grad_norm"):
        heal((student, tokenizer), (teacher, tokenizer), texts["train"], max_grad_norm=norm, **TINY)



def test_healing_ids_must_be_integer_ids_the_models_know(student, teacher, tokenizer):
    with pytest.raises(DataError, match="the healing text must be token ids \\(an integer tensor\\), got a torch.float32"):
        heal((student, tokenizer), (teacher, tokenizer), torch.rand(4000) * 100, **TINY)
    too_big = torch.full((4000,), student.config.vocab_size)
    with pytest.raises(DataError, match=r"the healing text has token ids \d+\.\.\d+, but the model knows ids 0\.\."):
        heal((student, tokenizer), (teacher, tokenizer), too_big, **TINY)
