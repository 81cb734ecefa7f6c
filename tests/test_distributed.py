"""Two real CPU processes (gloo) under torchrun and accelerate launch: ranks stay in sync and the loss falls."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import write_corpus

from encdec.cli import main
from encdec.training.distributed import Dist, share

ACCELERATE_CONFIG = Path(__file__).parents[1] / "configs" / "accelerate-multi-gpu.yaml"


def launcher(name: str) -> list[str]:
    """The start of a command line that runs `python -m encdec.cli ...` as 2 processes."""
    if name == "torchrun":
        torchrun = shutil.which("torchrun") or pytest.fail("torchrun not found")
        return [torchrun, "--standalone", "--nproc_per_node", "2", "--no-python", sys.executable, "-m", "encdec.cli"]
    # the shipped config, as the README's launch line uses it; on a machine without GPUs it runs on CPU
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIG),
            "--num_processes", "2", "-m", "encdec.cli"]


@pytest.mark.parametrize(("launch", "fsdp"), [("torchrun", False), ("torchrun", True), ("accelerate", False),
                                             ("accelerate", True)],
                         ids=["torchrun-ddp", "torchrun-fsdp2", "accelerate-ddp", "accelerate-fsdp2"])
def test_two_processes(sources, tmp_path, launch, fsdp):
    model = tmp_path / "model"
    assert main(["adapt", "--encoder", str(sources["gemma3"]), "--out", str(model)]) == 0
    corpus = write_corpus(tmp_path / "corpus.txt", documents=80)
    out = tmp_path / "run"
    command = [
        *launcher(launch),
        "pretrain", "--model", str(model), "--out", str(out), "--data", str(corpus), "--enc-len", "16",
        "--dec-len", "16", "--batch-size", "2", "--steps", "8", "--lr", "3e-3", "--warmup-steps", "2",
        "--save-every", "4", "--eval-windows", "6", "--precision", "fp32", *(["--fsdp"] if fsdp else []),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # a run takes 10-20 s; a hang fails after 150
    result = subprocess.run(command, capture_output=True, text=True, timeout=150, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("final model:") == 1  # reported by rank 0 only
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))  # only rank 0 writes
    if not fsdp:
        synced = [r["ranks_in_sync"] for r in records if "ranks_in_sync" in r]
        assert synced == [True, True]
    assert sum(r["loss"] for r in records[-2:]) < sum(r["loss"] for r in records[:2])
    # 6 held-out windows in batches of 2 rows: 3 batches, so one process makes a spare pass
    assert [r["step"] for r in records if "eval_loss" in r] == [8]
    assert (out / "model" / "config.json").exists()


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_processes_weigh_every_token_alike(sources, tmp_path, fsdp):
    """UL2 rows hold different numbers of target tokens: two processes of one row each must take the step one
    process takes on both rows (the global token mean, as gradient accumulation does), not the mean of the two
    processes' means. The held-out loss too, over 3 rows: the second process's second pass is a spare one (FSDP2's
    collectives need every process in every pass), not counted."""
    import torch

    import encdec

    model = tmp_path / "model"
    assert main(["adapt", "--encoder", str(sources["gemma3"]), "--out", str(model)]) == 0
    corpus = write_corpus(tmp_path / "corpus.txt", documents=80)
    common = ["pretrain", "--model", str(model), "--data", str(corpus), "--objective", "ul2", "--enc-len", "16",
              "--dec-len", "16", "--steps", "1", "--lr", "3e-3", "--warmup-steps", "1", "--eval-windows", "3",
              "--precision", "fp32", "--seed", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*launcher("torchrun"), *common, "--batch-size", "1", "--out", str(tmp_path / "two"),
                             *(["--fsdp"] if fsdp else [])], capture_output=True, text=True, timeout=150, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert main([*common, "--batch-size", "2", "--out", str(tmp_path / "one")]) == 0
    one, two = ([json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()][0]
                for name in ("one", "two"))
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5) and two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4)
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-5)
    a, b = (encdec.load(tmp_path / name / "model").state_dict() for name in ("one", "two"))
    # AdamW's first step moves each weight by lr * g / (|g| + eps): about lr (3e-3) whatever the gradient's size, but a
    # gradient that cancels to near eps moves by a fraction of it that float rounding changes (1.7e-5 measured on an
    # AVX2 CPU); weighing the rows wrongly flips the sign of some weights' steps, a 2 * lr difference
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((int(v.split(b"=", 1)[1]) for v in env if v.startswith(b"RANK=")), None)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the workers through /proc (Linux)")
def test_a_signal_reaching_one_process_stops_both_at_the_same_step(sources, tmp_path):
    """SIGTERM to rank 1 only: both processes decide to stop at the same step, write its checkpoint together
    and exit (deciding apart, one waited forever in the checkpoint's collectives); the run resumes."""
    import signal
    import time

    model = tmp_path / "model"
    assert main(["adapt", "--encoder", str(sources["gemma3"]), "--out", str(model)]) == 0
    corpus = write_corpus(tmp_path / "corpus.txt", documents=80)
    out = tmp_path / "run"
    command = [*launcher("torchrun"), "pretrain", "--model", str(model), "--out", str(out), "--data", str(corpus),
               "--enc-len", "16", "--dec-len", "16", "--batch-size", "1", "--steps", "400", "--save-every", "1000",
               "--eval-windows", "4", "--precision", "fp32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                           start_new_session=True)  # its process group: a hang is cleaned up, workers included
    try:
        deadline = time.monotonic() + 90
        while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 2):
            assert run.poll() is None and time.monotonic() < deadline, "the run did not start"
            time.sleep(0.2)
        workers = [pid for agent in [run.pid] for pid in _children(agent)]
        rank1 = next(pid for pid in workers if _rank_of(pid) == 1)
        os.kill(rank1, signal.SIGTERM)
        said, err = run.communicate(timeout=90)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)
    stopped = [line for line in err.splitlines() if "stopped at step" in line]  # on stderr, as every message
    assert len(stopped) == 1, (said + err)[-3000:]  # reported by rank 0
    step = int(stopped[0].split("stopped at step ")[1].split(";")[0])
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step-{step:06d}"]
    resumed = subprocess.run([*command[:-8], "--steps", str(step + 1), "--save-every", "1000", "--eval-windows", "4",
                              "--precision", "fp32", "--resume"], capture_output=True, text=True, timeout=150, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == step + 1


def test_every_item_is_shared_out_once_and_every_process_makes_the_same_passes():
    for world in range(1, 6):
        for n in range(20):
            shares = [share(n, Dist(rank, world)) for rank in range(world)]
            assert len({len(s) for s in shares}) == 1
            assert sorted(i for s in shares for i in s if i is not None) == list(range(n))


def test_what_accelerate_was_asked_and_encdec_does_not_take_is_said(monkeypatch):
    """accelerate exports its config's choices (the default `accelerate config` file's too): FSDP asked of it ran
    DDP, a whole model per GPU, without a word. Its default mixed precision "no" (the shipped config's) asks nothing."""
    from encdec.training.distributed import accelerate_settings_ignored

    for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_MIXED_PRECISION", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS"):
        monkeypatch.delenv(name, raising=False)
    assert accelerate_settings_ignored(False, "bf16", 1) == []
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")
    said = accelerate_settings_ignored(False, "bf16", 1)
    assert [s.split(" (")[0] for s in said] == ["FSDP", "gradient accumulation 4 steps"]
    assert accelerate_settings_ignored(True, "bf16", 4) == []
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    assert accelerate_settings_ignored(True, "bf16", 4) == [
        "mixed precision fp16 (encdec's --precision decides: bf16 here; it offers fp32 and bf16)"]
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert accelerate_settings_ignored(True, "bf16", 4) == [] and len(accelerate_settings_ignored(True, "fp32", 4)) == 1


