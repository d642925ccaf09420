"""Which lm-eval GSM8K task to run: the stock one (data from the Hub) or the same
task reading a local copy of the data (offline).

The offline task is lm-eval's own ``gsm8k.yaml``, included by path, with only
the data source replaced (``dataset_path: json`` over ``train.jsonl`` /
``test.jsonl``), so the prompts, the 5-shot sampler, the stop strings, the
``strict-match`` / ``flexible-extract`` filters and the metric are lm-eval's,
unchanged. The YAML is written next to the run's outputs so the run can be
repeated by hand with ``lm_eval --include_path``.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

STOCK_TASK = "gsm8k"
LOCAL_TASK = "gsm8k_local"
# lm-eval's two GSM8K filters, in the order the report shows them.
FILTERS = ("strict-match", "flexible-extract")
SPLIT_FILES = ("train.jsonl", "test.jsonl")


@dataclass(frozen=True)
class TaskSpec:
    """A GSM8K task lm-eval can load: its name and, for the offline task, the
    folder holding its YAML (lm-eval's ``include_path``) and the data folder."""

    name: str
    include_path: Path | None = None
    data_dir: Path | None = None

    @property
    def offline(self) -> bool:
        return self.data_dir is not None

    def describe(self) -> dict[str, str | None]:
        return {
            "task": self.name,
            "source": f"local JSONL in {self.data_dir}" if self.offline else "lm-eval stock task (Hugging Face Hub)",
            "task_yaml": str(self.include_path / f"{self.name}.yaml") if self.include_path else None,
        }


def stock_task_yaml() -> Path:
    """Path of the installed lm-eval's ``tasks/gsm8k/gsm8k.yaml`` (without importing lm-eval)."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "lm-eval is not installed; install this package's `eval` extra (pip install 'vllm-rocm-fused[eval]')"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "tasks" / "gsm8k" / "gsm8k.yaml"
    if not path.is_file():
        raise RuntimeError(f"this lm-eval has no stock GSM8K task at {path}")
    return path


def check_data_dir(data_dir: str | Path) -> Path:
    """The absolute data folder; raises ``ValueError`` naming what is missing or malformed.

    Each file must be JSON lines with ``question`` and ``answer`` (the layout of
    openai/gsm8k's ``main`` config)."""
    folder = Path(data_dir).expanduser().resolve()
    if not folder.is_dir():
        raise ValueError(f"--data-dir {data_dir}: not a folder (it must hold {' and '.join(SPLIT_FILES)})")
    for name in SPLIT_FILES:
        path = folder / name
        if not path.is_file():
            raise ValueError(f"--data-dir {data_dir}: missing {name} (GSM8K JSONL with question/answer)")
        with path.open(encoding="utf-8") as fh:
            first = fh.readline()
        try:
            row = json.loads(first)
        except ValueError:
            raise ValueError(f"{path}: first line is not JSON") from None
        if not isinstance(row, dict) or not {"question", "answer"} <= row.keys():
            raise ValueError(f"{path}: rows need 'question' and 'answer' keys, got {sorted(row)}")
    return folder


def local_task_yaml(data_dir: Path, stock_yaml: Path) -> str:
    """The offline task's YAML text (paths are written as JSON strings, valid YAML)."""
    data_files = {split: str(data_dir / f"{split}.jsonl") for split in ("train", "test")}
    return "\n".join(
        [
            "# lm-eval's stock GSM8K task with a local data source (written by vllm-rocm-fused eval gsm8k).",
            f"include: {json.dumps(str(stock_yaml))}",
            f"task: {LOCAL_TASK}",
            "tag: []",
            "dataset_path: json",
            "dataset_name: null",
            "dataset_kwargs:",
            "  data_files:",
            f"    train: {json.dumps(data_files['train'])}",
            f"    test: {json.dumps(data_files['test'])}",
            "",
        ]
    )


def resolve_task(data_dir: str | Path | None, work_dir: str | Path) -> TaskSpec:
    """The stock task when ``data_dir`` is None, else the offline task, whose YAML
    is written to ``work_dir/tasks/``."""
    if data_dir is None:
        return TaskSpec(STOCK_TASK)
    folder = check_data_dir(data_dir)
    include = Path(work_dir).resolve() / "tasks"
    include.mkdir(parents=True, exist_ok=True)
    (include / f"{LOCAL_TASK}.yaml").write_text(local_task_yaml(folder, stock_task_yaml()))
    return TaskSpec(LOCAL_TASK, include_path=include, data_dir=folder)
