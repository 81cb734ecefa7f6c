"""The Natural-Instructions tasks that BIG-bench packages (61 subtasks, 193,250 examples): the default
instruction data of `encdec finetune`.

They are read straight from the bigbench 1.0.0 source distribution on PyPI, downloaded once (about 358 MB)
into the cache and checked against its published SHA-256: installing bigbench would pull in TensorFlow, so it
is only read. The
converted pairs are cached as one .jsonl beside the tarball, so later calls take seconds, not a minute.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import ssl
import tarfile
import tempfile
import time
import urllib.request
import zlib
from collections.abc import Callable
from pathlib import Path

from encdec.data.instructions import Pair
from encdec.errors import EncdecError
from encdec.files import HOST, file_identity, open_regular, remove_abandoned_temporaries, write_cache, written
from encdec.sources import cache_lock_if_possible, cache_root

log = logging.getLogger("encdec")

REQUIREMENT = "bigbench==1.0.0"
TARBALL = "bigbench-1.0.0.tar.gz"
URL = ("https://files.pythonhosted.org/packages/95/f8/c019b3579df548a04cac12342cfcb878e50ddf6cfcd7fddba8cfc721c157/"
       + TARBALL)
SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"  # as PyPI's index publishes it
MAX_TASK_BYTES = 256 * 1024**2  # the largest task.json of the sdist is a few MB: a member past this is not one of them
MEMBER = re.compile(r"bigbench-1\.0\.0/bigbench/benchmark_tasks/natural_instructions/(?P<task>[^/]+)/task\.json")
# Every task_prefix is "Definition: ... Things to Avoid: ... Emphasis/Caution: ... Prompt: ...".
SECTIONS = re.compile(r"\s*Definition:(?P<definition>.*?)Things to Avoid:.*Prompt:(?P<prompt>.*)", re.DOTALL)
FORMAT = 2  # part of the cache key: bump it when what is cached changes (2: turns, not a Gemma transcript)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open_regular(path) as f:  # (a pipe planted in a shared cache waited for ever)
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except OSError as e:  # another user's file in a shared cache (EACCES), or a folder of that name
        raise EncdecError(f"cannot read {path} ({e.strerror or e}); make it readable, or delete it to download it "
                          "again") from None
    return digest.hexdigest()


def _tls() -> ssl.SSLContext:
    """The system's certificates (and SSL_CERT_FILE, where a proxy's are) plus certifi's bundle where it is
    installed, as pip carries one: some Pythons have no system store (transformers brings certifi in)."""
    context = ssl.create_default_context()
    with contextlib.suppress(ImportError):
        import certifi

        context.load_verify_locations(certifi.where())
    return context


def bigbench_tarball() -> Path:
    """The bigbench 1.0.0 sdist in the cache, downloaded from PyPI's file host on first use and checked against
    its published SHA-256 (fetched as a file, not through pip: pip would build the sdist's metadata, running its
    setup code). A tarball put in the cache by hand is checked the same way, when it is converted (`_cached`):
    hashing 358 MB on every call would cost more than reading the converted pairs."""
    directory = cache_root() / "bigbench"
    path = directory / TARBALL
    if not path.exists():
        with written(directory):
            directory.mkdir(parents=True, exist_ok=True)
        log.info("downloading %s from PyPI (about 358 MB, once) for its Natural-Instructions tasks, into %s",
                 REQUIREMENT, directory)
        with written(directory):  # a download a signal or a kill cut off left its 358 MB for good
            remove_abandoned_temporaries(directory)
            for old in directory.glob(".download-*"):  # named so before (no process to ask): a day old, gone
                if old.is_dir() and not old.is_symlink() and time.time() - old.stat().st_mtime > 86400:
                    shutil.rmtree(old, ignore_errors=True)
        # named as an atomic write's temporary (.NAME.tmp-HOST-PID-XXXXXXXX): removed once its process is gone
        prefix = f".{TARBALL}.tmp-{HOST}-{os.getpid()}-"
        with written(directory), tempfile.TemporaryDirectory(dir=directory, prefix=prefix) as tmp:
            part = Path(tmp) / TARBALL
            try:
                with urllib.request.urlopen(URL, timeout=60, context=_tls()) as reply, part.open("wb") as f:
                    shutil.copyfileobj(reply, f, 1 << 20)
            except (OSError, ValueError) as e:  # URLError and socket errors are OSErrors
                raise EncdecError(f"could not download {REQUIREMENT} from {URL} for the default instruction data "
                                  f"({e}); put {TARBALL} (SHA-256 {SHA256}) in {directory}, or give instruction "
                                  ".jsonl files") from None
            if (got := _sha256(part)) != SHA256:
                raise EncdecError(f"the download of {URL} has SHA-256 {got}, not PyPI's {SHA256} (cut off, or another "
                                  "file); nothing was kept")
            os.replace(part, path)
        log.info("downloaded %s (%.0f MB)", path, path.stat().st_size / 1e6)
    return path


def _check_pypis(path: Path) -> None:
    if (got := _sha256(path)) != SHA256:
        raise EncdecError(f"{path} has SHA-256 {got}, not that of PyPI's {TARBALL} ({SHA256}); delete it to "
                          "download it again")


def task_prompt(prefix: str, text: str) -> str:
    """The task's definition and one-line instruction, then the input.

    The prefixes also hold notes written for the crowd workers who made the data ("Things to Avoid",
    "Emphasis/Caution", up to pages of them), which say how to write examples, not how to solve the
    task: they are left out, keeping prompts short enough for the encoder's window.
    """
    sections = SECTIONS.fullmatch(prefix)
    if sections is None:
        instruction = " ".join(prefix.split())
    else:
        instruction = " ".join(sections["definition"].split()) + "\n" + " ".join(sections["prompt"].split())
    return f"{instruction}\n\n{text.strip()}"


def _task_pairs(task: str, raw: bytes, where: str) -> list[Pair]:
    try:
        spec = json.loads(raw)
    except ValueError as e:
        raise EncdecError(f"{where} is not valid JSON ({e})") from None
    prefix, examples = (spec.get("task_prefix"), spec.get("examples")) if isinstance(spec, dict) else (None, None)
    if not isinstance(prefix, str) or not isinstance(examples, list):
        raise EncdecError(f"{where} is not a BIG-bench task with a string task_prefix and a list of examples")
    pairs = []
    for index, example in enumerate(examples):
        text, target = (example.get("input"), example.get("target")) if isinstance(example, dict) else (None, None)
        if isinstance(target, list):  # several acceptable targets: learn the first
            target = target[0] if target else ""
        if not isinstance(target, str) or not isinstance(text, str):
            raise EncdecError(f"{where}: example {index} lacks a string input and target")
        if target.strip() and text.strip():  # one example in 193,250 has an empty target
            pairs.append(Pair(turns=(("user", task_prompt(prefix, text)),), response=target.strip(),
                              source=f"natural_instructions/{task}#{index}"))
    return pairs


def convert(tarball: Path) -> list[Pair]:
    """All Natural-Instructions pairs of a bigbench sdist, by subtask, read from the tarball in one pass."""
    by_task: dict[str, list[Pair]] = {}
    try:
        with tarfile.open(tarball, "r|gz") as tar:
            for member in tar:
                match = MEMBER.fullmatch(member.name)
                if match and member.isfile():
                    if member.size > MAX_TASK_BYTES:
                        raise EncdecError(f"{tarball}: {member.name} holds {member.size} bytes, more than any "
                                          f"{REQUIREMENT} task ({MAX_TASK_BYTES} at most); is it the "
                                          f"{REQUIREMENT} sdist?")
                    raw = tar.extractfile(member).read()  # type: ignore[union-attr]
                    by_task[match["task"]] = _task_pairs(match["task"], raw, f"{tarball}: {member.name}")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise EncdecError(f"{tarball} is not a readable tar.gz ({e}); delete it to download it again") from None
    if not by_task:
        raise EncdecError(f"{tarball} holds no natural_instructions/*/task.json; is it the {REQUIREMENT} sdist?")
    return [pair for task in sorted(by_task) for pair in by_task[task]]


def _pair(record: dict) -> Pair:
    return Pair(turns=tuple((role, text) for role, text in record["turns"]), response=record["response"],
                source=record["source"])


def _key(tarball: Path, change_time: bool) -> str:
    return hashlib.sha256(f"{file_identity(tarball, change_time=change_time)}:{FORMAT}".encode(
        errors="surrogateescape")).hexdigest()[:16]


def _cached(tarball: Path, check: Callable[[Path], None] | None = None) -> list[Pair]:
    """The converted pairs, from the cache when this tarball (`file_identity`) was converted before; `check`
    vets the tarball before a conversion."""
    # without its change time: a chmod or chown of the cache converted it again, the old copy left behind (a cache
    # keyed with it, by an earlier version, is still read)
    cache, earlier = (cache_root() / "bigbench" / f"natural_instructions-{_key(tarball, timed)}.jsonl"
                      for timed in (False, True))
    found = next((c for c in (cache, earlier) if c.exists()), None)
    if found is not None:
        try:
            with open_regular(found) as raw, io.TextIOWrapper(raw, encoding="utf-8") as f:
                return [_pair(json.loads(line)) for line in f]
        except (ValueError, KeyError, TypeError) as e:  # cut short or damaged: converted again
            log.warning("%s is damaged (%s); converting the tarball again", found, e)
            with contextlib.suppress(OSError):  # (a read-only shared cache keeps it: converted on each run)
                found.unlink(missing_ok=True)
        except OSError as e:  # it may be sound and another's (EACCES in a shared cache): left as it is
            log.warning("cannot read %s (%s); converting the tarball without it", found, e.strerror or e)
    if check is not None:
        check(tarball)
    start = time.perf_counter()
    pairs = convert(tarball)

    def write(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8") as f:
            for pair in pairs:
                f.write(json.dumps({"turns": pair.turns, "response": pair.response, "source": pair.source}) + "\n")
            f.flush()
            os.fsync(f.fileno())  # whole on disk before its name says it is done

    write_cache(cache, write, "the converted examples", "the tarball is converted again next time")
    log.info("converted %d Natural-Instructions examples in %.0f s (cache: %s)", len(pairs),
             time.perf_counter() - start, cache)
    return pairs


def natural_instructions(max_per_task: int | None = None, seed: int = 0, *, tarball: Path | None = None) -> list[Pair]:
    """The Natural-Instructions pairs, grouped by subtask; with `max_per_task`, a seeded sample of at most
    that many from each subtask (the largest have 6,500 and the smallest 58, so a cap balances them).

    `tarball` defaults to the cached bigbench sdist (downloaded on first use). Shuffle before training.
    """
    if max_per_task is not None and max_per_task < 1:
        raise EncdecError(f"max_per_task must be at least 1, got {max_per_task}")
    # the ranks of a distributed run download and convert it once (where a lock can be held)
    with cache_lock_if_possible("natural-instructions"):
        pairs = _cached(tarball) if tarball is not None else _cached(bigbench_tarball(), _check_pypis)
    if max_per_task is None:
        return pairs
    by_task: dict[str, list[Pair]] = {}
    for pair in pairs:
        by_task.setdefault(pair.source.partition("#")[0], []).append(pair)
    rng = random.Random(seed)
    sample = []
    for task in sorted(by_task):
        group = by_task[task]
        keep = sorted(rng.sample(range(len(group)), max_per_task)) if len(group) > max_per_task else range(len(group))
        sample += [group[i] for i in keep]
    return sample
