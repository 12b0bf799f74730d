"""MMLU through lm-eval's harness, on a model already loaded, from CSV files instead of the hub.

The data is the hub's `cais/mmlu`, or (offline) a folder or `s3://` prefix laid out as
`dev/<subject>_dev.csv` (the few-shot examples) and `test/<subject>_test.csv`, each with the columns
question, choice0..choice3 and answer (0-3).

Two formulations, as lm-eval defines them:
- `letter`: the original protocol. The question and its four lettered choices, then "Answer:"; the
  model's log-likelihood of " A" .. " D" decides. Small models answer it at chance.
- `cloze`: the question, then "Answer:"; the log-likelihood of each choice's own text decides
  (lm-eval's `mmlu_continuation`). It tells small models apart where letters cannot.
"""

from __future__ import annotations

import csv
import io
import logging
from typing import Any

from ..storage import open_store
from .results import Score, macro_mean, proportion

log = logging.getLogger(__name__)

HUB_DATASET = "cais/mmlu"
FORMULATIONS = ("letter", "cloze")
CHOICE_COLUMNS = ("choice0", "choice1", "choice2", "choice3")


class MMLUDataError(ValueError):
    pass


def _rows(text: str, where: str) -> list[dict[str, Any]]:
    rows = []
    for number, row in enumerate(csv.DictReader(io.StringIO(text)), start=2):
        missing = [column for column in ("question", *CHOICE_COLUMNS, "answer") if row.get(column) is None]
        if missing or row["answer"] not in ("0", "1", "2", "3"):
            raise MMLUDataError(
                f"{where} line {number}: expected the columns question, choice0..choice3 and answer (0-3)"
                + (f"; missing {', '.join(missing)}" if missing else f"; answer is {row['answer']!r}")
            )
        rows.append(
            {"question": row["question"], "choices": [row[c] for c in CHOICE_COLUMNS], "answer": int(row["answer"])}
        )
    return rows


def _from_hub() -> dict[str, dict[str, list[dict[str, Any]]]]:
    import datasets

    loaded: dict[str, dict[str, list[dict[str, Any]]]] = {}
    try:
        for split in ("dev", "test"):
            for row in datasets.load_dataset(HUB_DATASET, "all", split=split):
                entry = {"question": row["question"], "choices": list(row["choices"]), "answer": int(row["answer"])}
                loaded.setdefault(row["subject"], {"dev": [], "test": []})[split].append(entry)
    except Exception as exc:  # offline, or the hub refused: say what to do instead
        raise MMLUDataError(
            f"MMLU from the hub ({HUB_DATASET}) cannot be read ({exc}); offline, give a folder or s3:// prefix "
            "with dev/<subject>_dev.csv and test/<subject>_test.csv (columns question, choice0..choice3, answer)"
        ) from None
    return loaded


def _check_subjects(wanted: list[str] | None, available: list[str], where: str) -> None:
    unknown = sorted(set(wanted or ()) - set(available))
    if unknown:
        raise MMLUDataError(f"unknown MMLU subjects {', '.join(unknown)}; {where} has: {', '.join(available)}")


def _from_store(source: str, subjects: list[str] | None) -> dict[str, dict[str, list[dict[str, Any]]]]:
    store = open_store(source)
    found = sorted(
        key.rsplit("/", 1)[-1].removesuffix("_test.csv") for key in store.list("test/") if key.endswith(".csv")
    )
    if not found:
        raise MMLUDataError(f"{source}: no test/<subject>_test.csv files (the MMLU CSV layout)")
    _check_subjects(subjects, found, source)
    return {
        subject: {
            split: _rows(
                store.read_bytes(f"{split}/{subject}_{split}.csv").decode("utf-8"), f"{source}/{split}/{subject}"
            )
            for split in ("dev", "test")
        }
        for subject in subjects or found
    }


def load_subjects(source: str | None, subjects: list[str] | None = None) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """subject -> {"dev": rows, "test": rows}, from `source` (a folder or s3:// prefix; None: the hub)."""
    if source is not None:
        return _from_store(source, subjects)
    loaded = _from_hub()
    _check_subjects(subjects, sorted(loaded), HUB_DATASET)
    return {subject: loaded[subject] for subject in subjects or sorted(loaded)}


def _letter_text(doc: dict[str, Any]) -> str:
    lettered = "".join(f"\n{letter}. {choice}" for letter, choice in zip("ABCD", doc["choices"], strict=True))
    return f"{doc['question'].strip()}{lettered}\nAnswer:"


def _cloze_text(doc: dict[str, Any]) -> str:
    return f"Question: {doc['question'].strip()}\nAnswer:"


def _task(subject: str, formulation: str, splits: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """An lm-eval task config for one subject, with the rows given in memory (no hub download)."""
    import datasets

    topic = subject.replace("_", " ")

    def rows(**_: Any) -> dict[str, datasets.Dataset]:
        return {split: datasets.Dataset.from_list(docs) for split, docs in splits.items()}

    common = {
        "task": f"mmlu_{formulation}_{subject}",
        "custom_dataset": rows,
        "output_type": "multiple_choice",
        "test_split": "test",
        "fewshot_split": "dev",
        "fewshot_config": {"sampler": "first_n"},
        "doc_to_target": "answer",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    if formulation == "letter":
        return common | {
            "description": f"The following are multiple choice questions (with answers) about {topic}.\n\n",
            "doc_to_text": _letter_text,
            "doc_to_choice": ["A", "B", "C", "D"],
        }
    return common | {
        "description": f"The following are questions (with answers) about {topic}.\n\n",
        "doc_to_text": _cloze_text,
        "doc_to_choice": lambda doc: doc["choices"],
    }


def run_mmlu(
    model: Any,
    tokenizer: Any,
    source: str | None,
    formulation: str = "letter",
    subjects: list[str] | None = None,
    limit: int | None = None,
    num_fewshot: int = 5,
    batch_size: int = 8,
) -> tuple[Score, dict[str, Score]]:
    """Macro accuracy over subjects, and each subject's accuracy. `limit`: questions per subject."""
    if formulation not in FORMULATIONS:
        raise ValueError(f"MMLU formulation {formulation!r}: accepted {', '.join(FORMULATIONS)}")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    data = load_subjects(source, subjects)
    harness_model = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    tasks = [_task(subject, formulation, splits) for subject, splits in data.items()]
    harness_log = logging.getLogger("lm_eval")
    level = harness_log.level
    harness_log.setLevel(logging.ERROR)  # a warning a task and a truncation: thousands of lines at full scale
    try:
        output = simple_evaluate(
            model=harness_model,
            tasks=tasks,
            task_manager=TaskManager(include_defaults=False),  # indexing lm-eval's thousands of task files: ~10 s
            num_fewshot=num_fewshot,
            limit=limit,
            bootstrap_iters=0,
            log_samples=False,
        )
    finally:
        harness_log.setLevel(level)
    per_subject = {}
    for subject, splits in data.items():
        result = output["results"][f"mmlu_{formulation}_{subject}"]
        asked = min(len(splits["test"]), limit) if limit else len(splits["test"])
        per_subject[subject] = proportion(round(result["acc,none"] * asked), asked)
    return macro_mean(list(per_subject.values())), per_subject
