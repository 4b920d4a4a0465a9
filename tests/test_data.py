from pathlib import Path

import pytest
import torch

from pyshrink import data
from pyshrink.errors import DataError, InvalidSetting, ModelLoadError


def test_read_texts_joins_files_and_strings(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("hello")
    assert data.read_texts([f, "world\n"]) == "hello\nworld\n"


@pytest.mark.parametrize("content", ["", "  \n\t"])
def test_empty_text_is_an_error(tmp_path, content):
    f = tmp_path / "empty.txt"
    f.write_text(content)
    with pytest.raises(DataError, match="empty"):
        data.read_texts([f])


def test_a_long_single_line_string_is_text_not_a_path():
    assert data.read_texts("word " * 2000).startswith("word word")


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data.read_texts([tmp_path / "nope.txt"])


@pytest.mark.parametrize("name", ["corpus.csv", "data/wiki", "nope"])
def test_a_misspelt_file_name_is_reported_not_read_as_text(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    source = Path(name) if name == "nope" else name  # a Path is always a file, even without a suffix
    with pytest.raises(DataError, match=f"text file {name} does not exist"):
        data.read_texts([source])


def test_only_utf8_text_is_read(tmp_path):
    cases = {"latin1.txt": ("café au lait".encode("latin-1"), r"latin1.txt is not UTF-8 text: byte 0xe9 at offset 3"),
             "utf16.txt": ("some text".encode("utf-16"), r"is not UTF-8 text \(it looks like UTF-16\)"),
             "random.bin": (bytes(range(256)) * 4, r"random.bin (is not UTF-8 text|holds a NUL)"),
             "nul.txt": (b"text\x00more", r"nul.txt holds a NUL character \(at 4\)")}
    for name, (raw, message) in cases.items():
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(DataError, match=message):
            data.read_texts(tmp_path / name)
    (tmp_path / "bom.txt").write_bytes("\ufeffw1 w2".encode("utf-8"))
    assert data.read_texts(tmp_path / "bom.txt") == "w1 w2"  # a UTF-8 byte-order mark is not text


def test_a_pipe_is_read_like_a_file(tmp_path):
    import os
    import threading

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # what <(cat file) gives a command

    def write():
        with open(fifo, "w", encoding="utf-8") as f:
            f.write("w1 w2 w3")

    t = threading.Thread(target=write, daemon=True)  # daemon: a failing read must not hang the run
    t.start()
    assert data.read_texts(fifo) == "w1 w2 w3"
    t.join(timeout=10)


def test_a_folder_is_an_error(tmp_path):
    with pytest.raises(DataError, match="is a folder"):
        data.read_texts([tmp_path])
    with pytest.raises(DataError, match="is a folder"):
        data.read_texts(str(tmp_path))


@pytest.mark.parametrize("literal", ["The cat sat on the mat.", "3.14", "e.g.", "word " * 100])
def test_one_line_texts_that_read_as_no_file_name_are_text(literal):
    assert data.read_texts(literal) == literal


def test_windows_and_their_error():
    ids = torch.arange(100)
    w = data.windows(ids, 32)
    assert w.shape == (3, 32) and w[1, 0] == 32
    assert data.windows(ids, 32, max_tokens=40).shape == (1, 32)
    with pytest.raises(DataError, match="at least 256"):
        data.windows(ids, 128, min_windows=2)
    for few in (0, -5, 31):  # fewer tokens than one window: an error, not a silently larger window
        with pytest.raises(InvalidSetting, match=f"at most {few} tokens of the text .* one window of 32"):
            data.windows(ids, 32, max_tokens=few)


def test_builtin_texts_are_real_text():
    assert len(data.builtin_text("pydoc")) > 100_000
    assert "def " in data.builtin_text("stdlib-code")
    with pytest.raises(DataError, match="unknown built-in"):
        data.builtin_text("klingon")


@pytest.mark.parametrize("bad,got", [(torch.arange(4), "Tensor"), ([b"bytes"], "bytes"), (42, "int"),
                                     ({"a text": 1}, "dict"), ({"a", "b"}, "set")])
def test_read_texts_names_what_is_not_text(bad, got):
    with pytest.raises(DataError, match=f"text must be a string, a file path, or a list of them; got a {got}"):
        data.read_texts(bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool])
def test_ids_must_be_an_integer_tensor(dtype):
    with pytest.raises(DataError, match=f"the calibration text must be token ids \\(an integer tensor\\), got a {dtype}"):
        data.as_ids(torch.zeros(8, dtype=dtype), "calibration text")
    assert data.as_ids(torch.arange(5, dtype=torch.int32), "x").dtype == torch.long


def test_windows_refuse_ids_the_model_does_not_know():
    ids = torch.arange(64)
    assert data.windows(ids, 16, vocab=64).shape == (4, 16)
    for bad, span in ((torch.arange(65), "0..64"), (torch.arange(-1, 63), "-1..62")):
        with pytest.raises(DataError, match=f"the eval text has token ids {span}, but the model knows ids 0..63"):
            data.windows(bad, 16, what="eval text", vocab=64)


def test_read_texts_takes_any_iterable_of_files(tmp_path):
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text(name[0])
    assert sorted(data.read_texts(tmp_path.glob("*.txt")).split("\n")) == ["a", "b"]  # a generator
    with open(tmp_path / "a.txt") as f, pytest.raises(DataError, match="got a TextIOWrapper"):
        data.read_texts(f)  # an open file's lines are not a list of texts: pass its path


def test_describe_names_files_and_counts_literal_text(tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text("x")
    one_line = "the quick brown fox " * 500  # no newline: still text, and not to be copied into a summary
    assert data.describe([str(f), one_line, "a\nb"]) == f"{f}, <text, {len(one_line)} chars>, <text, 3 chars>"
    assert data.describe(f) == str(f)


def test_text_without_a_tokenizer_is_an_error():
    """A folder saved without a tokenizer loads with None; reading text with it says so (it was a TypeError)."""
    with pytest.raises(ModelLoadError, match="no tokenizer"):
        data.tokenize(None, "some text")
