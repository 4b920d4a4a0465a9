import copy
import json

import pytest
import torch
import torch.nn.functional as F

from heal_helpers import SEQ
from pyshrink import data, models
from pyshrink.evaluate import perplexity
from pyshrink.heal import heal

TINY = dict(seq_len=SEQ, batch_size=4, grad_accum=2, eval_tokens=512, lr=3e-3, progress=False)


def _kl(student, teacher, ids):
    win = data.windows(ids, SEQ)[:16]
    with torch.no_grad():
        s, t = student(input_ids=win).logits, teacher(input_ids=win).logits
    return F.kl_div(F.log_softmax(s, -1).flatten(0, 1), F.log_softmax(t, -1).flatten(0, 1), log_target=True,
                    reduction="batchmean").item()


def test_distillation_lowers_the_loss_and_brings_the_student_to_the_teacher(student, teacher, tokenizer, texts):
    ids = data.tokenize(tokenizer, texts["eval"])
    kl_before = _kl(student, teacher, ids)
    losses = []
    r = heal((student, tokenizer), (teacher, tokenizer), texts["train"], eval_text=texts["eval"], tokens=40 * 256,
             alpha=1.0, temperature=1.0, until_ppl=0, callback=lambda info: losses.append(info["kl"]), **TINY)
    assert r.steps == 40 and r.stopped == "budget"
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert _kl(r.model, teacher, ids) < 0.5 * kl_before
    assert r.ppl_best < r.ppl_initial


def test_teacher_is_frozen_and_untouched(student, teacher, tokenizer, texts):
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    seen = []

    def check(info):
        seen.append(all(not p.requires_grad and p.grad is None for p in teacher.parameters()) and not teacher.training)

    heal((student, tokenizer), (teacher, tokenizer), texts["train"], eval_text=texts["eval"], tokens=6 * 256,
         until_ppl=0, callback=check, **TINY)
    assert seen and all(seen)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert all(p.requires_grad for p in teacher.parameters())  # the caller's flags come back