def test_a_run_says_the_accelerate_settings_it_does_not_take(sources, tmp_path, monkeypatch):
    from encdec.training import loop

    model, corpus = _tiny_run_inputs(sources, tmp_path)
    warned: list[str] = []
    monkeypatch.setattr(loop.log, "warning", lambda message, *args: warned.append(message % args))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert main([*_pretrain_args(model, corpus, tmp_path / "run"), "--steps", "1"]) == 0
    assert any(w.startswith("accelerate launch's settings are not read, encdec's own options are: FSDP (")
               for w in warned), warned


def _tiny_run_inputs(sources, tmp_path: Path) -> tuple[Path, Path]:
    """An adapted tiny model and a corpus for two-process runs."""
    model = tmp_path / "model"
    assert main(["adapt", "--encoder", str(sources["gemma3"]), "--out", str(model)]) == 0
    return model, write_corpus(tmp_path / "corpus.txt", documents=80)


def _pretrain_args(model: Path, corpus: Path, out: Path) -> list[str]:
    return ["pretrain", "--model", str(model), "--out", str(out), "--data", str(corpus), "--enc-len", "16",
            "--dec-len", "16", "--batch-size", "1", "--save-every", "2", "--eval-windows", "4", "--precision", "fp32"]


def _two_processes_with(driver: str, tmp_path: Path, args: list[str]) -> tuple[int, str]:
    """`args` run by the script `driver` (encdec's main, something patched first) as 2 processes under torchrun:
    the exit status and everything both printed."""
    path = tmp_path / "driver.py"
    path.write_text(driver)
    torchrun = shutil.which("torchrun") or pytest.fail("torchrun not found")
    result = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "--no-python", sys.executable,
                             str(path), *args], capture_output=True, text=True, timeout=150,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    return result.returncode, result.stdout + result.stderr


