"""The run directory (OUT of `encdec pretrain` / `finetune`): who may write it, what a run starts from,
and what `--overwrite` and `--resume` change in it.

The policy: a run holds OUT/.encdec.lock while it writes (the kernel drops the lock of a killed
process, so a stale lock file is simply taken over); nothing is deleted before the run's inputs were
loaded; a resumed run starts from the newest checkpoint that reads back completely and drops the
metrics lines that it will log again, along with a line truncated by a crash.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from encdec.checkpoint import METADATA, read_metadata
from encdec.errors import EncdecError, ReadFailed, first_line
from encdec.files import (
    RUN_LOCK,
    atomic_write,
    check_apart,
    check_not_above,
    check_writable_place,
    file_identity,
    open_own,
    open_regular,
    parse_json,
    portable_path,
    read_small,
    refuse_link,
    remove_abandoned_temporaries,
    weight_files,
    written,
)
from encdec.training import checkpointing, distributed
from encdec.training.config import TrainConfig
from encdec.training.plain_state import read_state

log = logging.getLogger("encdec")
LOCK = RUN_LOCK
OUTPUTS = ("checkpoints", "metrics.jsonl", "tensorboard", "model")  # what --overwrite replaces
METRICS_START = b'{"step": '  # how every line of a run's metrics.jsonl begins (json.dumps of a record, step first)


def _holder(path: Path) -> str:
    try:
        info = parse_json(read_small(path))  # (nested too deeply: a RecursionError's traceback)
        return f"process {info['pid']} on {info['host']}, since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


NO_LOCKS = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP}  # flock's errors where locks do not exist


def _acquire(out: Path, name: str) -> int:
    """The descriptor of OUT's lock file `name`, locked by this process; EncdecError naming the holder if it is
    held."""
    path, unlocked = out / name, False
    while True:
        fd = open_own(path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise EncdecError(f"{out} is being written by {_holder(path)}; wait for that run to end or choose "
                              f"another --out (if no such run exists, delete {path})") from None
        except OSError as e:
            if e.errno not in NO_LOCKS:
                os.close(fd)
                raise
            # Lustre without -o flock, some NFS and SMB mounts: the run goes on, as filelock's soft locks do
            log.warning("%s's file system has no file locks (%s): nothing stops a second run from writing it at "
                        "the same time", out, e.strerror or e)
            unlocked = True
            break
        try:  # the file may have been replaced between open and lock by a run that just ended
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    if os.fstat(fd).st_size and not unlocked:
        log.warning("taking over the lock of %s in %s: that process is gone", _holder(path), out)
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since}).encode())
    return fd


def _remove_empty(made: list[Path]) -> None:
    """Remove the directories a run made (deepest first), those still empty."""
    for directory in made:
        try:
            directory.rmdir()
        except OSError:  # something was written there: it and its parents stay
            return


@contextlib.contextmanager
def locked(out: Path, d: distributed.Dist, inputs: tuple[str | Path | None, ...] = (),
           data: tuple[str, ...] = (), lock: str = LOCK) -> Iterator[None]:
    """Hold OUT's lock (the file `lock` in it) for the duration. The first process of a distributed run takes it
    for all, and every process stops when it is refused (none waits for the others in a collective). OUT must not
    be or hold one of the run's `inputs` (`--overwrite` would delete it, the final model replace it), nor lie inside
    a folder of its `data` (read whole, the run's own metrics.jsonl among its files). The directories it made for
    OUT go again when nothing was written in them (a run that failed early leaves no empty OUT behind)."""
    fd, created, refused = None, [], None
    if d.main:
        try:
            check_writable_place(out)
            check_not_above(out)
            check_apart(out, inputs)
            check_apart(out, inputs[:1], inside=True)  # inside the model: its next --overwrite deleted the run
            _check_outside_data(out, data)
            created = [p for p in (out, *out.parents) if not p.exists()]  # OUT first, then the parents it needs
            for attempt in range(3):  # another run ending beside this one removes the empty directories it made
                try:
                    out.mkdir(parents=True, exist_ok=True)
                    fd = _acquire(out, lock)
                    break
                except FileNotFoundError:
                    if attempt == 2:
                        raise
        except OSError as e:  # no permission, read-only file system, ...
            refused = EncdecError(f"cannot write {out}: {e.strerror or e}")
        except EncdecError as e:
            refused = e
    if distributed.reduce_sum(float(refused is not None), d):
        _remove_empty(created)
        raise refused or EncdecError(f"{out}: the first process could not lock it (see its message)")
    try:
        yield
    finally:
        if fd is not None:
            (out / lock).unlink(missing_ok=True)
            os.close(fd)
        _remove_empty(created)  # a refused run leaves no empty directories behind (they stay if anything was written)


def _check_outside_data(out: Path, data: tuple[str, ...]) -> None:
    """A data folder is read whole, every file of a kind (`encdec.data.text.data_files`): an OUT in it would have
    the run's metrics.jsonl read as data when it runs again (--resume, --overwrite: a refusal of that line)."""
    target = out.expanduser().resolve()
    for spec in data:
        folder = Path(spec).expanduser()
        if folder.is_dir() and (folder.resolve() == target or folder.resolve() in target.parents):
            raise EncdecError(f"--out {out} is inside the data folder {spec}, which is read whole: the run's own files "
                              "(metrics.jsonl) would be read as data; choose another --out")


def resume_point(cfg: TrainConfig, d: distributed.Dist) -> checkpointing.Saved | None:
    """The checkpoint to resume from, read and checked; refuses to mix two runs in one directory.
    Writes nothing: `begin` does, once the run's inputs are known to be good."""
    out = Path(cfg.out)
    if not cfg.overwrite:  # --resume reads, sets aside and deletes step-N there, and replaces model/ at its end (a
        # link there was refused then, every step trained); --overwrite removes such a link
        linked = [n for n in ("checkpoints", "tensorboard", "model") if (out / n).is_symlink()] if d.main else []
        for name in distributed.from_main(linked, d):  # the first process's view, so that every process stops
            refuse_link(out / name, linked=True)
    # any output of a run counts: a final model kept after its checkpoints and metrics were deleted is replaced
    held = [name for name in OUTPUTS if (out / name).exists()]
    # the first one's view; --resume rewrites metrics.jsonl and adds to tensorboard/, so their kinds count there too
    # (metrics.jsonl a pipe: it waited for ever), not what else a folder holds (it deletes none of them)
    foreign = distributed.from_main(foreign_output(out, contents=not cfg.resume) if held and d.main else None, d)
    if foreign:
        action = "--resume continues" if cfg.resume else "--overwrite replaces"
        raise EncdecError(f"{out / foreign[0]} is not what a run writes there ({foreign[1]}): {action} an earlier "
                          "run's outputs, not another folder of that name; choose another --out, or remove it "
                          "yourself")
    if cfg.resume:
        saved = checkpointing.latest_usable(out, d)
        step = 0 if saved is None else saved.trainer["step"]
        if not distributed.same_everywhere(step, d):  # each reads the directory itself: apart, they would diverge
            raise EncdecError(f"the processes found different checkpoints to resume in {out} (this one: "
                              f"{saved.path if saved else 'none'}); every process must see the same --out: on several "
                              "machines, a directory they all share")
        # a finished run without its checkpoints: from step 0 it would log over its metrics and replace its model
        # (the first process's view decides, as every process finds no checkpoint: only it writes the model)
        if saved is None and distributed.from_main((out / "model").exists(), d):
            raise EncdecError(f"{out} holds a finished run's model but no checkpoint to resume; pass --overwrite to "
                              "start afresh there, or another --out")
        if saved is None and d.main:  # a job script may always pass --resume; a mistyped --out should not pass unseen
            log.warning("%s holds no checkpoint to resume: the run starts from step 0", out)
        if saved is not None and saved.trainer["step"] > cfg.steps:
            raise EncdecError(f"--steps {cfg.steps} is below the step of the checkpoint to resume ({saved.path}, step "
                              f"{saved.trainer['step']}); pass --steps {saved.trainer['step']} or more")
        return saved
    if (held or checkpointing.checkpoints(out)) and not cfg.overwrite:
        raise EncdecError(f"{out} holds a run ({', '.join(held) or 'checkpoints'}); pass --resume to continue it or "
                          "--overwrite to start afresh")
    return None


def training_record(model: Path) -> dict | None:
    """The run a final model records in its metadata (encdec.json: "pretrained" or "finetuned"), or None: a model
    no training run saved."""
    metadata = read_metadata(model)
    run = metadata.get("pretrained") or metadata.get("finetuned")
    return run if isinstance(run, dict) else None


def foreign_output(out: Path, contents: bool = True) -> tuple[str, str] | None:
    """The first of OUT's run names (OUTPUTS) that holds something no run writes, with what: `begin` deletes
    them all on --overwrite (a link is only unlinked, what it leads to stays). Without `contents` (--resume), only a
    name of another kind (metrics.jsonl no file, the others no directories) and a model no run saved: a resumed run
    replaces OUT/model at its end too (one put there in the meantime was lost without a word)."""
    def odd(path: Path, kept) -> str:
        found = sorted(entry.name for entry in path.iterdir() if not kept(entry))
        return f"it holds {', '.join(found[:3])}" if found else ""

    for name in OUTPUTS:
        path = out / name
        try:
            if path.is_symlink() or not path.exists():
                continue
            if name == "metrics.jsonl":  # --overwrite deletes it, --resume cuts it back: another tool's file was lost
                problem = "not a file" if not path.is_file() else _not_run_metrics(path)
            elif not path.is_dir():
                problem = "not a directory"
            elif not contents and name != "model":
                problem = ""
            elif name == "model":  # a run's final model records the run (encdec.json: "pretrained" or "finetuned");
                # any checkpoint was taken for one, and --overwrite deleted a model kept there (an adapted one, say)
                recorded = training_record(path) is not None
                folders = sorted(entry.name for entry in path.iterdir() if entry.is_dir() and not entry.is_symlink())
                problem = ("a model no run saved: its encdec.json records no training" if not recorded else
                           f"it holds the folder {folders[0]}, which the run's final model would replace" if folders
                           else "")
            elif name == "checkpoints":  # step-N, and what a crash may leave of an atomic write (.step-N.tmp-...)
                problem = odd(path, lambda e: e.name.startswith(".step-") or checkpointing.is_step_name(e.name))
            else:  # tensorboard: SummaryWriter's event files
                problem = odd(path, lambda e: e.is_file() and e.name.startswith("events.out.tfevents."))
        except (OSError, EncdecError) as e:
            problem = f"unreadable: {first_line(e)}"
        if problem:
            return name, problem
    return None


def _not_run_metrics(path: Path) -> str:
    """Why `path` (a file) is no run's metrics.jsonl, or "": a run writes one record a line, each beginning with its
    step (a crash may cut the last one short, the first too: only its beginning is read)."""
    with open_regular(path) as f:
        start = f.read(len(METRICS_START))
    return "" if not start or start == METRICS_START[: len(start)] else "its first line is no training step's record"


# settings a resumed run may change without a warning: its course stays the same, but for --steps, which makes it
# a longer (or shorter) run: from the resumed step on, the rate is the new schedule's, whose decay ends at the new
# --steps (a finished run resumed to twice its steps goes on at about half the peak rate, not at the old end's)
# (fsdp: the same update, sharded or not: a run resumed either way matched the uninterrupted one to 6e-8)
FREE_ON_RESUME = ("model", "out", "steps", "resume", "overwrite", "eval_every", "save_every", "keep_last",
                  "average_last", "log_every", "tensorboard", "keep_freed_memory", "dist_timeout", "fsdp")
PATHS = ("data", "eval_data", "teacher")


def _plain(name: str, value: object) -> object:
    """A setting as it can be compared or found again later: paths made portable."""
    if name not in PATHS or not value:
        return value
    return [portable_path(v) for v in value] if isinstance(value, list) else portable_path(value)


def started_from(out: Path) -> str | None:
    """The --model a training run in `out` started from, as its newest readable checkpoint records it (None: no
    checkpoint says)."""
    for path in reversed(checkpointing.checkpoints(out)):
        try:
            model = read_state(path, "trainer")["config"]["model"]
        except (EncdecError, KeyError, TypeError):
            continue
        if isinstance(model, str):
            return model
    return None


def start_model_files(model_dir: Path) -> list[str] | None:
    """What tells apart the files of the encoder-decoder a run starts from (`file_identity` of its configuration,
    metadata and weights; None where they cannot be read): the final model reads its configuration and metadata
    (after --trim-vocab, also the rows of the tokens it did not train) from them again, at the run's end. Their
    change times are left out: a chmod -R or a hard-linked backup of the model during the run changes nothing."""
    try:
        return [file_identity(p, change_time=False) if p.exists() else f"{p}: absent"
                for p in [model_dir / "config.json", model_dir / METADATA, *weight_files(model_dir)]]
    except (OSError, EncdecError):
        return None


DIGEST_SPAN = 1 << 20  # bytes read from each end of a weight file for `start_model_digest`


def start_model_digest(model: str) -> str | None:
    """A digest of the model a run starts from (--model), by content (unlike `start_model_files`, the same for a copy
    elsewhere). A directory: its configuration and metadata, and each weight file's size and first and last
    DIGEST_SPAN bytes (the header, which names every tensor, and the last tensor's values); a file (GGUF): the same of
    it; a name (packaged or the Hub's): the name. None where they cannot be read. A checkpoint records it, so that a
    run resumed after its --model was replaced (adapted again, another quantization of a GGUF) is refused."""
    digest, path = hashlib.blake2b(digest_size=8), Path(model).expanduser()
    try:
        if path.is_dir():
            for part in [path / "config.json", path / METADATA]:
                digest.update(part.read_bytes() if part.exists() else b"absent")
            for part in weight_files(path):
                _digest_ends(digest, part, part.name)
        elif path.is_file():
            _digest_ends(digest, path, "")  # a copy of the file under another name is the same model
        else:
            digest.update(model.encode())
    except (OSError, EncdecError):
        return None
    return digest.hexdigest()


def _digest_ends(digest: hashlib.blake2b, path: Path, label: str) -> None:
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(DIGEST_SPAN)
        f.seek(max(0, size - DIGEST_SPAN))
        digest.update(f"{label}:{size}".encode() + head + f.read(DIGEST_SPAN))


def check_start_model(saved: dict, model: str, checkpoint: Path, teacher: str | None = None) -> None:
    """Refuse to resume from `checkpoint` when the --model it started from has changed since (its `start_model`
    digest; checkpoints written before it was recorded, or a model that cannot be read, are not checked): the
    tokenizer, the distillation teacher, the rows --trim-vocab does not train and the final model's configuration
    are read from it again. With `teacher` (its digest now), the distillation teacher `model` instead: the same
    path or name holding other weights taught the resumed steps otherwise, unsaid."""
    recorded = saved.get("start_model" if teacher is None else "teacher")
    now = (start_model_digest(model) if teacher is None else teacher) if recorded else None
    if recorded and now and recorded != now:
        if teacher is not None:
            raise EncdecError(f"{checkpoint} was distilled from another teacher than {model} holds now (its "
                              "configuration or weights changed since the run began); resume with the run's teacher, "
                              "or start afresh with --overwrite")
        raise EncdecError(f"{checkpoint} was trained from another model than {model} holds now (another --model, "
                          "or its configuration or weights changed since the run began: adapted again?); resume with "
                          "the run's model, or start afresh with --overwrite")


def recorded_settings(cfg: TrainConfig) -> dict[str, object]:
    """The settings that made a final model, for its provenance (encdec.json): everything but where the run
    wrote and how it was started or logged, paths made portable."""
    return {name: _plain(name, value) for name, value in vars(cfg).items()
            if name not in ("model", "out", "resume", "overwrite", "log_every", "tensorboard", "keep_freed_memory")}


def changed_settings(saved: dict, cfg: TrainConfig, processes: tuple[int, int] = (1, 1)) -> list[str]:
    """The settings a resumed run was given that differ from those its checkpoint was written with, as
    '--name old -> new' (paths compared as found from here). The model is checked by the weights themselves.
    `processes`: the checkpoint's number of processes and this run's. A step reads --batch-size rows on each, so
    the global batch is what the run's course depends on: resumed on half the processes with twice the
    --batch-size, a run goes on as it would have."""
    now = vars(cfg)
    changed = [f"--{name.replace('_', '-')} {_plain(name, saved[name])!r} -> {_plain(name, now[name])!r}"
               for name in now if name not in (*FREE_ON_RESUME, "batch_size") and name in saved
               and _plain(name, saved[name]) != _plain(name, now[name])]
    (before, was), (after, now_) = (saved.get("batch_size", cfg.batch_size), processes[0]), (cfg.batch_size, processes[1])
    if before * was != after * now_:
        changed.append(f"the global batch (--batch-size x processes) {before} x {was} = {before * was} rows -> "
                       f"{after} x {now_} = {after * now_}")
    return changed


def elastic_run() -> str | None:
    """The torchrun job these processes belong to (TORCHELASTIC_RUN_ID): recorded in each checkpoint, so that a
    restart of the same job knows the checkpoints it finds for its own. torchrun's default id, "none" (a static
    rendezvous: several nodes, or --master-port), is every such job's: there the job is its launcher, the workers'
    parent process on this host (its start time beside its number: numbers are reused)."""
    job = os.environ.get("TORCHELASTIC_RUN_ID") or None
    if job != "none":
        return job
    launcher = os.getppid()
    try:
        started = Path(f"/proc/{launcher}/stat").read_text().rsplit(")", 1)[1].split()[19]  # (field 22)
    except (OSError, IndexError):
        started = "?"
    return f"none:{socket.gethostname()}:{launcher}:{started}"


def elastic_restart(cfg: TrainConfig, d: distributed.Dist) -> TrainConfig:
    """`cfg` for a worker group that torchrun started again after a failure (--max-restarts): it runs the same
    command line, and with --overwrite deleted the checkpoints of the attempt that failed and began at step 0
    (hours lost at each restart). Where the last checkpoint was written by this job (`elastic_run`), it resumes from
    it instead; an earlier run's, kept in OUT by an attempt that failed before replacing it, is still replaced.
    Decided by the first process for all (a process of its own view would pair its collectives wrongly)."""
    restarts, job = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"), elastic_run()
    if not cfg.overwrite or restarts in ("", "0") or job is None:
        return cfg
    ours = d.main and _written_by(Path(cfg.out), job)
    if not distributed.from_main(ours, d):
        return cfg
    if d.main:
        log.warning("restart %s of an elastic run (torchrun --max-restarts): resuming from its checkpoints in %s, "
                    "where --overwrite would begin again at step 0", restarts, cfg.out)
    return dataclasses.replace(cfg, overwrite=False, resume=True)


def _written_by(out: Path, job: str) -> bool:
    """Whether the newest checkpoint in OUT that reads back was written by torchrun job `job`: a damaged newer one
    (the failed attempt's last) is passed over, as resuming passes it over; one that cannot be read now (an I/O or
    permission error) counts as ours, so that resuming reports it rather than --overwrite deleting the job's work."""
    for path in reversed(checkpointing.checkpoints(out)):
        try:
            state = read_state(path, "trainer")
        except ReadFailed:
            return True
        except EncdecError:
            continue
        return isinstance(state, dict) and state.get("elastic_run") == job
    return False


def begin(cfg: TrainConfig, start: int, d: distributed.Dist, record: dict | None = None) -> None:
    """Make OUT ready for the first step (`start` steps were done before): the previous run removed
    (--overwrite), or the metrics cut back to the resumed checkpoint, whose step's line (`record`, kept in the
    checkpoint) is put back if the run stopped between writing the checkpoint and logging the step."""
    out = Path(cfg.out)
    if not d.main:
        return
    if (out / "checkpoints").is_dir() and not (out / "checkpoints").is_symlink():  # the run's lock is held: any
        remove_abandoned_temporaries(out / "checkpoints", anyone=True)  # half-written checkpoint is a killed run's
    if cfg.resume:  # steps logged after the checkpoint will be run again
        _truncate_metrics(out / "metrics.jsonl", start, record)
        _set_aside_damaged(out, start)
    elif cfg.overwrite:
        remove_outputs(out)


def remove_outputs(out: Path) -> None:
    """Delete what a run wrote in OUT (OUTPUTS), nothing else (`foreign_output` refused another folder of one of
    those names before)."""
    for name in OUTPUTS:
        target = out / name
        with written(target):  # not ignored: a previous run's checkpoints left would be the new run's
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:  # a file, or a link (to a directory elsewhere, which stays): the run's own name for it goes
                target.unlink(missing_ok=True)


def _set_aside_damaged(out: Path, start: int) -> None:
    """Rename the checkpoints past the resumed one (`resume_point` skipped them as unreadable) out of the run's
    list, kept for a look: one the resumed run did not write again (another --save-every) counted as the newest
    of the schedule, so --keep-last deleted a good checkpoint for it and --average-last read it."""
    for path in checkpointing.checkpoints(out):
        if checkpointing.step_of(path) > start:
            aside = path.with_name(f".{path.name}.damaged-{time.time_ns()}")
            os.replace(path, aside)
            log.warning("set aside the damaged %s as %s: no schedule counts it", path.name, aside.name)


def _truncate_metrics(path: Path, last_step: int, last_record: dict | None) -> None:
    refuse_link(path)
    kept, damaged, last_logged = [], 0, False
    # (none yet where the first checkpoint came before a line was logged: --save-every below --log-every)
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        try:
            record = parse_json(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError, OverflowError):  # OverflowError: {"step": 1e999}
            damaged += 1
            continue
        if step <= last_step:
            kept.append(line)
            last_logged |= step == last_step
    if last_record is not None and not last_logged:
        kept.append(json.dumps(last_record))
    if damaged:
        log.warning("%s: dropped %d unreadable line(s), cut short by a crash?", path, damaged)
    if kept or path.exists():
        atomic_write(path, "".join(line + "\n" for line in kept))
