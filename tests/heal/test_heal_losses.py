import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from pyshrink.heal.losses import distillation_loss, hidden_mse, next_token_ce, softened_kl
from pyshrink.heal.trainer import HealConfig, WindowOrder, lr_at


def test_softened_kl_is_zero_for_identical_logits_and_matches_the_definition():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    assert softened_kl(t.clone(), t, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    T = 3.0
    p, q = F.softmax(t / T, -1), F.softmax(s / T, -1)
    manual = (p * (p.log() - q.log())).sum(-1).mean() * T * T
    assert softened_kl(s, t, T).item() == pytest.approx(manual.item(), rel=1e-5)


def test_loss_mixes_kl_and_ce_and_only_the_student_gets_gradients():
    torch.manual_seed(0)
    ids = torch.randint(0, 11, (2, 5))
    s = torch.randn(2, 5, 11, requires_grad=True)
    t = torch.randn(2, 5, 11)
    out_s, out_t = SimpleNamespace(logits=s), SimpleNamespace(logits=t)
    loss, parts = distillation_loss(out_s, out_t, ids, temperature=2.0, alpha=0.25)
    expected = 0.25 * softened_kl(s, t, 2.0) + 0.75 * next_token_ce(s, ids)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert set(parts) == {"ce", "kl", "loss"}
    loss.backward()
    assert s.grad is not None and not t.requires_grad
    # alpha = 0 is plain fine-tuning: no teacher needed at all
    loss0, parts0 = distillation_loss(out_s, None, ids, temperature=2.0, alpha=0.0)
    assert loss0.item() == pytest.approx(next_token_ce(s, ids).item()) and "kl" not in parts0


def test_hidden_mse_ignores_scale_and_skips_the_embedding_output():
    torch.manual_seed(0)
    h = [torch.randn(1, 4, 8) for _ in range(3)]
    scaled = [h[0] + 1.0] + [x * 7.0 for x in h[1:]]
    assert hidden_mse(scaled, h).item() == pytest.approx(0.0, abs=1e-6)
    assert hidden_mse([h[0], h[2], h[1]], h).item() > 0.1


def test_learning_rate_warms_up_then_decays():
    cfg = HealConfig(tokens=100 * 512 * 4, lr=1e-3, warmup=0.1, schedule="cosine")
    assert cfg.total_steps == 100
    lrs = [lr_at(cfg, s) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] == pytest.approx(1e-4, rel=0.05)
    assert lr_at(HealConfig(tokens=cfg.tokens, lr=1e-3, schedule="constant", warmup=0), 50) == 1e-3


def test_window_order_is_a_seeded_permutation_per_epoch():
    a, b = WindowOrder(7, seed=3), WindowOrder(7, seed=3)
    first = a.take(0, 7)
    assert sorted(first.tolist()) == list(range(7))
    assert torch.equal(a.take(3, 9), b.take(3, 9))  # any position, any instance: same windows
    assert not torch.equal(a.take(7, 7), first)  # the next epoch is shuffled differently
    assert not torch.equal(WindowOrder(7, seed=4).take(0, 7), first)
    assert math.isfinite(float(first.float().mean()))


def test_topk_kl_is_exact_with_the_whole_vocabulary_and_a_lower_bound_otherwise():
    from pyshrink.heal.losses import topk_kl

    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11) * 3
    logp = F.log_softmax(t / 2.0, -1)
    full = softened_kl(s, t, 2.0).item()
    top = logp.topk(11, -1)
    assert topk_kl(s, top.values, top.indices, 2.0).item() == pytest.approx(full, rel=1e-5)
    top = logp.topk(3, -1)
    assert 0 < topk_kl(s, top.values, top.indices, 2.0).item() <= full + 1e-6


def test_pyshrink_heal_is_callable_however_it_was_imported():
    import pyshrink
    import pyshrink.heal as module
    from pyshrink.errors import InvalidSetting

    assert callable(pyshrink.heal) and callable(module) and module.iterative_contract is not None
    with pytest.raises(InvalidSetting, match="tokens"):
        pyshrink.heal(None, None, "text\n", tokens=0)
