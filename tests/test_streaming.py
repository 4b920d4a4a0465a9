"""pyshrink.streaming: a model whose blocks are loaded one at a time, and its output written one block at a time."""
import json

import pytest
import torch

from pyshrink import models
from pyshrink.errors import ModelLoadError
from pyshrink.layerwise import BlockInputs, capture_block_inputs
from pyshrink.streaming import Replay, ShardWriter, StreamedModel, saved_tensors, stack_replaced
from tiny import FAMILIES, random_ids, tiny_model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("streamed")
    return {f: models.save(tiny_model(f), None, root / f) for f in FAMILIES}


def _meta_blocks(streamed) -> list:
    return [all(p.is_meta for p in b.parameters()) for b in streamed.blocks]


@pytest.mark.parametrize("family", FAMILIES)
def test_only_what_lies_outside_the_blocks_is_loaded_until_a_block_is_asked_for(folders, family):
    full = models.load_model(folders[family], with_tokenizer=False)
    streamed = StreamedModel(folders[family])
    assert _meta_blocks(streamed) == [True] * len(streamed.blocks)
    prefix = streamed.blocks_name + "."
    expected = full.state_dict()
    for k, v in streamed.model.state_dict().items():
        if not k.startswith(prefix):
            assert not v.is_meta and torch.equal(v, expected[k]), k
    head, emb = streamed.adapter.output_head(streamed.model), streamed.adapter.embedding(streamed.model)
    if getattr(full.config, "tie_word_embeddings", False) and head is not None:
        assert head.weight is emb.weight  # the tie is restored, not a copy
    block = streamed.load_block(1)
    assert _meta_blocks(streamed) == [i != 1 for i in range(len(streamed.blocks))]
    for k, v in block.state_dict(prefix=f"{prefix}1.").items():
        assert torch.equal(v, expected[k]), k
    streamed.free_block(1)
    assert all(_meta_blocks(streamed))


@pytest.mark.parametrize("family", FAMILIES)
def test_the_models_forward_around_replayed_hidden_states_gives_the_full_models_outputs(folders, family):
    """What streamed runs measure perplexity with: blocks run one at a time, the rest by the model's forward."""
    full = models.load_model(folders[family], with_tokenizer=False)
    streamed = StreamedModel(folders[family])
    ids = random_ids(3, 12)
    inputs = capture_block_inputs(streamed.model, streamed.adapter, [ids[:2], ids[2:]])
    hidden, as_tuple = inputs.hidden, None
    with torch.no_grad():
        for i in range(len(streamed.blocks)):
            block = streamed.load_block(i)
            as_tuple = isinstance(block(inputs.hidden[0], *inputs.args[0], **inputs.kwargs[0]), tuple)
            hidden = BlockInputs(hidden, inputs.args, inputs.kwargs).run(block)
            streamed.free_block(i)
        with stack_replaced(streamed.blocks, Replay(hidden, as_tuple)):
            got = streamed.model(input_ids=ids)  # one batch of 3 where the blocks saw 2 + 1: rows are replayed in order
        want = full(input_ids=ids)
    key = "logits" if getattr(want, "logits", None) is not None else "last_hidden_state"
    torch.testing.assert_close(getattr(got, key), getattr(want, key), rtol=1e-5, atol=1e-5)
    assert len(streamed.blocks) == full.config.num_hidden_layers  # the stack is put back


def test_a_replay_that_does_not_fit_the_batch_is_an_error():
    replay = Replay([torch.zeros(2, 5, 4)], as_tuple=False)
    with pytest.raises(RuntimeError, match="do not fit the batch"):
        replay(torch.zeros(2, 6, 4))


def test_shards_load_as_a_sharded_save(tmp_path):
    model = tiny_model("llama")
    writer = ShardWriter(tmp_path, 2)
    state = model.state_dict()
    writer.write(saved_tensors(model.model.layers, "model.layers.", torch.bfloat16))
    with pytest.raises(RuntimeError, match="wrote 1 of its 2 parts"):
        writer.finish()
    writer.write({k: v for k, v in state.items() if not k.startswith("model.layers.") and k != "lm_head.weight"})
    writer.finish()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    back = models.read_state_dict(tmp_path)
    assert back.keys() == state.keys() - {"lm_head.weight"}  # tied: saved once
    assert back["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16  # parameters in the dtype asked for
    torch.testing.assert_close(back["model.layers.0.mlp.up_proj.weight"].float(),
                               state["model.layers.0.mlp.up_proj.weight"], rtol=1e-2, atol=1e-2)
    with pytest.raises(RuntimeError, match="told of 2 parts"):
        writer.write({})


def test_a_source_that_is_not_a_safetensors_folder_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="local folder of .safetensors files, and smollm2-135m is an embedded"):
        StreamedModel("smollm2-135m")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match="is a GGUF file"):
        StreamedModel(gguf)


def test_a_missing_tensor_is_named(folders, tmp_path):
    from safetensors.torch import load_file, save_file

    out = models.save(tiny_model("gpt2"), None, tmp_path / "m")
    sd = load_file(out / "model.safetensors")
    save_file({k: v for k, v in sd.items() if k != "transformer.h.2.mlp.c_fc.weight"}, out / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"missing \['transformer.h.2.mlp.c_fc.weight'\]"):
        StreamedModel(out)


def test_a_truncated_checkpoint_is_named(tmp_path):
    out = models.save(tiny_model("llama"), None, tmp_path / "m")
    f = out / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="model.safetensors is corrupt or truncated"):
        StreamedModel(out)