DISK_FULL_AT_STEP_4 = """
import sys

from encdec.cli import main
from encdec.training import checkpointing

original = checkpointing.write_state


def full_disk(directory, name, state):
    if "step-000004" in str(directory):
        raise OSError(28, "No space left on device")
    return original(directory, name, state)


checkpointing.write_state = full_disk
sys.exit(main(sys.argv[1:]))
"""


def test_a_checkpoint_the_first_process_cannot_write_stops_both_with_one_line(sources, tmp_path):
    """Only the first process holds the gathered state and writes it: a full disk (or a weight gone NaN) stopped it
    alone, and the other went on into the next step's collectives, where it failed with gloo's traceback (or, on
    NCCL, waited until torchrun killed it). Both now stop with the same line, and the last good checkpoint stays."""
    model, corpus = _tiny_run_inputs(sources, tmp_path)
    out = tmp_path / "run"
    returncode, said = _two_processes_with(DISK_FULL_AT_STEP_4, tmp_path, [*_pretrain_args(model, corpus, out),
                                                                          "--steps", "8"])
    assert returncode != 0
    # the two processes' lines may reach the pipe run together: counted in the whole output
    assert said.count("could not write the checkpoint of step 4") == 2, said[-3000:]
    assert said.count("No space left on device); stopped (the last good checkpoint is") == 2
    assert "Connection closed" not in said and "exitcode: 2" in said, said[-3000:]  # the workers' exit, no gloo error
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]
    # the step's line kept in the checkpoint (put back on --resume after a crash) says the ranks agreed, as the
    # logged one does: it was kept before the check
    from encdec.training.plain_state import read_state

    assert read_state(out / "checkpoints" / "step-000002", "trainer")["record"]["ranks_in_sync"] is True


RACED_AT_STEP_4 = """
import contextlib
import sys

from encdec.cli import main
from encdec.errors import EncdecError
from encdec.training import checkpointing

original = checkpointing.atomic_dir


@contextlib.contextmanager
def raced(path, overwrite=False):
    with original(path, overwrite) as tmp:
        yield tmp
        if "step-000004" in str(path):
            raise EncdecError(f"{path} was written by another process while this one wrote it")


checkpointing.atomic_dir = raced
sys.exit(main(sys.argv[1:]))
"""


