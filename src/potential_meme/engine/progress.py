"""What a person watching a run sees: a progress bar or log lines, and each stage's summary.

The same for every face: `potential-meme run` on a terminal, a pod's log, a script, a notebook.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any

from .runtime import Runtime

log = logging.getLogger(__name__)
PACKAGE_LOGGER = logging.getLogger("potential_meme")


def in_notebook() -> bool:
    """Inside a Jupyter kernel, where tqdm draws a widget and stderr is not a terminal."""
    shell = sys.modules.get("IPython")
    ipython = shell.get_ipython() if shell is not None and hasattr(shell, "get_ipython") else None
    return ipython is not None and "IPKernelApp" in getattr(ipython, "config", {})


class Progress:
    """A tqdm bar on a terminal or in a notebook; plain log lines every N steps elsewhere (pods, CI)."""

    def __init__(self, runtime: Runtime, total: int, start: int, every: int, label: str):
        self.enabled = runtime.is_main
        self.every = every
        self.total = total
        self.bar = None
        if self.enabled and (sys.stderr.isatty() or in_notebook()) and log.isEnabledFor(logging.INFO):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc=label, unit="step", dynamic_ncols=True)
        self.started = time.monotonic()
        self.start_step = start

    def update(self, step: int, loss: float, tokens_per_second: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_second:.0f}", refresh=False)
            self.bar.update(1)
        elif step % self.every == 0 or step == self.total:
            elapsed = time.monotonic() - self.started
            done = step - self.start_step
            eta = elapsed / done * (self.total - step) if done else float("nan")
            log.info("step %d/%d loss %.4f %.0f tok/s eta %.0fs", step, self.total, loss, tokens_per_second, eta)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def shown_perplexity(value: float | None, form: str = ",.2f") -> str:
    """A perplexity as the logs and the summary show it; None is a teacher behind an API, which has none."""
    return "behind an API" if value is None else format(value, form)


def stage_summary(job_name: str, manifests: list[dict[str, Any]], student_uri: str) -> str:
    """The table `potential-meme run` prints at the end: each stage's size and held-out perplexity, then its
    perplexity on each further validation set."""
    trained = [manifest for manifest in manifests if "studentPerplexityAfter" in manifest["metrics"]]
    lines = [
        f"{job_name}: {len(manifests)} stage(s) done; held-out perplexity, teacher "
        + shown_perplexity(trained[0]["metrics"]["teacherPerplexity"]),
        f"  {'stage':<18}{'student params':>16}{'before':>16}{'after':>12}{'steps':>7}",
    ]
    for manifest in manifests:
        row = manifest["metrics"]
        if "formats" in row:  # an export stage: a file a format, each checked in its runtime
            written = ", ".join(
                f"{name} {exported['bytes'] / 1e6:,.1f} MB"
                + (
                    ""
                    if exported["maxLogitDifference"] is None
                    else f" (logits within {exported['maxLogitDifference']:.1g})"
                )
                for name, exported in row["formats"].items()
            )
            lines.append(f"  {manifest['stage']:<18}{written}")
            continue
        if "cache" in manifest:  # the teacher's targets, kept for the stages after
            cache = manifest["cache"]
            lines.append(
                f"  {manifest['stage']:<18}{cache['tokens']:>16,} tokens cached, top {cache['topK']}, "
                f"{cache['bytesPerToken']} bytes a token"
            )
            continue
        if manifest not in trained:  # the teacher wrote: answers to prompts, or variants of passages
            done = (
                f"{row['prompts']:,} prompts answered"
                if "prompts" in row
                else f"{row['variantsKept']:,} variants kept of {row['passages']:,} passages"
            )
            lines.append(f"  {manifest['stage']:<18}{done:>16}, {row['completionTokens']:,} tokens written")
            continue
        stopped = " (early stop)" if row.get("stoppedEarly") else ""
        lines.append(
            f"  {manifest['stage']:<18}{row['studentParameters']:>16,}{row['studentPerplexityBefore']:>16,.2f}"
            f"{row['studentPerplexityAfter']:>12,.2f}{row['steps']:>7}{stopped}"
        )
    elsewhere = [
        (manifest["stage"], name, values)
        for manifest in trained
        for name, values in manifest["metrics"].get("validationSets", {}).items()
    ]
    if elsewhere:
        lines.append(f"  {'further validation':<18}{'set':<16}{'teacher':>12}{'before':>12}{'after':>12}")
        for stage, name, values in elsewhere:
            teacher = values["teacherPerplexity"]
            lines.append(
                f"  {stage:<18}{name:<16}{'-' if teacher is None else f'{teacher:,.2f}':>12}"
                f"{values['studentPerplexityBefore']:>12,.2f}{values['studentPerplexityAfter']:>12,.2f}"
            )
    lines.append(f"  student: {student_uri}")
    return "\n".join(lines)


@contextlib.contextmanager
def shown_to_the_caller(verbose: bool) -> Iterator[None]:
    """For library calls: the engine's progress and results reach the caller's screen as they do a
    CLI user's, with no `logging` set up by the caller; `verbose=False` silences them. A caller's own
    logging configuration (a handler anywhere up the tree) is left to decide instead."""
    configured = logging.getLogger().handlers or PACKAGE_LOGGER.handlers
    if configured and verbose:
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    previous = PACKAGE_LOGGER.level, PACKAGE_LOGGER.propagate
    PACKAGE_LOGGER.addHandler(handler)
    PACKAGE_LOGGER.setLevel(logging.INFO if verbose else logging.ERROR)
    PACKAGE_LOGGER.propagate = False
    try:
        yield
    finally:
        PACKAGE_LOGGER.removeHandler(handler)
        PACKAGE_LOGGER.setLevel(previous[0])
        PACKAGE_LOGGER.propagate = previous[1]
