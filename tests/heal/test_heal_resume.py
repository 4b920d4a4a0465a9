import copy
import importlib.util
import json

import pytest
import torch

from heal_helpers import SEQ, contract_mlp
from pyshrink import models
from pyshrink.heal import heal
from pyshrink.heal.checkpoint import load_state

TINY = dict(seq_len=SEQ, batch_size=4, grad_accum=2, eval_tokens=512, lr=3e-3, progress=False, until_ppl=0,
            tokens=12 * 256, eval_every=4 * 256)


def _run(trained_teacher, tokenizer, texts, out, **kw):
    student = contract_mlp(copy.deepcopy(trained_teacher), keep=24)
    return heal((student, tokenizer), (trained_teacher, tokenizer), texts["train"], eval_text=texts["eval"], out=out,
                **{**TINY, **kw})


def _interrupt_during_step(at_step):
    """A callback that makes the *next* step's first forward pass raise KeyboardInterrupt (a Ctrl-C mid-step)."""
    def callback(info):
        if info["step"] == at_step:
            def boom(module, args):
                if module.training:
                    raise KeyboardInterrupt
            module = callback.model
            module.register_forward_pre_hook(boom)
    return callback


def test_interrupt_then_resume_equals_an_uninterrupted_run(trained_teacher, tokenizer, texts, tmp_path):
    full = _run(trained_teacher, tokenizer, texts, tmp_path / "full")

    student = contract_mlp(copy.deepcopy(trained_teacher), keep=24)
    cb = _interrupt_during_step(6)
    cb.model = student
    with pytest.raises(KeyboardInterrupt):
        heal((student, tokenizer), (trained_teacher, tokenizer), texts["train"], eval_text=texts["eval"],
             out=tmp_path / "cut", callback=cb, **TINY)
    state, _ = load_state(tmp_path / "cut" / "checkpoint-last")
    assert state["step"] == 6 and state["tokens_seen"] == 6 * 256  # the half-done 7th step is discarded
    assert json.loads((tmp_path / "cut" / "heal.json").read_text())["stopped"] == "interrupted"
    models.load_model(tmp_path / "cut" / "checkpoint-best")  # consistent and loadable
    assert not [p.name for p in (tmp_path / "cut").iterdir() if p.name.startswith(".")]

    steps = []
    resumed = _run(trained_teacher, tokenizer, texts, tmp_path / "cut", resume=True,
                   callback=lambda info: steps.append(info["step"]))
    assert steps == list(range(7, 13))
    assert resumed.steps == full.steps == 12 and resumed.tokens_seen == full.tokens_seen
    assert [p["ppl"] for p in resumed.curve] == [p["ppl"] for p in full.curve]
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    last_a = models.load_model(tmp_path / "full" / "checkpoint-last", with_tokenizer=False).state_dict()
    last_b = models.load_model(tmp_path / "cut" / "checkpoint-last", with_tokenizer=False).state_dict()
    assert all(torch.equal(last_a[k], last_b[k]) for k in last_a)


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # GPT-2 trains with dropout: the generators must resume too
@pytest.mark.parametrize("at_step, how", [(6, "mid-step"), (6, "after the step"), (4, "before its evaluation")])
def test_resume_after_an_interrupt_anywhere_equals_an_uninterrupted_run(trained_teacher, tokenizer, texts, tmp_path,
                                                                        family, at_step, how):
    from tiny import tiny_model

    teacher = trained_teacher if family == "llama" else tiny_model("gpt2")
    assert family == "llama" or teacher.config.resid_pdrop > 0

    def run(out, **kw):
        student = contract_mlp(copy.deepcopy(teacher), keep=24)
        if kw.get("callback") == "mid-step":
            kw["callback"] = _interrupt_during_step(at_step)
            kw["callback"].model = student
        return heal((student, tokenizer), (teacher, tokenizer), texts["train"], eval_text=texts["eval"], out=out,
                    **{**TINY, **kw})

    def after(info):  # a Ctrl-C once the step is done: in the callback, before an evaluation step's evaluation
        if info["step"] == at_step:
            raise KeyboardInterrupt

    full = run(tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", callback="mid-step" if how == "mid-step" else after)
    if importlib.util.find_spec("matplotlib"):  # the curve so far is plotted, as heal.json holds it
        assert (tmp_path / "cut" / "curve.png").stat().st_size > 1000
    assert load_state(tmp_path / "cut" / "checkpoint-last")[0]["step"] == at_step
    resumed = run(tmp_path / "cut", resume=True)
    assert [(p["step"], p["ppl"]) for p in resumed.curve] == [(p["step"], p["ppl"]) for p in full.curve]
    assert (resumed.best_tokens, resumed.ppl_best, resumed.stopped) == (full.best_tokens, full.ppl_best, full.stopped)
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_a_crash_keeps_the_last_good_checkpoint(trained_teacher, tokenizer, texts, tmp_path):
    student = contract_mlp(copy.deepcopy(trained_teacher), keep=24)

    def crash(info):
        if info["step"] == 6:
            raise RuntimeError("out of memory, say")

    with pytest.raises(RuntimeError, match="out of memory"):
        heal((student, tokenizer), (trained_teacher, tokenizer), texts["train"], eval_text=texts["eval"],
             out=tmp_path / "run", callback=crash, **TINY)
    state, _ = load_state(tmp_path / "run" / "checkpoint-last")
    assert state["step"] == 4  # the last evaluation point, written before the crash
    resumed = _run(trained_teacher, tokenizer, texts, tmp_path / "run", resume=True)
    assert resumed.steps == 12 and resumed.stopped == "budget"


def test_resume_refuses_changed_settings_and_existing_outputs(trained_teacher, tokenizer, texts, tmp_path):
    from pyshrink.errors import InvalidSetting

    _run(trained_teacher, tokenizer, texts, tmp_path / "run", tokens=4 * 256)
    with pytest.raises(FileExistsError, match="resume"):
        _run(trained_teacher, tokenizer, texts, tmp_path / "run")
    with pytest.raises(InvalidSetting, match="lr was 0.003"):
        _run(trained_teacher, tokenizer, texts, tmp_path / "run", resume=True, lr=1e-3)
    # a larger budget continues the same run
    r = _run(trained_teacher, tokenizer, texts, tmp_path / "run", resume=True, tokens=8 * 256)
    assert r.steps == 8
    r = _run(trained_teacher, tokenizer, texts, tmp_path / "run", overwrite=True, tokens=2 * 256)
    assert r.steps == 2


def test_resume_refuses_other_text_or_another_teacher(trained_teacher, tokenizer, texts, tmp_path):
    from pyshrink.errors import InvalidSetting

    _run(trained_teacher, tokenizer, texts, tmp_path / "run", tokens=4 * 256)
    student = contract_mlp(copy.deepcopy(trained_teacher), keep=24)
    pair = (student, tokenizer)
    other_eval = dict(eval_text=texts["train"][-3000:])  # another held-out set: its perplexities are not the curve's
    for kw, what in ((other_eval, "training or held-out text"), (dict(eval_tokens=256), "training or held-out text")):
        with pytest.raises(InvalidSetting, match=f"cannot resume with a different {what}"):
            heal(pair, (trained_teacher, tokenizer), texts["train"], out=tmp_path / "run", resume=True,
                 **{**TINY, "eval_text": texts["eval"], **kw})
    other_teacher = copy.deepcopy(trained_teacher)
    with torch.no_grad():
        next(other_teacher.parameters()).add_(0.01)
    with pytest.raises(InvalidSetting, match="cannot resume with a different teacher"):
        heal(pair, (other_teacher, tokenizer), texts["train"], eval_text=texts["eval"], out=tmp_path / "run",
             resume=True, **TINY)
    assert torch.equal(next(student.parameters()), next(contract_mlp(copy.deepcopy(trained_teacher), keep=24)
                                                         .parameters()))  # refused before loading the checkpoint
    # the same text and teacher resume as before
    assert _run(trained_teacher, tokenizer, texts, tmp_path / "run", resume=True, tokens=6 * 256).steps == 6


def test_resume_with_nothing_to_resume_is_an_error(trained_teacher, tokenizer, texts, tmp_path):
    from pyshrink.errors import InvalidSetting

    for out in (tmp_path / "typo", tmp_path / "no-checkpoint"):
        if out.name == "no-checkpoint":
            out.mkdir()
            (out / "notes.txt").write_text("a crash before the first checkpoint leaves a folder like this")
        with pytest.raises(InvalidSetting, match="nothing to resume in .*checkpoint-last/trainer_state.json"):
            _run(trained_teacher, tokenizer, texts, out, resume=True)
    assert not (tmp_path / "typo").exists()


def test_a_kill_between_the_two_renames_of_a_checkpoint_still_resumes(trained_teacher, tokenizer, texts, tmp_path):
    import os
    import shutil

    out = tmp_path / "run"
    _run(trained_teacher, tokenizer, texts, out, tokens=4 * 256)
    for name in ("checkpoint-best", "checkpoint-last"):  # the old one set aside, the new one not yet in place
        stale = out / f".{name}.old-99999"  # an older leftover (by time; its pid sorts last) must not win
        shutil.copytree(out / name, stale)
        os.utime(stale, ns=(1, 1))
        (out / name).rename(out / f".{name}.old-12345")
    r = _run(trained_teacher, tokenizer, texts, out, resume=True, tokens=8 * 256)
    assert r.steps == 8 and (out / "checkpoint-last" / "trainer_state.json").is_file()
    assert r.path == out / "checkpoint-best" and r.path.is_dir()
    assert sorted(p.name for p in out.glob(".checkpoint-*")) == [".checkpoint-best.old-99999",
                                                                 ".checkpoint-last.old-99999"]



def _dropout_pair():
    """A GPT-2 teacher and its contracted student: GPT-2 trains with dropout (0.1), so the random state matters."""
    from tiny import tiny_model

    teacher = tiny_model("gpt2")
    assert teacher.config.resid_pdrop > 0
    return contract_mlp(copy.deepcopy(teacher), keep=48), teacher


def test_a_seed_repeats_a_run_with_dropout_and_leaves_the_callers_generator_alone(tokenizer, texts):
    runs = []
    for seed in (0, 0, 1):
        student, teacher = _dropout_pair()
        torch.manual_seed(123)
        r = heal((student, tokenizer), (teacher, tokenizer), texts["train"], eval_text=texts["eval"], seed=seed,
                 **{**TINY, "tokens": 4 * 256})
        after = torch.rand(4)
        torch.manual_seed(123)
        assert torch.equal(after, torch.rand(4))  # the run drew from its own seeded state, then gave it back
        runs.append(r.model.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])  # the seed reaches the dropout masks


