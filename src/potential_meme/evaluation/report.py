"""Showing results: the comparison plot (PNG) and the report (multi-page PDF), from a results object alone.

Figures are drawn on matplotlib `Figure`s without pyplot: no global state, no display needed.
"""

from __future__ import annotations

import itertools
import textwrap
from pathlib import Path
from typing import Any

from matplotlib import rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.figure import Figure

from .results import EvaluationResults, Score, compared_rows

BENCHMARK_TITLES = {
    "mmlu_letter": "MMLU, letter choice (original protocol)",
    "mmlu_cloze": "MMLU, cloze (log-likelihood of each answer's text)",
    "humaneval": "HumanEval, completion (original protocol)",
    "humaneval_chat": "HumanEval, chat (the problem in a user message)",
    "mt-bench": "MT-Bench (LLM judge, 1-10)",
    "perplexity": "held-out perplexity",
    "latency": "latency",
    "memory": "memory",
}
BETTER, WORSE = "#2a9d8f", "#e76f51"
PAGE = (8.27, 11.69)  # A4 portrait, inches
# Type 42 (TrueType) fonts keep the PDF's text extractable and searchable; matplotlib's default, Type 3, does not.
PDF_FONTS = {"pdf.fonttype": 42, "ps.fonttype": 42}


def title_of(benchmark: str) -> str:
    return BENCHMARK_TITLES.get(benchmark, benchmark)


def formatted(score: Score) -> str:
    value, unit = score.value, score.unit
    if unit == "bytes":
        for size, suffix in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
            if value >= size:
                return f"{value / size:.1f} {suffix}"
        return f"{value:.0f} B"
    if unit == "ms":
        return f"{value:.1f} ms"
    if unit == "tokens/s":
        return f"{value:.1f} tok/s"
    if unit == "perplexity" or value >= 100:
        return f"{value:,.2f}"
    return f"{value:.3f}"


def with_interval(score: Score) -> str:
    if score.low is None or score.high is None:
        return formatted(score)
    low, high = (formatted(score.model_copy(update={"value": bound})) for bound in (score.low, score.high))
    return f"{formatted(score)} [{low}, {high}]"


def _draw_comparison(figure: Figure, results: EvaluationResults) -> None:
    rows = compared_rows(results)
    axes = figure.add_subplot(1, 1, 1)
    labels, shares, colours, notes = [], [], [], []
    for benchmark, metric, teacher, student in rows:
        labels.append(f"{title_of(benchmark)}\n{metric}")
        if student is None:
            shares.append(0.0)
            colours.append("#bbbbbb")
            notes.append(f"student: none measured (teacher {formatted(teacher)})")
            continue
        if teacher is None or teacher.value == 0:
            shares.append(0.0)
            colours.append("#bbbbbb")
            against = "no teacher figure" if teacher is None else f"teacher {formatted(teacher)}: no share of zero"
            notes.append(f"student {formatted(student)} ({against})")
            continue
        share = student.value / teacher.value
        better = share >= 1 if student.higher_is_better else share <= 1
        shares.append(share)
        colours.append(BETTER if better else WORSE)
        notes.append(f"{share:.0%}   student {formatted(student)} / teacher {formatted(teacher)}")
    positions = list(range(len(rows)))[::-1]
    axes.barh(positions, shares, color=colours, height=0.6)
    axes.axvline(1.0, color="#333333", linewidth=1, linestyle="--")
    axes.set_yticks(positions, labels, fontsize=7)
    axes.set_xlabel("student as a share of the teacher (1 = equal; green: the student is better or equal)")
    reach = max([1.0, *shares]) * 1.9
    axes.set_xlim(0, reach)
    for position, share, note in zip(positions, shares, notes, strict=True):
        axes.text(share + reach * 0.01, position, note, va="center", fontsize=7)
    student = results.models["student"].reference
    teacher = results.models["teacher"].reference if "teacher" in results.models else "no teacher"
    axes.set_title(f"student {student}\nagainst teacher {teacher}", fontsize=9)
    figure.tight_layout()


def comparison_figure(results: EvaluationResults, output_file: Path) -> Path:
    """A PNG: per benchmark and metric, the student as a share of its teacher, absolute numbers on the bars."""
    if "student" not in results.models:
        raise ValueError("the results have no student to show")
    figure = Figure(figsize=(11, 1.2 + 0.55 * len(compared_rows(results))), dpi=120)
    FigureCanvasAgg(figure)
    _draw_comparison(figure, results)
    output_file.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output_file, format="png")
    return output_file


def _text_page(title: str, lines: list[str], size: float = 8) -> Figure:
    figure = Figure(figsize=PAGE)
    figure.text(0.06, 0.96, title, fontsize=14, weight="bold", va="top")
    figure.text(0.06, 0.92, "\n".join(lines), fontsize=size, family="monospace", va="top")
    return figure