def test_a_checkpoint_directory_the_first_process_refuses_stops_both_with_one_line(sources, tmp_path):
    """The checkpoint's directory refused as it is put in place (another process wrote it meanwhile, or a file
    took its name) stopped the first process alone, the other waiting in the next collective."""
    model, corpus = _tiny_run_inputs(sources, tmp_path)
    out = tmp_path / "run"
    returncode, said = _two_processes_with(RACED_AT_STEP_4, tmp_path, [*_pretrain_args(model, corpus, out),
                                                                       "--steps", "8", "--dist-timeout", "60"])
    assert returncode != 0
    assert said.count("could not write the checkpoint of step 4") == 2, said[-3000:]
    assert said.count("written by another process while this one wrote it); stopped") == 2, said[-3000:]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]


def test_a_run_directory_file_the_first_process_refuses_stops_both_with_one_line(sources, tmp_path):
    """Only the first process prepares OUT's files (metrics cut back on --resume, the metrics file opened): its
    refusal of a linked metrics.jsonl stopped it alone, the other waiting in the first step until --dist-timeout."""
    model, corpus = _tiny_run_inputs(sources, tmp_path)
    out = tmp_path / "run"
    assert main([*_pretrain_args(model, corpus, out), "--steps", "2"]) == 0
    (tmp_path / "elsewhere.jsonl").write_text((out / "metrics.jsonl").read_text())
    (out / "metrics.jsonl").unlink()
    (out / "metrics.jsonl").symlink_to(tmp_path / "elsewhere.jsonl")
    returncode, said = _two_processes_with("import sys\nfrom encdec.cli import main\nsys.exit(main(sys.argv[1:]))\n",
                                           tmp_path, [*_pretrain_args(model, corpus, out), "--steps", "4", "--resume",
                                                      "--dist-timeout", "60"])
    # the two processes' lines may reach the pipe run together: counted in the whole output
    assert returncode != 0 and said.count("metrics.jsonl is a symbolic link") == 2, said[-3000:]
    assert "exitcode: 2" in said, said[-3000:]


NO_CHECKPOINT_ON_RANK_1 = """
import os
import sys

from encdec.cli import main
from encdec.training import checkpointing

if os.environ["RANK"] == "1":  # as a second machine whose --out is a local directory of its own
    checkpointing.latest_usable = lambda out, d: None
sys.exit(main(sys.argv[1:]))
"""


def test_processes_that_find_different_checkpoints_refuse_to_resume(sources, tmp_path):
    """Each process reads --out itself: on machines that do not share it, one resumed at step 4 and the other
    started afresh, their loops of different lengths (a hang at the end) and their weights apart."""
    model, corpus = _tiny_run_inputs(sources, tmp_path)
    out = tmp_path / "run"
    assert main([*_pretrain_args(model, corpus, out), "--steps", "4"]) == 0
    returncode, said = _two_processes_with(NO_CHECKPOINT_ON_RANK_1, tmp_path, [*_pretrain_args(model, corpus, out),
                                                                              "--steps", "6", "--resume"])
    # the two processes' lines may reach the pipe run together: counted in the whole output
    assert returncode != 0 and said.count("found different checkpoints to resume") == 2, said[-3000:]
    assert "(this one: " + str(out / "checkpoints" / "step-000004") + ")" in said and "(this one: none)" in said
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]


OTHER_DATA_ON_RANK_1 = """
import os
import sys

from encdec.cli import main
from encdec.training import plan

if os.environ["RANK"] == "1":  # as a node whose copy of the data differs
    original = plan.token_stream
    plan.token_stream = lambda *args, **kwargs: original(*args, **kwargs)[::-1].copy()
sys.exit(main(sys.argv[1:]))
"""


def test_processes_that_read_different_data_refuse_to_train(sources, tmp_path):
    """Each process builds the whole global batch and takes its own rows: with another copy of the data on one
    node (or another Python's packaged corpus, another --trim-vocab choice) they trained on batches that were not
    one batch, silently."""
    model, corpus = _tiny_run_inputs(sources, tmp_path)
    returncode, said = _two_processes_with(OTHER_DATA_ON_RANK_1, tmp_path,
                                           [*_pretrain_args(model, corpus, tmp_path / "run"), "--steps", "2"])
    assert returncode != 0 and said.count("the processes read different training data") == 2, said[-3000:]
    assert not (tmp_path / "run" / "model").exists()