def test_interrupt_then_resume_with_dropout_equals_an_uninterrupted_run(tokenizer, texts, tmp_path):
    kw = dict(eval_text=texts["eval"], **{**TINY, "tokens": 8 * 256, "eval_every": 2 * 256})
    student, teacher = _dropout_pair()
    full = heal((student, tokenizer), (teacher, tokenizer), texts["train"], out=tmp_path / "full", **kw)

    student, teacher = _dropout_pair()
    cb = _interrupt_during_step(5)  # mid-step: dropout has already drawn for the discarded half step
    cb.model = student
    with pytest.raises(KeyboardInterrupt):
        heal((student, tokenizer), (teacher, tokenizer), texts["train"], out=tmp_path / "cut", callback=cb, **kw)
    student, teacher = _dropout_pair()
    resumed = heal((student, tokenizer), (teacher, tokenizer), texts["train"], out=tmp_path / "cut", resume=True,
                   **kw)
    assert resumed.steps == full.steps == 8
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_max_seconds_counts_this_invocation_only(trained_teacher, tokenizer, texts, tmp_path):
    def crash(info):
        if info["step"] == 6:  # after the checkpoint of step 4
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        _run(trained_teacher, tokenizer, texts, tmp_path / "run", callback=crash)
    state_file = tmp_path / "run" / "checkpoint-last" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["seconds"] = 1e6  # as if the earlier invocations had run for days
    state_file.write_text(json.dumps(state))
    resumed = _run(trained_teacher, tokenizer, texts, tmp_path / "run", resume=True, max_seconds=3600)
    assert resumed.stopped == "budget" and resumed.steps == 12