def _setup_lines(results: EvaluationResults) -> list[str]:
    lines = []
    for role, measured in results.models.items():
        lines.append(f"{role:8} {measured.reference}")
        lines.append(f"{'':8} {measured.parameters:,} parameters")
    setup = results.setup
    lines += ["", f"date      {setup.get('date', '?')}", f"device    {setup.get('device', '?')}"]
    lines += [f"{name:9} {number}" for name, number in (setup.get("versions") or {}).items()]
    lines += ["", "command", *textwrap.wrap(str(setup.get("command", "?")), 90, initial_indent="  ")]
    lines += ["", "settings"]
    for key, value in (setup.get("settings") or {}).items():
        lines += textwrap.wrap(f"{key}: {value}", 100, initial_indent="  ", subsequent_indent="      ")
    return lines


def results_table(results: EvaluationResults) -> list[str]:
    lines = [f"{'metric':34} {'teacher':>24} {'student':>24} {'share':>6}", "-" * 92]
    current = None
    for benchmark, metric, teacher, student in compared_rows(results):
        if benchmark != current:
            lines += ["", title_of(benchmark) + f"  (n = {(student or teacher).n})"]
            current = benchmark
        share = f"{student.value / teacher.value:.0%}" if student and teacher and teacher.value else "-"
        theirs, ours = (with_interval(score) if score else "-" for score in (teacher, student))
        lines.append(f"  {metric:32} {theirs:>24} {ours:>24} {share:>6}")
    lines += ["", "[low, high]: 95 % confidence interval (Wilson for shares, normal for means)."]
    lines += ["MMLU letter choice: small models score near chance (0.25); cloze separates them."]
    return lines


def _subject_lines(results: EvaluationResults) -> list[str]:
    parts = [name for name in ("mmlu_letter", "mmlu_cloze") if name in results.models["student"].details]
    roles = [role for role in ("teacher", "student") if role in results.models]
    columns = [(role, part) for part in parts for role in roles]
    header = f"{'subject':38}" + "".join(f"{role[:1].upper() + ' ' + part[5:]:>11}" for role, part in columns)
    lines = [header, "-" * len(header)]
    subjects = sorted(results.models["student"].details[parts[0]])
    for subject in subjects:
        values = [results.models[role].details.get(part, {}).get(subject) for role, part in columns]
        lines.append(f"{subject[:37]:38}" + "".join(f"{v.value:>11.3f}" if v else f"{'-':>11}" for v in values))
    count = results.models["student"].details[parts[0]][subjects[0]].n
    lines += ["", f"T: teacher, S: student; accuracy over {count} questions a subject (the first subject's count)."]
    return lines


def _column(entry: dict[str, Any] | None, role: str, width: int, height: int) -> list[str]:
    if entry is None:
        return [f"{role}: not measured"]
    lines = [f"{role} ({entry.get('status', entry.get('score', ''))})"]
    for line in str(entry.get("completion", entry.get("answer", ""))).splitlines():
        lines += textwrap.wrap(line, width, drop_whitespace=False) or [""]
    return lines[:height]


def _sample_lines(results: EvaluationResults, benchmark: str, shown: int = 3, width: int = 58) -> list[str]:
    """The first few items, teacher's answer on the left and student's on the right."""
    teacher = results.models.get("teacher")
    theirs = {
        s.get("task_id", s.get("question_id")): s for s in (teacher.samples.get(benchmark, []) if teacher else [])
    }
    lines = []
    for sample in results.models["student"].samples.get(benchmark, [])[:shown]:
        key = sample.get("task_id", sample.get("question_id"))
        left, right = _column(theirs.get(key), "teacher", width, 22), _column(sample, "student", width, 22)
        asked = textwrap.wrap(f"Q: {sample['question']}", 2 * width)[:3] if sample.get("question") else []
        paired = (f"{a:{width}} | {b}" for a, b in itertools.zip_longest(left, right, fillvalue=""))
        lines += [f"== {key}", *asked, *paired, ""]
    return lines


def pdf_report(results: EvaluationResults, output_file: Path) -> Path:
    """Setup, results table, the plot, per-subject MMLU, and a few answers of both models side by side."""
    if "student" not in results.models:
        raise ValueError("the results have no student to report on")
    output_file.parent.mkdir(parents=True, exist_ok=True)
    pages: list[Figure] = [
        _text_page("Distillation evaluation: setup", _setup_lines(results)),
        _text_page("Results", results_table(results), size=7.5),
    ]
    plot = Figure(figsize=PAGE)
    _draw_comparison(plot, results)
    pages.append(plot)
    if any(part in results.models["student"].details for part in ("mmlu_letter", "mmlu_cloze")):
        lines = _subject_lines(results)
        for start in range(0, len(lines), 70):
            pages.append(_text_page("MMLU by subject", lines[start : start + 70], size=7))
    for benchmark in ("mt-bench", "humaneval", "humaneval_chat"):
        if results.models["student"].samples.get(benchmark):
            pages.append(
                _text_page(f"{title_of(benchmark)}: answers side by side", _sample_lines(results, benchmark), 6.5)
            )
    with rc_context(PDF_FONTS), PdfPages(output_file) as pdf:
        info = pdf.infodict()
        info["Title"] = f"Evaluation of {results.models['student'].reference}"
        info["Creator"] = "potential-meme"
        for page in pages:
            pdf.savefig(page)
    return output_file