SLOW_CHECKPOINT_AT_STEP_4 = """
import sys
import time

from encdec.cli import main
from encdec.training import checkpointing

original = checkpointing.write_state


def slow_disk(directory, name, state):
    if "step-000004" in str(directory):
        time.sleep(5)
    return original(directory, name, state)


checkpointing.write_state = slow_disk
sys.exit(main(sys.argv[1:]))
"""


def test_the_others_wait_for_a_slow_checkpoint_as_long_as_dist_timeout_says(sources, tmp_path):
    """While the first process writes a checkpoint the others wait in a collective; NCCL gives up after 10 minutes
    by default, less than writing a large model can take. --dist-timeout sets the wait: 2 s stop the run at the
    5-second write, the default lets it finish."""
    model, corpus = _tiny_run_inputs(sources, tmp_path)

    def run(out: Path, *timeout: str) -> tuple[int, str]:
        args = [*_pretrain_args(model, corpus, out), "--steps", "6", *timeout]
        return _two_processes_with(SLOW_CHECKPOINT_AT_STEP_4, tmp_path, args)

    returncode, said = run(tmp_path / "impatient", "--dist-timeout", "2")
    assert returncode != 0 and "Timed out waiting 2000ms" in said, said[-3000:]  # gloo's own words
    returncode, said = run(tmp_path / "patient")
    assert returncode == 0, said[-3000:]
    assert (tmp_path / "patient" / "model" / "model.safetensors").exists()


TORCHRUN = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE is 2 but RANK, MASTER_ADDR, MASTER_PORT is not set"),  # a ValueError escaped
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE ('two') and LOCAL_RANK (None) must be integers"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE is 0: the number of processes is at least 1"),
    (dict(TORCHRUN, RANK="one"), "RANK is 'one': each of the WORLD_SIZE 2 processes has a rank from 0 to 1"),
    (dict(TORCHRUN, RANK="2"), "RANK is '2': each of the WORLD_SIZE 2 processes"),
    (dict(TORCHRUN, MASTER_PORT="http"), "MASTER_PORT is 'http': a TCP port number (1 to 65535)"),
    # digits str.isdigit() takes and int() refuses: ValueError tracebacks
    (dict(TORCHRUN, RANK="\u00b2"), "RANK is '\u00b2': each of the WORLD_SIZE 2 processes"),
    (dict(TORCHRUN, MASTER_PORT="\u0663"), "MASTER_PORT is '\u0663': a TCP port number"),
    (dict(TORCHRUN, WORLD_SIZE="\u0662"), "WORLD_SIZE ('\u0662') and LOCAL_RANK ('0') must be integers"),
    (dict(TORCHRUN, WORLD_SIZE="2_0"), "WORLD_SIZE ('2_0') and LOCAL_RANK ('0') must be integers"),
])
def test_a_launch_environment_that_is_not_torchruns_is_one_line(tmp_path, capsys, monkeypatch, env, message):
    """WORLD_SIZE left in a shell, with `encdec pretrain` run directly: a traceback from the process group."""
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["pretrain", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "run")]) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "error:" in x]
    assert message in line