def test_a_run_whose_time_runs_out_on_its_last_step_has_spent_its_budget(trained_teacher, tokenizer, texts, tmp_path):
    """It said stopped "time", as if a resume would train on; the resume then stopped at once with "budget"."""
    r = _run(trained_teacher, tokenizer, texts, tmp_path / "run", tokens=TINY["batch_size"] * TINY["grad_accum"] * SEQ,
             max_seconds=0)
    assert r.steps == 1 and r.stopped == "budget"
    assert json.loads((tmp_path / "run" / "heal.json").read_text())["stopped"] == "budget"


def test_a_larger_budget_on_resume_continues_the_decay_instead_of_jumping_back_up(trained_teacher, tokenizer,
                                                                                 texts, tmp_path):
    from pyshrink.heal.trainer import HealConfig, lr_at

    first, second = [], []
    _run(trained_teacher, tokenizer, texts, tmp_path / "run", tokens=6 * 256, eval_every=2 * 256,
         callback=lambda info: first.append(info["lr"]))
    # extend a run that finished its 6 steps: the 4 new steps continue from the rate it ended at
    _run(trained_teacher, tokenizer, texts, tmp_path / "run", resume=True, tokens=10 * 256, eval_every=2 * 256,
         callback=lambda info: second.append(info["lr"]))
    lr, floor = TINY["lr"], 0.1 * TINY["lr"]  # the cosine schedule ends at a tenth of the peak
    assert first == [lr_at(HealConfig(tokens=6 * 256, lr=lr, seq_len=TINY["seq_len"], batch_size=4, grad_accum=2), i)
                     for i in range(6)]
    assert len(second) == 4 and all(floor - 1e-12 <= x <= first[-1] + 1e-12 for x in second)
    assert all(a >= b - 1e-12 for a, b in zip(second, second[1:]))


def test_the_teacher_digest_reads_large_tensors_and_tells_teachers_apart():
    from pyshrink.heal.trainer import teacher_digest

    big = torch.nn.Embedding(2**24 + 4, 1)  # a float32 index grid rounds n - 1 = 2^24 + 3 up to n, past the end
    d = teacher_digest(big)
    assert d == teacher_digest(copy.deepcopy(big))
    with torch.no_grad():
        big.weight[-1] += 1.0  # the last value is always one of the sampled ones
    assert teacher_digest(big) != d
