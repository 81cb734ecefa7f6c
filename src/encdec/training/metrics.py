"""Step metrics: one JSON line per step in OUT/metrics.jsonl, optional TensorBoard, a progress bar (or, off a
terminal, a line of progress every minute)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from encdec.files import open_own

PLAIN_EVERY_S = 60.0  # off a terminal (nohup, Slurm), a progress line at most this often


class Metrics:
    def __init__(self, out: Path, *, total: int, start: int, tensorboard: bool, enabled: bool,
                 desc: str = "train", restored: dict[str, Any] | None = None) -> None:
        """`restored`: the line of the resumed checkpoint's step (kept in it), written again to TensorBoard (a run
        that stopped between the checkpoint and its line has it in neither; `rundir.begin` puts it back into
        metrics.jsonl). The files are made at the first record kept: a run that failed in its first step left an
        empty metrics.jsonl, and its OUT was then refused as holding a run."""
        self.enabled, self.out, self.start, self.total, self.desc = enabled, out, start, total, desc
        self.tensorboard, self.restored = tensorboard, restored
        self.file: Any = None
        self.writer = None
        self.bar = None
        if not enabled:
            return
        # a bar on a terminal only (a log file under nohup or Slurm got a line of it every step): there, a line of
        # progress every PLAIN_EVERY_S seconds instead
        self.bar = tqdm(total=total, initial=start, desc=desc, unit="step", dynamic_ncols=True, disable=None)
        self.began = self.said = time.monotonic()

    def _open(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.file = os.fdopen(open_own(self.out / "metrics.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT), "a")
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # importable: TrainConfig.check imported it

            # a resumed run drops the events logged after its checkpoint (metrics.jsonl is cut back the same way),
            # all of them when it stopped before its first checkpoint; a new run has none to drop; the checkpoint's
            # own step's are written again
            _after_earlier_events(self.out / "tensorboard")
            self.writer = SummaryWriter(str(self.out / "tensorboard"), purge_step=self.start + (self.restored is None))
            if self.restored is not None:
                self._scalars(self.restored)

    def log(self, record: dict[str, Any], *, write: bool = True) -> None:
        """Move the progress bar to the record's step; with `write`, also keep the record (metrics.jsonl and
        TensorBoard: every --log-every steps, while the bar moves every step)."""
        if not self.enabled:
            return
        if write:
            if self.file is None:
                self._open()
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
            if self.writer is not None:
                self._scalars(record)
        # a distilling run's loss mixes in the teacher's KL: its cross-entropy is what eval_loss is to be read against
        keys = ("loss", "ce", "eval_loss", "tokens_per_s") if "kl" in record else ("loss", "eval_loss", "tokens_per_s")
        shown = {k: record[k] for k in keys if k in record}
        self.bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=False)
        self.bar.update(record["step"] - self.bar.n)
        now = time.monotonic()
        if self.bar.disable and (now - self.said >= PLAIN_EVERY_S or record["step"] == self.total):
            self.said = now
            done = record["step"] - self.start
            left = (self.total - record["step"]) * (now - self.began) / max(done, 1)
            values = ", ".join(f"{k} {v:.4g}" for k, v in shown.items())
            self.message(f"{self.desc}: step {record['step']}/{self.total} ({100 * record['step'] // self.total}%), "
                         f"{values}, {done / max(now - self.began, 1e-9):.3g} steps/s, about {_duration(left)} left")

    def _scalars(self, record: dict[str, Any]) -> None:
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float):
                self.writer.add_scalar(key, value, record["step"])

    def message(self, text: str) -> None:
        if self.enabled:
            tqdm.write(f"encdec: {text}", file=sys.stderr)  # stdout holds what a run hands on

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            if self.file is not None:
                self.file.close()
            if self.writer is not None:
                self.writer.close()


def _after_earlier_events(folder: Path) -> None:
    """Wait, if need be, into the second after the newest event file's: TensorBoard reads a folder's files in the
    order of their names (a second's, then host, process and a counter that is not zero-padded: ...9 after ...10),
    and a resumed run's file read before the run's earlier one had its steps purged as out of order (a resume in
    the same second and process: the tests')."""
    seconds = []
    for path in folder.glob("events.out.tfevents.*"):
        with contextlib.suppress(IndexError, ValueError):
            seconds.append(int(path.name.split(".")[3]))
    wait = max(seconds, default=0) + 1 - time.time()
    if 0 < wait <= 1:
        time.sleep(wait)


def _duration(seconds: float) -> str:
    """3 h 05 min, 12 min, 40 s."""
    minutes = round(seconds / 60)
    if minutes >= 60:
        return f"{minutes // 60} h {minutes % 60:02d} min"
    return f"{minutes} min" if minutes else f"{round(seconds)} s"
