"""An offline instruction dataset in the alpaca format, built from the installed Python stdlib.

Every top-level function with a docstring becomes one example: the docstring's first paragraph
is the instruction, the signature the input, and the function's source without its docstring the
output. Real code, like the reference workload's python_code_instructions_18k_alpaca, with no
network. The result is deterministic for one Python installation and cached as JSON lines.
"""

from __future__ import annotations

import ast
import json
import os
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

NAME = "python-stdlib-alpaca"
#: Packages whose code is mostly tests, GUI or generated tables.
_SKIP_DIRS = {
    "test",
    "tests",
    "idlelib",
    "tkinter",
    "turtledemo",
    "lib2to3",
    "site-packages",
    "dist-packages",
    "ensurepip",
    "pydoc_data",
    "encodings",
    "__pycache__",
}
MAX_OUTPUT_CHARS = 1200
MAX_INSTRUCTION_CHARS = 400


def _sources(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield Path(dirpath) / name


def _examples(path: Path) -> Iterator[dict[str, str]]:
    try:
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text)
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return
    lines = text.splitlines()
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node)
        if not doc or not node.body or node.end_lineno is None:
            continue
        instruction = " ".join(doc.split("\n\n", 1)[0].split())
        if len(instruction) < 20 or len(instruction) > MAX_INSTRUCTION_CHARS:
            continue
        first = node.decorator_list[0].lineno if node.decorator_list else node.lineno
        doc_node = node.body[0]
        end_doc = doc_node.end_lineno or doc_node.lineno
        body = lines[first - 1 : doc_node.lineno - 1] + lines[end_doc : node.end_lineno]
        output = "\n".join(body).rstrip()
        if len(node.body) < 2 or len(output) > MAX_OUTPUT_CHARS:
            continue
        signature = lines[node.lineno - 1].strip()
        yield {"instruction": instruction, "input": signature, "output": output}


def build_records(root: Path | None = None) -> list[dict[str, str]]:
    """All examples, in a stable order (sorted paths, then source order)."""
    base = root or Path(sysconfig.get_paths()["stdlib"])
    records: list[dict[str, str]] = []
    seen: set[str] = set()
    for path in _sources(base):
        for ex in _examples(path):
            if ex["output"] not in seen:
                seen.add(ex["output"])
                records.append(ex)
    return records


def build_jsonl(cache_dir: Path | None = None) -> Path:
    """Write the dataset once as JSON lines (atomically) and return its path."""
    cache = cache_dir or Path(
        os.environ.get("FINETUNE_CACHE", Path(tempfile.gettempdir()) / "finetune-cache")
    )
    version = f"py{sys.version_info.major}{sys.version_info.minor}"
    path = cache / "datasets" / f"{NAME}-{version}.jsonl"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for rec in build_records():
            f.write(json.dumps(rec) + "\n")
    tmp.replace(path)
    return path
