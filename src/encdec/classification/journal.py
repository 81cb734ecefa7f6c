"""Finished search trials and unfinished fits on disk, so that an interrupted `encdec classify` (with `--search` or
without) resumes where it stopped.

A search trains every candidate once per dev split of every fold: hours on a CPU for the k-fold tasks.
Each finished trial's dev score is appended (one JSON line, flushed and synced) to a journal under the
cache root (`$ENCDEC_CACHE/search/`), named by everything that decides a trial's outcome: the checkpoint's
files, the task's examples, the plan (seed, limits, folds), the dev protocol, the pooling and the fine-tuning
settings the grid does not vary (each trial is named by the ones it varies). A rerun with the same inputs reads
those scores back instead of training again, a grid with more values too; other inputs get another journal. A
line cut short by a kill is skipped (that trial trains again). Every fit (a trial's, the chosen settings' on the
whole fold, and a run's without a search: the journal's name is the run's) also saves its progress beside the journal
while it runs (`progress`): a kill in a BoolQ epoch, an hour on a CPU, loses minutes, not the fit; and a k-fold run's
finished folds are kept (`keep_fold`) until the run is done.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from encdec.errors import EncdecError
from encdec.files import atomic_dir, parse_json
from encdec.training.plain_state import read_state, write_state

log = logging.getLogger("encdec")

# bump when fine-tuning changes what a trial scores (2: a candidate whose fit diverges scores 0, not label 0's share of
# the dev split, which a journal of before read back and could choose over real candidates near chance)
JOURNAL_VERSION = 2


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:32]


class TrialJournal:
    """Dev scores of a search's finished trials: (fold, settings, dev split) -> right answers."""

    def __init__(self, described: dict[str, Any]) -> None:
        from encdec.sources import cache_root

        self.file = cache_root() / "search" / f"{_digest({'version': JOURNAL_VERSION, **described})}.jsonl"
        self.known: dict[str, int] = {}
        self.unwritable = False  # set when a write failed: the search goes on without recording
        try:  # (bytes that are no UTF-8, from a damaged disk or another writer: those lines are skipped below)
            lines = self.file.read_text(encoding="utf-8", errors="replace").splitlines()
        except FileNotFoundError:
            lines = []
        except OSError as e:  # unreadable, or the cache root is not a directory: the search starts over
            log.warning("could not read the search's trials in %s (%s); they are scored again", self.file, e)
            lines = []
        for line in lines:
            try:
                entry = parse_json(line)  # (nested too deeply: a RecursionError's traceback)
                self.known[entry["trial"]] = int(entry["correct"])
            except (KeyError, TypeError, ValueError, OverflowError):  # (OverflowError: a "correct" of Infinity)
                continue  # cut short by a kill
        if self.known:
            log.info("search: %d trial(s) already scored, read from %s", len(self.known), self.file)

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """The run of this journal: its lock held throughout (two runs of one journal, the same search with another
        --out or --eval-limit, trained every trial twice, each deleting the other's saved fits when it ended), and
        once it is done, what its fits saved and never finished goes (`discard_progress`). Where no lock file can
        be made (a read-only cache), none is held."""
        from filelock import Timeout

        from encdec.files import WriteFailed
        from encdec.sources import cache_lock

        try:
            lock = cache_lock(f"journal-{self.file.stem}")
            lock.acquire(timeout=2)  # (not 0: another run's end-of-run note probes this lock for an instant, `_held`)
        except Timeout:
            raise EncdecError(f"another encdec classify of this model, task and settings is running (it shares the "
                              f"trials and saved fits of {self.file}): wait for it to end, or give this one another "
                              "--seed") from None
        except (OSError, WriteFailed):  # not acquired: none held
            lock = None
        try:
            yield
            self.discard_progress()
        finally:
            if lock is not None:
                lock.release()

    def progress(self, fold: int, settings: dict[str, Any], examples: list[int]) -> Path:
        """Where the fit of `settings` on `examples` (a trial's, or the chosen settings' on the whole fold) saves its
        progress while it runs (`train.fine_tune`), so that an interrupted fit resumes mid-way."""
        return self.file.with_name(f"{self.file.stem}-{_digest([fold, settings, _digest(examples)])}")

    def _fold_directory(self, fold: int, key: Any) -> Path:
        return self.file.with_name(f"{self.file.stem}-fold-{_digest([fold, key])}")

    def finished_fold(self, fold: int, key: Any) -> dict[str, Any] | None:
        """What `keep_fold` kept of fold `fold`'s final fit (`key`: its settings and examples) in this journal's
        run, which was then interrupted; None where nothing was kept or it cannot be read (trained again)."""
        directory = self._fold_directory(fold, key)
        if not directory.is_dir():
            return None
        try:
            kept = read_state(directory, "fold")
            if not isinstance(kept, dict) or not {"probs", "losses"} <= kept.keys():
                raise EncdecError("it is not a finished fold as encdec keeps one")
        except EncdecError as e:
            log.warning("not reading the finished fold in %s (%s); it is trained again", directory, e)
            return None
        return kept

    def keep_fold(self, fold: int, key: Any, outcome: dict[str, Any]) -> bool:
        """Keep a finished fold's `outcome` (its predictions, losses and, for the classifier that is saved, its
        weights) until the run is done (`discard_progress`): a k-fold run killed in a later fold resumes there,
        where it trained every finished fold again (minutes to hours each). Whether it was kept."""
        directory = self._fold_directory(fold, key)
        try:
            with atomic_dir(directory, overwrite=True) as tmp:
                write_state(tmp, "fold", outcome)
        except (OSError, EncdecError) as e:  # (EncdecError: a write refused, the cache root a file, say)
            log.warning("could not keep the finished fold in %s (%s); a resumed run trains it again", directory, e)
            return False
        return True

    def discard_progress(self) -> None:
        """Once the run is done: what fits of it saved and never finished (killed, and not run again: another
        grid, another choice) is of no more use, and the weights with their optimizer state are GBs a fit."""
        for path in self.file.parent.glob(f"{self.file.stem}-*"):
            shutil.rmtree(path, ignore_errors=True)
        # other runs' (killed, and maybe never run again with their options): said, not deleted; not their writes
        # under way (.NAME.tmp-..., .NAME.old-...), whose files come and go as they are counted, nor a run still
        # going (its journal's lock held): called killed, their folders were to be deleted under it
        stems = {p.name.split("-", 1)[0] for p in self.file.parent.glob("[!.]*-*") if p.is_dir()}
        running = {stem for stem in stems if _held(stem)}
        others = [p for p in self.file.parent.glob("[!.]*-*") if p.is_dir() and p.name.split("-", 1)[0] not in running]
        if others:
            size = sum(_size(f) for p in others for f in p.rglob("*"))
            log.warning("%s holds %.1f GB of unfinished fits of %d other run(s) (killed; a rerun with their "
                        "options goes on from them): delete those folders if they will not run again",
                        self.file.parent, size / 1e9, len({p.name.split("-")[0] for p in others}))

    def correct(self, fold: int, settings: dict[str, Any], dev: list[int], compute: Callable[[], int]) -> int:
        """The recorded score of this trial, or `compute()`, recorded before it is returned."""
        trial = json.dumps({"fold": fold, "settings": settings, "dev": _digest(dev)}, sort_keys=True)
        if trial in self.known and 0 <= self.known[trial] <= len(dev):  # (a damaged or edited line won the search
            return self.known[trial]  # with a dev accuracy above 1: scored again)
        value = compute()
        self.known[trial] = value
        if self.unwritable:
            return value
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            with open(self.file, "a+", encoding="utf-8") as f:
                f.seek(0, os.SEEK_END)
                if f.tell() > 0:  # a line cut short by a kill must not swallow this one
                    f.seek(f.tell() - 1)
                    if f.read(1) != "\n":
                        f.write("\n")
                f.write(json.dumps({"trial": trial, "correct": value}) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:  # a read-only or full disk: the search goes on, an interrupted one starts over
            self.unwritable = True
            log.warning("could not record the search's trials in %s (%s); a resumed search scores them again",
                        self.file, e)
        return value


def _held(stem: str) -> bool:
    """Whether the run of the journal `stem` is under way: another process holds its lock (`Journal.running`)."""
    from filelock import Timeout

    from encdec.files import WriteFailed
    from encdec.sources import cache_lock

    try:
        lock = cache_lock(f"journal-{stem}")
        lock.acquire(timeout=0)
    except Timeout:
        return True
    except (OSError, WriteFailed):  # no lock can be made here: none held either
        return False
    lock.release()
    return False


def _size(path: Path) -> int:
    """A file's size; 0 for a folder, or a file another run removed meanwhile."""
    try:
        return path.stat().st_size if path.is_file() else 0
    except OSError:
        return 0
