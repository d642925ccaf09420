"""The offline GSM8K task: lm-eval's stock task with only the data source replaced."""

from __future__ import annotations

import json

import pytest
from gsm8k_fakes import MINI_TEST, SHARED_GSM8K

from vllm_rocm_fused.eval.gsm8k_task import LOCAL_TASK, STOCK_TASK, check_data_dir, resolve_task, stock_task_yaml

lm_eval = pytest.importorskip("lm_eval")


def load_task(spec, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(spec.include_path), include_defaults=False)
    return manager.load([spec.name])["tasks"][spec.name]


def test_no_data_dir_means_stock_task(tmp_path):
    spec = resolve_task(None, tmp_path)
    assert spec.name == STOCK_TASK and not spec.offline and spec.include_path is None
    assert not (tmp_path / "tasks").exists()


def test_local_task_is_the_stock_task_on_local_files(tmp_path, mini_gsm8k, monkeypatch):
    from lm_eval.tasks._yaml_loader import load_yaml

    spec = resolve_task(mini_gsm8k, tmp_path)
    assert spec.name == LOCAL_TASK and spec.offline
    task = load_task(spec, monkeypatch)
    docs = list(task.test_docs())
    assert [d["question"] for d in docs] == [q for q, _, _ in MINI_TEST]
    assert len(list(task.training_docs())) == 6

    stock = load_yaml(stock_task_yaml())
    cfg = task.config
    assert cfg.num_fewshot == 5 == stock["num_fewshot"]
    assert cfg.doc_to_text == stock["doc_to_text"]
    assert cfg.generation_kwargs == stock["generation_kwargs"]
    assert cfg.filter_list == stock["filter_list"]
    assert cfg.metric_list == stock["metric_list"]
    assert [f["name"] for f in cfg.filter_list] == ["strict-match", "flexible-extract"]

    prompt = task.fewshot_context(docs[0], 5)
    assert prompt.count("Question: ") == 6 and prompt.endswith(f"Question: {MINI_TEST[0][0]}\nAnswer:")


@pytest.mark.skipif(
    not (SHARED_GSM8K / "test.jsonl").is_file(),
    reason=f"GSM8K data not found at {SHARED_GSM8K} (a checkout beside ../shared/data/gsm8k)",
)
def test_shared_gsm8k_loads_offline(tmp_path, monkeypatch):
    task = load_task(resolve_task(SHARED_GSM8K, tmp_path), monkeypatch)
    assert len(list(task.test_docs())) == 1319
    assert len(list(task.training_docs())) == 7473


def test_data_dir_errors(tmp_path):
    with pytest.raises(ValueError, match="not a folder"):
        check_data_dir(tmp_path / "none")
    (tmp_path / "train.jsonl").write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n")
    with pytest.raises(ValueError, match="missing test.jsonl"):
        check_data_dir(tmp_path)
    (tmp_path / "test.jsonl").write_text(json.dumps({"prompt": "q"}) + "\n")
    with pytest.raises(ValueError, match="'question' and 'answer'"):
        check_data_dir(tmp_path)
    (tmp_path / "test.jsonl").write_text("not json\n")
    with pytest.raises(ValueError, match="not JSON"):
        check_data_dir(tmp_path)
