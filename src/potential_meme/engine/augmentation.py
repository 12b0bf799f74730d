"""Data augmentation by the teacher: paraphrases and back-translations of training passages, filtered.

Each training document is cut into passages at paragraph boundaries (an example the teacher can
rewrite in one answer). For each passage the teacher writes `factor` paraphrases, and `factor`
translations into a pivot language that it then translates back. A variant is dropped when it is
empty, much shorter or longer than its source, a copy of it, or an exact or near duplicate of a
variant kept before (near: most of its word trigrams are shared). Only training passages are
augmented, and each variant joins its source's split group, so no held-out text leaks into training.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from .data import Document
from .responses import Prompt, prompt_id

PARAPHRASE = (
    "Rewrite the following text in different words, keeping its meaning and its technical details. "
    "Reply with the rewritten text only.\n\n{text}"
)
TO_PIVOT = "Translate the following text into {language}. Reply with the translation only.\n\n{text}"
FROM_PIVOT = "Translate the following {language} text into English. Reply with the translation only.\n\n{text}"
METHODS = ("paraphrase", "back_translation")


def passages(documents: list[Document], size: int) -> list[Document]:
    """Documents cut at blank lines into passages of about `size` characters (a longer paragraph stays whole)."""
    cut: list[Document] = []
    for document in documents:
        current = ""
        for paragraph in re.split(r"\n\s*\n", document.text):
            paragraph = paragraph.strip()
            if not paragraph:
                continue
            if current and len(current) + len(paragraph) > size:
                cut.append(Document(document.group, current))
                current = ""
            current = f"{current}\n\n{paragraph}" if current else paragraph
        if current:
            cut.append(Document(document.group, current))
    return cut


def _key(passage: Document) -> str:
    return prompt_id(passage.text)


def first_round(examples: list[Document], methods: list[str], factor: int, language: str) -> list[Prompt]:
    """What the teacher is asked first: each paraphrase, and each translation into the pivot language."""
    asked = []
    for passage in examples:
        for k in range(factor):
            if "paraphrase" in methods:
                asked.append(Prompt(f"{_key(passage)}-paraphrase-{k}", PARAPHRASE.format(text=passage.text)))
            if "back_translation" in methods:
                asked.append(
                    Prompt(f"{_key(passage)}-pivot-{k}", TO_PIVOT.format(language=language, text=passage.text))
                )
    return asked


def second_round(examples: list[Document], answers: dict[str, str], factor: int, language: str) -> list[Prompt]:
    """The translations back from the pivot language (of the first round's translations that are not empty)."""
    asked = []
    for passage in examples:
        for k in range(factor):
            translated = answers.get(f"{_key(passage)}-pivot-{k}", "").strip()
            if translated:
                text = FROM_PIVOT.format(language=language, text=translated)
                asked.append(Prompt(f"{_key(passage)}-back_translation-{k}", text))
    return asked


def _normalized(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def _trigrams(text: str) -> set[tuple[str, ...]]:
    words = _normalized(text).split()
    return {tuple(words[i : i + 3]) for i in range(max(len(words) - 2, 1))}


def _similarity(a: set, b: set) -> float:
    return len(a & b) / max(len(a | b), 1)


@dataclass
class Filtered:
    """The variants kept (as training documents) and, by method, how many were written, kept, dropped and why."""

    kept: list[Document] = field(default_factory=list)
    written: Counter = field(default_factory=Counter)
    dropped: dict[str, Counter] = field(default_factory=dict)

    def report(self) -> dict[str, dict]:
        return {
            method: {
                "written": self.written[method],
                "kept": self.written[method] - sum(self.dropped.get(method, Counter()).values()),
                "dropped": dict(sorted(self.dropped.get(method, Counter()).items())),
            }
            for method in sorted(self.written)
        }


def filter_variants(
    examples: list[Document],
    answers: dict[str, str],
    methods: list[str],
    factor: int,
    length_ratio: tuple[float, float],
    near_duplicate: float,
) -> Filtered:
    """Each variant checked against its source, the variants of that source kept before it, and (exactly) all
    variants kept before it."""
    result = Filtered()
    seen: set[str] = set()
    for passage in examples:
        source = _normalized(passage.text)
        source_shingles = _trigrams(passage.text)
        kept_shingles: list[set] = []  # near duplicates are looked for among one source's variants
        for method in methods:
            for k in range(factor):
                text = answers.get(f"{_key(passage)}-{method}-{k}")
                if text is None:
                    continue  # a back-translation whose translation came back empty was never asked
                result.written[method] += 1
                reason = _drop_reason(
                    text, passage.text, source, source_shingles, seen, kept_shingles, length_ratio, near_duplicate
                )
                if reason is not None:
                    result.dropped.setdefault(method, Counter())[reason] += 1
                    continue
                seen.add(_normalized(text))
                kept_shingles.append(_trigrams(text))
                result.kept.append(Document(passage.group, text.strip()))
    return result


def _drop_reason(
    text: str,
    original: str,
    source: str,
    source_shingles: set,
    seen: set[str],
    kept_shingles: list[set],
    length_ratio: tuple[float, float],
    near_duplicate: float,
) -> str | None:
    """Why a variant is dropped, or None to keep it."""
    normalized = _normalized(text)
    if not normalized:
        return "empty"
    ratio = len(text.strip()) / max(len(original.strip()), 1)
    if ratio < length_ratio[0]:
        return "too_short"
    if ratio > length_ratio[1]:
        return "too_long"
    if normalized == source:
        return "copy_of_source"
    if normalized in seen:
        return "duplicate"
    shingles = _trigrams(text)
    if _similarity(shingles, source_shingles) >= near_duplicate:
        return "near_copy_of_source"
    if any(_similarity(shingles, other) >= near_duplicate for other in kept_shingles):
        return "near_duplicate"
    return None
