"""``import lightning_ckpt`` and the command line start without importing Lightning.

Lightning takes seconds to import; the package's names load on first use (PEP 562), so
``lightning-ckpt ls`` starts in about the time ``import torch`` takes.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

import lightning_ckpt


def _modules_after(statement: str) -> set[str]:
    code = f"import sys\n{statement}\nprint('\\n'.join(sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return set(done.stdout.split())


def test_the_package_and_the_command_line_do_not_import_lightning() -> None:
    for statement in ("import lightning_ckpt", "import lightning_ckpt.cli"):
        assert "lightning" not in _modules_after(statement), statement


def test_every_exported_name_loads_and_lands_in_dir() -> None:
    loaded = _modules_after("from lightning_ckpt import CheckpointSaver, ShardedCheckpointIO")
    assert {"lightning", "lightning_ckpt.callback", "lightning_ckpt.plugin"} <= loaded
    for name in lightning_ckpt.__all__:
        assert getattr(lightning_ckpt, name).__name__ == name
    assert set(lightning_ckpt.__all__) <= set(dir(lightning_ckpt))


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="CheckpointSaverr"):
        lightning_ckpt.CheckpointSaverr  # type: ignore[attr-defined]  # noqa: B018
