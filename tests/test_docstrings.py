"""Every public name has a docstring with a runnable example, and is documented in README.md or docs/.

"Public" is ``lightning_ckpt.__all__`` plus the public methods and properties its classes define.
Lightning hook overrides (names that also exist on Lightning's ``Callback``/``Checkpoint`` or
``CheckpointIO``) need a docstring but no example, except the IO methods users call directly.
The examples themselves run as doctests (``--doctest-modules`` in pyproject.toml).
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lightning.fabric.plugins import CheckpointIO as FabricCheckpointIO
from lightning.pytorch.callbacks import Callback, Checkpoint
from lightning.pytorch.plugins.io import CheckpointIO as PyTorchCheckpointIO

import lightning_ckpt

ROOT = Path(__file__).resolve().parents[1]

# Hook overrides that users also call directly (Fabric, scripts): these need an example too.
CALLED_BY_USERS = {"ShardedCheckpointIO": {"save_checkpoint", "load_checkpoint", "remove_checkpoint"}}


def _hook_names() -> set[str]:
    """Public names of the Lightning base classes whose methods this package overrides."""
    names: set[str] = set()
    for base in (Callback, Checkpoint, FabricCheckpointIO, PyTorchCheckpointIO):
        names |= {name for name in dir(base) if not name.startswith("_")}
    return names


def _own_doc(member: Any) -> str:
    """The docstring written on the member itself (``inspect.getdoc`` would inherit Lightning's)."""
    if isinstance(member, property):
        member = member.fget
    elif isinstance(member, (classmethod, staticmethod)):
        member = member.__func__
    return inspect.cleandoc(getattr(member, "__doc__", None) or "")


def _public_members(cls: type) -> Iterator[tuple[str, Any]]:
    """``(name, member)`` for the public methods and properties ``cls`` gets from this package's classes."""
    seen: set[str] = set()
    for klass in cls.__mro__:
        if not klass.__module__.startswith("lightning_ckpt"):
            continue
        for name in vars(klass):
            if name.startswith("_") or name in seen:
                continue
            seen.add(name)
            member = inspect.getattr_static(cls, name)  # the definition that applies, however deep
            if inspect.isfunction(member) or isinstance(member, (property, classmethod, staticmethod)):
                yield name, member


def _docstring_problems() -> list[str]:
    hooks = _hook_names()
    problems = []
    for name in lightning_ckpt.__all__:
        obj = getattr(lightning_ckpt, name)
        doc = _own_doc(obj)
        if not doc:
            problems.append(f"{name}: no docstring")
        elif ">>>" not in doc:
            problems.append(f"{name}: no '>>>' example in its docstring")
        if not inspect.isclass(obj):
            continue
        for attr, member in _public_members(obj):
            doc = _own_doc(member)
            hook = attr in hooks and attr not in CALLED_BY_USERS.get(name, set())
            if not doc:
                problems.append(f"{name}.{attr}: no docstring" + (" (a Lightning hook: say what it does here)" * hook))
            elif ">>>" not in doc and not hook:
                problems.append(f"{name}.{attr}: no '>>>' example in its docstring")
    return problems


def test_the_walk_sees_public_methods_and_hooks() -> None:
    """Guards against a walk that checks nothing (the tests below would then pass vacuously)."""
    hooks = _hook_names()
    assert {"setup", "on_fit_start", "state_dict", "load_state_dict", "save_checkpoint", "teardown"} <= hooks
    io_members = dict(_public_members(lightning_ckpt.ShardedCheckpointIO))
    saver_members = dict(_public_members(lightning_ckpt.CheckpointSaver))
    assert {"save_checkpoint", "load_checkpoint", "wait_for_save", "has_finished_saves"} <= io_members.keys()
    assert {"save", "saved_checkpoints", "on_fit_start", "state_key"} <= saver_members.keys()
    assert "ranks" in dict(_public_members(lightning_ckpt.CollectiveError))


def test_every_public_name_has_a_docstring_with_an_example() -> None:
    problems = _docstring_problems()
    assert not problems, "Public API without a docstring or a '>>>' example:\n  " + "\n  ".join(problems)


def _code_in(markdown: str) -> str:
    """The fenced code blocks and inline code spans of a Markdown text."""
    fence = re.compile(r"^(```|~~~).*?^\1", flags=re.S | re.M)
    blocks = [m.group(0) for m in fence.finditer(markdown)]
    spans = re.findall(r"`+([^`\n]+)`+", fence.sub("", markdown))
    return "\n".join(blocks + spans)


def _mentioned(name: str, obj: Any, code: str) -> bool:
    """Whether ``code`` names ``name`` as an identifier; a function must be called, imported or qualified
    (so the word ``latest`` of a ``latest`` pointer does not count for :func:`lightning_ckpt.latest`)."""
    word = rf"(?<!\w){re.escape(name)}(?!\w)"
    if inspect.isclass(obj):
        return re.search(word, code) is not None
    patterns = (
        rf"(?<![\w.]){re.escape(name)}\s*\(",
        rf"lightning_ckpt\.{re.escape(name)}(?!\w)",
        rf"\bimport\b.*{word}",
        rf"\bimport\s*\([^)]*{word}",  # a parenthesized import over several lines
    )
    return any(re.search(pattern, code) for pattern in patterns)


def test_every_public_name_is_importable_and_documented() -> None:
    namespace: dict[str, Any] = {}
    exec("from lightning_ckpt import *", namespace)
    module = importlib.import_module("lightning_ckpt")
    not_importable = [n for n in module.__all__ if n not in namespace or not hasattr(module, n)]
    assert not not_importable, f"in lightning_ckpt.__all__ but not importable: {not_importable}"
    assert len(set(module.__all__)) == len(module.__all__), "lightning_ckpt.__all__ lists a name twice"

    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    code = "\n".join(_code_in(page.read_text(encoding="utf-8")) for page in pages if page.is_file())
    undocumented = [n for n in module.__all__ if not _mentioned(n, getattr(module, n), code)]
    message = "Public names not mentioned (as code) in README.md or docs/*.md: " + ", ".join(undocumented)
    assert not undocumented, message
