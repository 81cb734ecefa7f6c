"""Reading training text: local .txt / .jsonl / .parquet files and directories of them, and
Hugging Face `datasets` names (streamed; needs a network and the `datasets` package).

Each reader yields documents (strings). Problems name the file, and the line where one applies.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from encdec.data.corpus import CORPORA
from encdec.errors import EncdecError
from encdec.files import open_named, open_regular, parse_json

SUFFIXES = (".txt", ".jsonl", ".parquet")
ACCEPTED = ("a .txt, .jsonl (one JSON object per line with a text field) or .parquet file, a directory of them, "
            f"hf:NAME, or packaged text: {', '.join(f'corpus:{name}' for name in CORPORA)}")
BOM = b"\xef\xbb\xbf"  # UTF-8's byte-order mark
# a .txt paragraph is cut into documents of about this many characters, at line ends: a file with no blank line (a
# sentence a line) was one document, held whole and tokenized in one call (tens of GB for a GB of text); a tokenizer
# call takes ~130 bytes a character (SmolLM2's): 16 M characters, 2 GB, so 4 M
MAX_PARAGRAPH_CHARS = 1 << 22
CHUNK_BYTES = 1 << 20  # what the .txt reader reads at a time
log = logging.getLogger("encdec")
_SAID: set[tuple[Path, tuple[str, ...]]] = set()  # directories whose left-out files were named (once per run)


def data_files(directory: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """The files below `directory` with one of `suffixes` (in any case), sorted, following linked folders (each
    real folder once: a link loop ends); hidden files and folders (`.ipynb_checkpoints/`, `.git/`) are left out:
    their copies would train twice. Other files are left out with one line naming their kinds, and links that lead
    nowhere by name; a folder that cannot be read stops it (its files would be left out unseen)."""
    found, skipped, broken, visited, top = [], set(), [], set(), os.path.realpath(directory)

    def unreadable(e: OSError) -> None:
        raise EncdecError(f"cannot read {e.filename} ({e.strerror or e}), a folder of the data {directory}")

    for root, folders, files in os.walk(directory, followlinks=True, onerror=unreadable):
        real = os.path.realpath(root)
        if real in visited:
            folders[:] = []
            continue
        visited.add(real)
        # a link to a folder inside the directory is left to the folder itself (the order stays the folders' own),
        # unless a hidden folder holds it (train -> .store/v1: read nowhere else); one to a folder that holds the
        # directory (its parent: a loop) too, which read the folders beside it (valid/)
        folders[:] = sorted(f for f in folders if not f.startswith(".")
                            and not (os.path.islink(os.path.join(root, f))
                                     and _walked(os.path.realpath(os.path.join(root, f)), top)))
        for name in files:
            path = Path(root) / name
            if not name.startswith(".") and path.is_symlink() and not path.exists():
                broken.append(str(path.relative_to(directory)))
            if name.startswith(".") or not path.is_file():
                continue
            if path.suffix.lower() in suffixes:
                found.append(path)
            else:
                skipped.add("".join(path.suffixes[-2:]).lower() or "no suffix")
    said = (directory.resolve(), suffixes)
    if (skipped or broken) and found and said not in _SAID:  # listed again for reading after the cache key: once
        _SAID.add(said)
        links = f"; links that lead nowhere: {', '.join(sorted(broken)[:5])}" if broken else ""
        log.warning("%s: reading its %s files only; left out: %s files%s", directory, ", ".join(suffixes),
                    ", ".join(sorted(skipped)) or "no other", links)
    return sorted(found)


def _walked(path: str, top: str) -> bool:
    """Whether the walk of `top` reaches the folder `path` without a link: `top` itself, a folder inside it that no
    hidden folder holds, or one that holds `top`."""
    shared = os.path.commonpath([path, top])
    if shared == path:
        return True
    return shared == top and not any(part.startswith(".") for part in Path(os.path.relpath(path, top)).parts)


def _txt(path: Path) -> Iterator[str]:
    """Documents of a text file are its paragraphs (separated by blank lines, or a page's form feed), with
    Windows' and old Macs' line ends read as newlines: the same text saved anywhere gives the same tokens.

    Read CHUNK_BYTES at a time, a paragraph at a time: a file of gigabytes is never held whole (nor is a corpus:
    `encdec.data.tokens` tokenizes documents as they come), whatever its line ends (an old Mac's "\r" alone, or
    none at all: text8 is one line of 100 MB); a paragraph longer than MAX_PARAGRAPH_CHARS is cut into documents of
    that size at line ends (a line longer than that, within it), said once."""
    try:
        with path.open("rb") as f:
            yield from _paragraphs(f, path)
    except OSError as e:  # a file that cannot be opened or read (not what the consumer's errors throw in)
        raise EncdecError(f"cannot read {path} ({e.strerror or e})") from None


def _line_ends(data: bytes, after_cr: bool) -> int:
    """The line ends in `data` as the reader splits lines ("\r\n", "\r" or "\n"; `after_cr`: the bytes before
    ended with "\r"), so that an old Mac's file names the line of a bad byte, not line 1."""
    ends = data.count(b"\n") + data.count(b"\r") - data.count(b"\r\n")
    return ends - 1 if after_cr and data.startswith(b"\n") else ends


def _paragraphs(f: BinaryIO, path: Path) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8")()
    block: list[str] = []  # the paragraph's lines so far
    size, cut = 0, False  # the block's characters; whether a paragraph was cut
    tail, number = "", 1  # text after the last line end, and its line's number
    after_cr = False  # the bytes before ended with "\r": a "\n" first ends no other line
    first = f.read(len(BOM))
    pending = b"" if first == BOM else first  # a byte-order mark is not text of the first document
    while True:
        chunk = pending + f.read(CHUNK_BYTES)
        pending, end = b"", not chunk
        buffered = decoder.getstate()[0]  # a character's first bytes, from the chunk before (never a newline)
        try:
            text = tail + decoder.decode(chunk, final=end)
        except UnicodeDecodeError as e:
            line = number + _line_ends((buffered + chunk)[: e.start], after_cr)
            raise EncdecError(f"{path}, line {line}: not UTF-8 text ({e.reason})") from None
        number += _line_ends(chunk, after_cr)
        after_cr = chunk.endswith(b"\r") or (after_cr and not chunk)
        carried = "\r" if text.endswith("\r") and not end else ""  # maybe the first half of a "\r\n"
        *lines, tail = text[: len(text) - len(carried)].replace("\r\n", "\n").replace("\r", "\n").replace(
            "\f", "\n\n").split("\n")
        if end:
            lines.append(tail)
        elif len(tail) > MAX_PARAGRAPH_CHARS:  # a line without end in sight: its text so far
            lines.append(tail)
            tail = ""
        tail += carried
        for line in lines:
            if line.strip():
                block.append(line)
                size += len(line) + 1
                if size <= MAX_PARAGRAPH_CHARS:
                    continue
                if not cut:
                    cut = True
                    log.warning("%s: a paragraph of more than %d characters (no blank lines between its lines?) is "
                                "read as documents of that size, cut at line ends (a longer line within it); a "
                                ".jsonl file holds one document a record", path, MAX_PARAGRAPH_CHARS)
            elif not block:
                continue
            yield "\n".join(block).strip()  # a blank line (whitespace only) ends the paragraph, or its size
            block, size = [], 0
        if end:
            break
    if block:
        yield "\n".join(block).strip()


def json_lines(path: Path, *, strict: bool = False, pipe: bool = False) -> Iterator[tuple[int, Any]]:
    """(line number, parsed record) of each non-blank line; bad JSON names the file and line (with `strict`, the
    NaN and Infinity that Python reads are bad JSON too). A regular file (a link to a device was read until memory
    ran out; a data file named a pipe waited forever), or with `pipe` a pipe too (a file the user names:
    `--input <(jq ...)`)."""
    try:
        with (open_named if pipe else open_regular)(path) as f:
            yield from json_records(f, str(path), strict=strict)
    except OSError as e:  # a file that cannot be opened or read (the reader's errors are not thrown in here)
        raise EncdecError(f"cannot read {path} ({e.strerror or e})") from None


def json_records(lines: Iterable[bytes], name: str, *, strict: bool = False) -> Iterator[tuple[int, Any]]:
    """(line number, parsed record) of each non-blank line of a stream (standard input), `name` naming it in errors."""
    for number, raw in enumerate(lines, 1):
        if number == 1:  # a byte-order mark (an editor's) is no part of the first record
            raw = raw.removeprefix(BOM)
        if not raw.strip():
            continue
        if raw.lstrip()[:1] == b"[":  # pandas' orient="records": one array, refused before all of it is parsed
            raise EncdecError(f"{name}, line {number}: a JSON list, not an object; expected one object per line (each "
                              "record must be a JSON object: pandas writes them with to_json(orient='records', "
                              "lines=True))")
        try:
            record = parse_json(raw, strict=strict)
        except ValueError as e:
            raise EncdecError(f"{name}, line {number}: not valid JSON ({e})") from None
        yield number, record


def check_text(text: str, where: str) -> str:
    """`text` given on the command line, refused where the shell passed bytes that are not UTF-8 (Python holds
    each as half of a surrogate pair, which no tokenizer reads)."""
    if lone_surrogate(text):
        raise EncdecError(f"{where}: not UTF-8 text (bytes that UTF-8 cannot read, from the terminal or the shell); "
                          "pass the text in UTF-8")
    return text


def lone_surrogate(text: str) -> bool:
    """Whether a text holds half of a surrogate pair (a JSON escape \\uD800-\\uDFFF alone): not a character, so
    no tokenizer can read it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _jsonl(path: Path, field: str) -> Iterator[str]:
    for number, record in json_lines(path):
        if not isinstance(record, dict):  # pandas' orient="records" writes one array
            raise EncdecError(f"{path}, line {number}: a JSON {type(record).__name__}, not an object; expected one "
                              f"object per line, such as {{{json.dumps(field)}: \"...\"}}")
        if record.get(field) is None and field in record:  # no text, as a null of a parquet column
            continue
        if not isinstance(record.get(field), str):
            said = f"{field!r} is a JSON {type(record[field]).__name__}" if field in record else f"no field {field!r}"
            raise EncdecError(f"{path}, line {number}: {said}; expected a string field (use --text-field to name "
                              "another)")
        if lone_surrogate(record[field]):
            raise EncdecError(f"{path}, line {number}: {field!r} holds a \\uD800-\\uDFFF escape that is not half of "
                              "a pair: not a character, so no tokenizer can read it")
        if record[field].strip():
            yield record[field]


def _textual(kind) -> bool:
    import pyarrow as pa

    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)


def _parquet_file(path: Path, field: str):
    """The parquet file, its footer read and its column `field` found."""
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(str(path))
    except Exception as e:  # pyarrow raises several types for damaged files
        raise EncdecError(f"{path}: not a readable parquet file ({e})") from None
    names = table.schema_arrow.names
    if field not in names:
        raise EncdecError(f"{path}: no column {field!r}; columns: {names}")
    if names.count(field) > 1:  # pyarrow's field() then raises KeyError, and reading took the first in silence
        raise EncdecError(f"{path}: {names.count(field)} columns named {field!r}; which holds the text is unclear: "
                          "write the file with one column of that name")
    return table


def check_file(path: Path, text_field: str = "text") -> None:
    """What reading a data file would refuse, found up to its first document (an empty file; a parquet file without
    the column, or whose column is not text; records of another field), checked for every file before the first is
    read: a bad last shard of a large corpus failed a run after hours of tokenizing the others, and nothing was
    cached."""
    import pyarrow as pa

    try:  # opened: a file its owner alone may read was found only when its turn came, the files before it
        with open_regular(path) as f:  # tokenized for nothing (a device or a pipe is refused as not a regular file)
            empty = os.fstat(f.fileno()).st_size == 0
    except OSError as e:
        raise EncdecError(f"cannot read {path} ({e.strerror or e})") from None
    if empty:
        raise EncdecError(f"{path}: empty, no text in it")
    if path.suffix.lower() == ".parquet":
        file = _parquet_file(path, text_field)
        kind = file.schema_arrow.field(text_field).type
        if not _textual(kind.value_type if pa.types.is_dictionary(kind) else kind):
            raise EncdecError(f"{path}: column {text_field!r} holds {kind}, not text (use --text-field to name "
                              "another)")
        if file.metadata.num_rows == 0:  # a shard Spark or Dask wrote with no rows: read last, it failed the run
            raise EncdecError(f"{path}: empty, no text in it (no rows)")
    documents = read_file(path, text_field)  # read up to its first document: records of another field, or none
    try:  # with any text, were found when the file's turn came
        next(documents)
    finally:
        documents.close()


def _parquet(path: Path, field: str) -> Iterator[str]:
    import pyarrow as pa

    file = _parquet_file(path, field)
    batches = file.iter_batches(columns=[field], batch_size=_parquet_batch_rows(file, field))
    while True:
        try:
            batch = next(batches, None)
        except Exception as e:  # a damaged data page behind an intact footer
            raise EncdecError(f"{path}: damaged parquet data ({e})") from None
        if batch is None:
            return
        column = batch.column(0)
        if pa.types.is_dictionary(column.type) and _textual(column.type.value_type):  # pandas' category dtype
            column = column.dictionary_decode()
        if pa.types.is_string_view(column.type):  # Arrow's newer layout of the same text (Polars, pandas with Arrow)
            column = column.cast(pa.large_string())
        if not _textual(column.type):
            raise EncdecError(f"{path}: column {field!r} holds {column.type}, not text (use --text-field to name "
                              "another)")
        try:  # a string column's bytes are not checked when read, only when decoded
            values = column.to_pylist()
        except UnicodeDecodeError as e:
            raise EncdecError(f"{path}: column {field!r} holds bytes that are not UTF-8 text ({e.reason})") from None
        for value in values:
            if isinstance(value, str) and value.strip():  # nulls and blank texts, as blank lines of .jsonl files
                yield value


PARQUET_BATCH_BYTES = 1 << 22  # about the text a parquet batch decodes at once (a tokenizer batch's, BATCH_CHARS)
PARQUET_BATCH_ROWS = 1024  # and at most this many rows: a dictionary-encoded column's stored size says little


def _parquet_batch_rows(file, field: str) -> int:
    """Rows per batch read so that one holds about PARQUET_BATCH_BYTES of the column's text: pyarrow's default of
    65,536 rows decoded a shard of long documents (books) whole, then copied it into Python strings."""
    meta = file.metadata
    if meta.num_row_groups == 0:
        return PARQUET_BATCH_ROWS
    group = meta.row_group(0)  # the column by its path: a struct column before it counts one per leaf
    column = next((i for i in range(group.num_columns) if group.column(i).path_in_schema == field), None)
    if column is None:
        return PARQUET_BATCH_ROWS
    text_bytes = sum(meta.row_group(g).column(column).total_uncompressed_size for g in range(meta.num_row_groups))
    per_row = max(text_bytes / max(meta.num_rows, 1), 1.0)
    return int(min(max(PARQUET_BATCH_BYTES // per_row, 1), PARQUET_BATCH_ROWS))


def _hub(name: str, field: str, limit: int | None) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise EncdecError(f"hf:{name} needs the `datasets` package (pip install datasets, or -e '.[hub]' in "
                          "encdec's checkout)") from None
    dataset, _, config = name.partition(":")
    try:
        stream = datasets.load_dataset(dataset, config or None, split="train", streaming=True)
        documents = 0  # `limit` counts documents, not the blank records skipped among them
        for count, record in enumerate(stream):
            if limit is not None and documents >= limit:
                return
            text = record.get(field) if isinstance(record, dict) else None
            if text is None and isinstance(record, dict) and field in record:  # a null text: skipped, as .jsonl's
                continue
            if not isinstance(text, str):
                raise EncdecError(f"hf:{name}, record {count}: no string field {field!r} (use --text-field to name "
                                  "another)")
            if text.strip():
                documents += 1
                yield text
    except EncdecError:
        raise
    except Exception as e:
        raise EncdecError(f"could not stream hf:{name} ({type(e).__name__}: {e})") from None


def files_of(spec: str) -> list[Path]:
    """The data files a path stands for (a file, or the supported files below a directory, sorted)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        files = data_files(path, SUFFIXES)
        if not files:
            raise EncdecError(f"{path}: no .txt, .jsonl or .parquet files in this directory")
        return files
    if not path.exists():
        raise EncdecError(f"{spec}: no such file or directory; expected {ACCEPTED}")
    if path.suffix.lower() not in SUFFIXES:
        raise EncdecError(f"{path}: unsupported file type {path.suffix!r}; expected {ACCEPTED}")
    return [path]


def distinct_files(files: Iterable[Path], seen: set[Path]) -> list[Path]:
    """`files` but those `seen` before (by real path, added to `seen`): a file given twice, or inside a directory
    also given, is read once, said once."""
    out = []
    for path in files:
        real = path.resolve()
        if real in seen:
            log.warning("%s is given more than once (alone, or inside a directory also given): read once", path)
            continue
        seen.add(real)
        out.append(path)
    return out


def read_documents(spec: str, *, text_field: str = "text", hub_limit: int | None = 100_000) -> Iterator[str]:
    """Documents of one data specification: a path, or `hf:NAME[:CONFIG]` for a Hub dataset."""
    if spec.startswith("hf:"):
        yield from _hub(spec[3:], text_field, hub_limit)
        return
    for path in files_of(spec):
        yield from read_file(path, text_field)


def read_file(path: Path, text_field: str = "text") -> Iterator[str]:
    """Documents of one data file (.txt paragraphs, .jsonl records' or a parquet column's texts)."""
    count = 0
    if path.suffix.lower() == ".txt":
        reader = _txt(path)
    elif path.suffix.lower() == ".jsonl":
        reader = _jsonl(path, text_field)
    else:
        reader = _parquet(path, text_field)
    for document in reader:
        count += 1
        yield document
    if count == 0:
        raise EncdecError(f"{path}: empty, no text in it")
