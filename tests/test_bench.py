"""The study scripts of bench/ run end to end on a tiny model (their numbers come from real runs, in docs/)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from test_training import adapted, corpus

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_recovery_study_writes_results_and_a_plot_and_resumes(adapted, corpus, tmp_path):
    out = tmp_path / "study"
    command = [sys.executable, str(BENCH / "recovery.py"), "--model", str(adapted), "--out", str(out), "--steps", "2",
               "--eval-every", "1", "--recipe", f"trimmed:trim_vocab=40,trim_negatives=16,data=[{corpus}]"]
    first = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    scored = [r for r in records if r.get("recipe") == "trimmed" and "step" in r]
    assert [r["step"] for r in scored] == [1, 2] and all(set(r["nll"]) == {"python-docs", "general-english"}
                                                         for r in scored)
    assert (out / "recovery.png").stat().st_size > 10_000
    assert "gap to the source after 1024 tokens, trimmed" in first.stdout
    second = subprocess.run(command, capture_output=True, text=True, timeout=600)  # everything is done: nothing reruns
    assert second.returncode == 0 and len((out / "results.jsonl").read_text().splitlines()) == len(records)
