"""Find the code blocks of a Markdown file, and run its ``python`` blocks in order (as a script).

``python tests/markdown_examples.py README.md`` runs every ```` ```python ```` block of the file in one
namespace, top to bottom, as a reader pasting them into one session would, and prints
``ran README.md:LINE`` after each block. A failing block stops the run with its traceback, which names
``README.md:LINE``.

Example:
    >>> text = "intro\\n```python\\nx = 1\\n```\\n\\n```bash\\nls\\n```\\n"
    >>> [(b.language, b.line, b.code) for b in code_blocks(text)]
    [('python', 3, 'x = 1\\n'), ('bash', 7, 'ls\\n')]
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, NamedTuple

__all__ = ["CodeBlock", "code_blocks", "run_python_blocks"]

_FENCE = re.compile(r"^(\s*)```(\S*)\s*$")


class CodeBlock(NamedTuple):
    """One fenced block: its info string, the 1-based line of its first code line, and its code."""

    language: str
    line: int
    code: str


def code_blocks(text: str) -> list[CodeBlock]:
    """Every fenced code block of a Markdown text, in order (indented fences are de-indented)."""
    blocks: list[CodeBlock] = []
    lines = text.splitlines(keepends=True)
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        indent, language = opening.group(1), opening.group(2)
        body: list[str] = []
        index += 1
        start = index + 1
        while index < len(lines) and not _FENCE.match(lines[index]):
            line = lines[index]
            body.append(line[len(indent) :] if line.startswith(indent) else line)
            index += 1
        blocks.append(CodeBlock(language, start, "".join(body)))
        index += 1
    return blocks


def run_python_blocks(path: Path) -> int:
    """Run every python block of ``path`` in one namespace; return how many ran."""
    namespace: dict[str, Any] = {"__name__": "__main__"}
    ran = 0
    for block in code_blocks(path.read_text()):
        if block.language != "python":
            continue
        exec(compile(block.code, f"{path.name}:{block.line}", "exec"), namespace)
        ran += 1
        print(f"ran {path.name}:{block.line}", flush=True)
    return ran


if __name__ == "__main__":
    run_python_blocks(Path(sys.argv[1]))
