"""Step metrics: one JSON line per step in OUT/metrics.jsonl, optional TensorBoard, a progress bar."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from encdec.files import open_own


class Metrics:
    def __init__(self, out: Path, *, total: int, start: int, tensorboard: bool, enabled: bool,
                 desc: str = "train", restored: dict[str, Any] | None = None) -> None:
        """`restored`: the line of the resumed checkpoint's step (kept in it), written again to TensorBoard (a run
        that stopped between the checkpoint and its line has it in neither; `rundir.begin` puts it back into
        metrics.jsonl)."""
        self.enabled = enabled
        self.writer = None
        self.bar = None
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        self.file = os.fdopen(open_own(out / "metrics.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT), "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # importable: TrainConfig.check imported it

            # a resumed run drops the events logged after its checkpoint (metrics.jsonl is cut back the same way),
            # all of them when it stopped before its first checkpoint; a new run has none to drop; the checkpoint's
            # own step's are written again
            self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=start + (restored is None))
            if restored is not None:
                self._scalars(restored)
        # a bar on a terminal only (a log file under nohup or Slurm got a line of it every step)
        self.bar = tqdm(total=total, initial=start, desc=desc, unit="step", dynamic_ncols=True, disable=None)

    def log(self, record: dict[str, Any], *, write: bool = True) -> None:
        """Move the progress bar to the record's step; with `write`, also keep the record (metrics.jsonl and
        TensorBoard: every --log-every steps, while the bar moves every step)."""
        if not self.enabled:
            return
        if write:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
            if self.writer is not None:
                self._scalars(record)
        shown = {k: record[k] for k in ("loss", "eval_loss", "tokens_per_s") if k in record}
        self.bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=False)
        self.bar.update(record["step"] - self.bar.n)

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
            self.file.close()
            if self.writer is not None:
                self.writer.close()
