"""The built-in demo corpus: plain-text pydoc pages of the standard library's public modules.

Run as a script by `data.stdlib_documents`, in an isolated interpreter (`python -I -S`) with an
empty environment: a page shows live values (defaults that are `os.environ`, warning registries,
subclass counts, logging's handler list, classes other libraries patched), so rendered inside a
trainer it would carry that process's environment, credentials included, into the student's
training text, and differ from one run to the next. A fresh interpreter importing nothing but the
standard library renders the same pages every time. Standard library only: it runs without
site-packages. Writes one JSON object a page ({"group", "text"}) to stdout.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import json
import os
import pkgutil
import pydoc
import re
import sys
import warnings
from contextlib import redirect_stderr, redirect_stdout

# Modules whose import has side effects (a browser, a window, printing) or that are test suites.
SKIPPED_MODULES = {
    "sys",  # its page shows this process's argv, paths and flags: a corpus of the run, not of Python
    "antigravity",
    "this",
    "idlelib",
    "tkinter",
    "turtle",
    "turtledemo",
    "test",
    "pydoc_data",
    "lib2to3",
    "ensurepip",
    "venv",
    "__main__",
    "__phello__",
}
_MEMORY_ADDRESS = re.compile(r"(?: at 0x|, handle )[0-9a-fA-F]+")
# Which submodules a package lists as its attributes depends on what was imported before it.
_SUBMODULES_SECTION = re.compile(r"^SUBMODULES\n(?:    .*\n|\n)*", re.MULTILINE)


def module_names() -> list[str]:
    names = set()
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in SKIPPED_MODULES:
            continue
        names.add(name)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            submodules = pkgutil.walk_packages(spec.submodule_search_locations, f"{name}.", onerror=lambda _: None)
            for info in submodules:
                parts = info.name.split(".")
                if not any(p.startswith(("_", "test")) or p in SKIPPED_MODULES for p in parts):
                    names.add(info.name)
    return sorted(names)


def pages(scratch: str) -> list[dict[str, str]]:
    """Every page; `scratch` (this interpreter's working folder) and the installation's folders are
    replaced by placeholders, so the pages are the same wherever Python is installed."""
    environment = os.path.dirname(os.path.dirname(sys.executable))  # a virtual environment, which -S ignores
    places = {environment: "<prefix>", sys.prefix: "<base-prefix>", sys.base_prefix: "<base-prefix>", scratch: "<cwd>"}
    longest_first = sorted(places.items(), key=lambda item: -len(item[0]))
    documents = []
    sink = io.StringIO()
    for name in module_names():
        try:
            with warnings.catch_warnings(), redirect_stdout(sink), redirect_stderr(sink):
                warnings.simplefilter("ignore")
                text = pydoc.render_doc(importlib.import_module(name), renderer=pydoc.plaintext)
        except BaseException:  # noqa: BLE001 - platform-specific modules fail to import; skip them
            continue
        text = _SUBMODULES_SECTION.sub("", _MEMORY_ADDRESS.sub("", text))
        for place, placeholder in longest_first:
            text = text.replace(place, placeholder)
        documents.append({"group": name.split(".")[0], "text": text})
    return documents


if __name__ == "__main__":
    for page in pages(sys.argv[1]):
        sys.stdout.write(json.dumps(page) + "\n")  # ASCII: no locale in an empty environment