def test_two_processes_on_a_node_of_one_gpu_is_one_line(monkeypatch):
    """torchrun --nproc-per-node 2 on one GPU: both processes took cuda:0, and NCCL's first collective failed with
    "invalid usage", said as another process of the run having stopped."""
    import torch
    import torch.distributed as torch_dist

    from encdec.errors import EncdecError
    from encdec.training import distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch_dist, "init_process_group", lambda *a, **k: pytest.fail("the group was started"))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    env = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "29500"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(EncdecError, match="2 processes on this node but it shows them 1 GPU"):
        distributed.init()
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch_dist, "is_initialized", lambda: True)
    monkeypatch.setattr(torch_dist, "get_rank", lambda: 1)
    # torchrun with each process shown its own GPU (CUDA_VISIBLE_DEVICES=$LOCAL_RANK) was refused with the same
    # line; the GPUs' UUIDs, gathered over a CPU group, tell it from one GPU shown to all
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    seen: list[tuple[str, str]] = []
    monkeypatch.setattr(torch_dist, "new_group", lambda backend, timeout: f"a {backend} group, {timeout.seconds} s")
    destroyed: list[object] = []
    monkeypatch.setattr(torch_dist, "destroy_process_group", lambda group=None: destroyed.append(group))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: type("Props", (), {"uuid": "GPU-1"})())

    def gather(out, mine, group):
        assert group == "a gloo group, 1800 s"  # as long as --dist-timeout, not PyTorch's default
        out[:] = [*seen, mine]

    monkeypatch.setattr(torch_dist, "all_gather_object", gather)
    seen[:] = [("node", "GPU-0")]
    assert distributed.init().device == torch.device("cuda:0")
    seen[:] = [(socket.gethostname(), "GPU-1")]  # CUDA_VISIBLE_DEVICES=1 exported to both
    destroyed.clear()
    with pytest.raises(EncdecError, match=r"processes 0, 1 on .* were shown the same GPU \(CUDA_VISIBLE_DEVICES=1"):
        distributed.init()
    assert destroyed == ["a gloo group, 1800 s", None]  # the run's group too: refused, nothing tears it down later
    assert distributed.shared_gpus([("a", "x"), ("b", "x"), ("a", "y"), ("a", "x")]) == [[0, 3]]
    # Slurm's way (each process shown its own GPU as cuda:0, no LOCAL_WORLD_SIZE) takes part too: a process that
    # compared while another of the run did not waited for it until the group's timeout
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    seen[:] = [("node", "GPU-0")]
    assert distributed.init().device == torch.device("cuda:0")
    seen[:] = [(socket.gethostname(), "GPU-1")]
    with pytest.raises(EncdecError, match=r"processes 0, 1 on .* were shown the same GPU"):
        distributed.init()


def test_a_collective_that_times_out_is_one_line(capsys, monkeypatch):
    """A process of the run gone, or past --dist-timeout: torch's DistError (a RuntimeError) came out as a
    traceback on every process left."""
    import argparse

    import torch.distributed as torch_dist

    from encdec import cli

    def timed_out(args):
        raise torch_dist.DistBackendError("[Rank 1] Watchdog caught collective operation timeout\nmore")

    build = cli.build_parser

    def parser_raising():
        parser = build()
        next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["info"].set_defaults(
            func=timed_out)
        return parser

    monkeypatch.setattr(cli, "build_parser", parser_raising)
    assert main(["info", "x"]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert "another process of the run stopped, or did not answer within --dist-timeout" in line
    assert "Watchdog caught collective operation timeout" in line and "more" not in line


def test_accelerates_one_process_launch_for_several_is_refused(adapted, corpus, tmp_path):
    """`accelerate launch --cpu --num_processes 2` (or without a multi-GPU configuration) starts one process through
    its simple launcher, naming an address for two: it trained alone, on half the global batch, without a word."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf")}  # no `accelerate config` file of this machine's
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m",
                           "encdec.cli", *_pretrain_args(adapted, corpus, tmp_path / "run"), "--steps", "1"],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode != 0 and not (tmp_path / "run").exists()
    assert "accelerate launch started this one process for several" in done.stderr, done.stderr[-2000:]


def test_processes_after_the_first_log_warnings_only_marked_with_their_rank(monkeypatch):
    """Every process of a run said each stage ("loaded ...", "teacher: ..."): 8 GPUs, 8 times each line."""
    import logging

    from encdec.logs import log, setup

    try:
        for rank, world, level, prefix in (("0", "4", logging.INFO, "encdec: "),
                                           ("3", "4", logging.WARNING, "encdec (rank 3): "),
                                           ("3", "1", logging.INFO, "encdec: ")):  # a RANK left in a shell: alone
            monkeypatch.setenv("RANK", rank)
            monkeypatch.setenv("WORLD_SIZE", world)
            setup()
            (handler,) = log.handlers
            assert log.level == level
            assert handler.format(logging.makeLogRecord({"msg": "said"})) == f"{prefix}said"
    finally:
        monkeypatch.delenv("RANK")
        monkeypatch.delenv("WORLD_SIZE")
        setup()