def test_only_chosen_student_weights_train(student, teacher, tokenizer, texts):
    before = {k: v.clone() for k, v in student.state_dict().items()}
    r = heal((student, tokenizer), (teacher, tokenizer), texts["train"], eval_text=texts["eval"], tokens=4 * 256,
             until_ppl=0, trainable="contracted", **TINY)
    changed = {k for k, v in r.model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all(("mlp" in k or "norm" in k) for k in changed)
    assert not any("self_attn" in k or "embed" in k for k in changed)
    assert all(p.requires_grad for p in r.model.parameters()) and not r.model.training


def test_stops_early_once_the_teachers_perplexity_is_reached(student, teacher, tokenizer, texts):
    r = heal((student, tokenizer), (teacher, tokenizer), texts["train"], eval_text=texts["eval"], tokens=200 * 256,
             eval_every=5 * 256, **TINY)
    assert r.stopped == "until_ppl" and r.reached
    assert r.until_ppl == r.ppl_teacher and r.ppl_best <= r.ppl_teacher < r.ppl_initial
    assert r.steps < 200 and r.tokens_seen == r.steps * 256
    assert [p["ppl"] <= r.until_ppl for p in r.curve].index(True) == len(r.curve) - 1  # the first hit stops it


def test_best_checkpoint_is_kept_loadable_and_reported(student, teacher, tokenizer, texts, tmp_path):
    out = tmp_path / "run"
    r = heal((student, tokenizer), (teacher, tokenizer), texts["train"], eval_text=texts["eval"], tokens=12 * 256,
             eval_every=4 * 256, until_ppl=0, out=out, **TINY)
    assert r.path == out / "checkpoint-best" and (out / "checkpoint-last").is_dir()
    loaded, tok = models.load_model(r.path)
    ids = data.tokenize(tok, texts["eval"])[: 16 * SEQ]
    assert perplexity(loaded, ids=ids, seq_len=SEQ, progress=False) == pytest.approx(r.ppl_best, rel=1e-4)
    report = json.loads((out / "heal.json").read_text())
    assert [p["tokens"] for p in report["curve"]] == [0, 1024, 2048, 3072]
    assert report["ppl_best"] == pytest.approx(min(p["ppl"] for p in report["curve"]))
    assert report["held_out_tokens"] == ids.numel()  # the windows ppl_best was measured on, as checked above
    assert (out / "curve.png").stat().st_size > 1000
    assert json.loads((r.path / "pyshrink.json").read_text())["heal"]["held_out_ppl"] == pytest.approx(r.ppl_best)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_the_best_weights_win_when_training_makes_things_worse(student, teacher, tokenizer, texts):
    original = copy.deepcopy(student.state_dict())
    r = heal((student, tokenizer), (teacher, tokenizer), texts["train"], eval_text=texts["eval"], tokens=4 * 256,
             eval_every=2 * 256, until_ppl=0, **{**TINY, "lr": 1.0, "max_grad_norm": 0})
    assert all(p["ppl"] > r.curve[0]["ppl"] for p in r.curve[1:])
    assert r.ppl_best == r.curve[0]["ppl"] and r.best_tokens == 0
    assert all(torch.equal(original[k], v) for k, v in r.model.state_dict().items())


def test_held_out_windows_default_to_the_end_of_the_text(student, teacher, tokenizer, texts):
    r = heal((student, tokenizer), (teacher, tokenizer), texts["train"], tokens=2 * 256, until_ppl=0, **TINY)
    ids = data.tokenize(tokenizer, texts["train"])
    n = ids.numel() // SEQ
    held = ids[(n - 16) * SEQ: n * SEQ]  # eval_tokens=512 -> 16 windows, cut from the end
    assert perplexity(teacher, ids=held, seq_len=SEQ, progress=False) == pytest.approx(r.ppl_teacher, rel=1e-5)


def test_cached_teacher_targets_are_reused_across_heals(trained_teacher, tokenizer, texts):
    from heal_helpers import contract_mlp
    from pyshrink.heal import TeacherCache

    cache = TeacherCache(k=16)
    runs = []
    for _ in range(2):
        student = contract_mlp(copy.deepcopy(trained_teacher), keep=24)
        runs.append(heal((student, tokenizer), (trained_teacher, tokenizer), texts["train"], eval_text=texts["eval"],
                         tokens=4 * 256, until_ppl=0, teacher_cache=cache, **TINY))
    assert cache.misses == 4 * 8 and cache.hits == 4 * 8 and len(cache) == 32  # the 2nd heal never ran the teacher
    assert [p["ppl"] for p in runs[0].curve] == [p["ppl"] for p in runs[1].curve]
    assert runs[0].config["teacher_topk"] == 16 and runs[1].ppl_best < runs[1].ppl_initial


def test_the_contract_hook_heals_in_place_and_is_a_no_op_without_tokens(student, teacher, tokenizer, texts):
    from pyshrink.errors import DataError
    from pyshrink.heal import heal_in_place

    assert heal_in_place(student, tokenizer, teacher=(teacher, tokenizer), text=None, tokens=None) is None
    with pytest.raises(DataError, match="calibration"):
        heal_in_place(student, tokenizer, teacher=(teacher, tokenizer), text=None, tokens=256)
    before = student.model.layers[0].mlp.up_proj.weight.clone()
    s = heal_in_place(student, tokenizer, teacher=(teacher, tokenizer), text=texts["train"], tokens=2 * 256,
                      until_ppl=0, **{k: v for k, v in TINY.items() if k != "progress"})
    assert s["tokens_seen"] == 512 and s["ppl_best"] < s["ppl_initial"] and len(s["curve"]) >= 2
    assert not torch.equal(before, student.model.layers[0].mlp.up_proj.weight)  # the caller's model was healed
