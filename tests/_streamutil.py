"""What the streamed-quantize and streamed-contract tests share: the source folders, the folder comparison, and the
probes that count blocks in memory and fail a run part way."""
import json

import pytest
import torch

from _quantutil import FAMILY_NAMES, tiny_model, word_text, word_tokenizer
from pyshrink import models
from pyshrink.streaming import ShardWriter, StreamedModel


def make_sources(root):
    """Calibration text, one folder per tiny family, and a bfloat16 Llama, under ``root``."""
    (root / "calib.txt").write_text(word_text(6000))
    for family in FAMILY_NAMES:
        models.save(tiny_model(family), word_tokenizer(), root / family)
    models.save(tiny_model("llama").to(torch.bfloat16), word_tokenizer(), root / "llama-bf16")
    return root


def assert_same_folders(a, b):
    """The same tensors (bit for bit, and dtype) and the same config files in two model folders."""
    da, db = models.read_state_dict(a), models.read_state_dict(b)
    assert da.keys() == db.keys()
    for k in da:
        assert da[k].dtype == db[k].dtype and torch.equal(da[k], db[k]), k
    for f in ("config.json", "generation_config.json"):
        if (a / f).exists() or (b / f).exists():
            assert json.loads((a / f).read_text()) == json.loads((b / f).read_text()), f
    return tuple(json.loads((x / models.META_FILE).read_text()) for x in (a, b))


def count_blocks_in_memory(monkeypatch):
    """A list that gets, at every block load, how many blocks then hold real (not meta) weights."""
    loaded_at_once = []
    real_load = StreamedModel.load_block

    def load_block(self, i):
        block = real_load(self, i)
        loaded_at_once.append(sum(not all(p.is_meta for p in b.parameters()) for b in self.blocks))
        return block

    monkeypatch.setattr(StreamedModel, "load_block", load_block)
    return loaded_at_once


def fail_at_second_shard(monkeypatch):
    """Make the second shard write fail as a full disk would."""
    real_write = ShardWriter.write

    def write(self, tensors):
        if self.written == 1:
            raise OSError("disk full")
        real_write(self, tensors)

    monkeypatch.setattr(ShardWriter, "write", write)


def assert_one_block_at_a_time(source, monkeypatch, run, loads: int):
    """``run()`` loads blocks ``loads`` times, never with another block in memory, and leaves ``source`` as it was."""
    loaded_at_once = count_blocks_in_memory(monkeypatch)
    before = models.fingerprint(source)
    run()
    assert loaded_at_once == [1] * loads
    assert models.fingerprint(source) == before


def assert_a_failure_leaves_nothing(out, monkeypatch, run):
    """``run()``, failing at its second shard, leaves neither ``out`` nor a temporary folder beside it."""
    fail_at_second_shard(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        run()
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}*"))
