import math

import pytest
import torch

from pyshrink.errors import InvalidSetting
from pyshrink.evaluate import embeddings, perplexity
from tiny import random_ids, tiny_model


def test_perplexity_matches_the_models_own_loss():
    model = tiny_model("llama")
    ids = random_ids(1, 96, seed=3).flatten()
    ppl = perplexity(model, ids=ids, seq_len=32, batch_size=2, progress=False)
    losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in ids.view(3, 32)]
    assert math.isclose(ppl, math.exp(sum(losses) / 3), rel_tol=1e-5)


def test_uniform_predictions_give_perplexity_equal_to_the_vocabulary_size():
    model = tiny_model("gpt2")
    with torch.no_grad():
        model.lm_head.weight.zero_()  # tied with the input embedding: all logits are 0
    ppl = perplexity(model, ids=random_ids(1, 64).flatten(), seq_len=32, progress=False)
    assert math.isclose(ppl, model.config.vocab_size, rel_tol=1e-6)


@pytest.mark.parametrize("seq_len", [0, 1, 2.5])
def test_a_window_that_scores_nothing_is_refused(seq_len):
    with pytest.raises(InvalidSetting, match=r"seq_len must be (an integer )?in 2\.\."):
        perplexity(tiny_model("llama"), ids=random_ids(1, 64).flatten(), seq_len=seq_len, progress=False)


def test_a_window_longer_than_the_position_embeddings_is_refused():
    model = tiny_model("gpt2")
    limit = model.config.n_positions
    with pytest.raises(InvalidSetting, match=rf"seq_len must be in 2\.\.{limit}, got {limit + 1}"):
        perplexity(model, ids=random_ids(1, 4 * limit).flatten(), seq_len=limit + 1, progress=False)


def test_the_default_window_fits_the_models_positions():
    model = tiny_model("gpt2")  # 256 positions: the default 512 is shortened, as pyshrink eval does
    ids = random_ids(1, 2 * 256, seed=5).flatten()
    assert perplexity(model, ids=ids, progress=False) == perplexity(model, ids=ids, seq_len=256, progress=False)


def test_an_encoder_has_no_perplexity():
    with pytest.raises(InvalidSetting, match="needs next-token logits"):
        perplexity(tiny_model("bert"), ids=random_ids(1, 64).flatten(), seq_len=32, progress=False)



def test_embeddings_are_the_mean_pooled_last_hidden_states_of_an_encoder_or_its_task_model():
    import transformers as tf

    base = tiny_model("bert")
    task = tf.BertForSequenceClassification(base.config).eval()
    task.bert.load_state_dict(base.state_dict(), strict=False)  # the pooler is not used by embeddings
    ids = random_ids(5, 12, seed=4)
    with torch.no_grad():
        want = base.double()(input_ids=ids).last_hidden_state.mean(1)
    base.float()
    for model in (base, task):
        got = embeddings(model, ids, batch_size=2)
        assert got.dtype == torch.float32 and got.shape == (5, 64)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_ids_beyond_the_models_vocabulary_are_a_data_error_not_an_index_error():
    from pyshrink.errors import DataError

    model = tiny_model("llama")
    ids = random_ids(1, 64).flatten()
    ids[5] = model.config.vocab_size  # as another model's tokenizer would give
    with pytest.raises(DataError, match=r"token ids \d+\.\.128, but the model knows ids 0\.\.127"):
        perplexity(model, ids=ids, seq_len=32, progress=False)
