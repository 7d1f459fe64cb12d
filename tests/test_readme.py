"""The README's examples run: its python blocks in order, then its ``lightning-ckpt`` commands.

They run in a fresh process in an empty directory with ``HOME`` there, the way a reader pastes them:
local checkpoints under ``runs/``, the S3 examples against a real ``moto_server`` on 127.0.0.1 reached
through the standard AWS environment variables (``AWS_ENDPOINT_URL``), since the README relies on the
usual credential chain.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_ckpt import latest, read_checkpoint
from tests.markdown_examples import code_blocks
from tests.s3_server import CREDENTIALS, S3Server, _create_bucket

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

# Shell lines of the README that the suite does not run, because they install packages, run this
# suite itself, or run the benchmarks (which have their own smoke tests in test_benchmarks.py).
NOT_RUN_PREFIXES = (
    "pip install ",
    "python -m pip install ",
    "bash .ci/run",
    "python benchmarks/",
    "python -m lightning_ckpt.demo",
)


def _shell_lines(path: Path) -> list[tuple[int, str]]:
    """(line, command) for each non-empty, non-comment line of the bash blocks, comments stripped."""
    found = []
    for block in code_blocks(path.read_text()):
        if block.language != "bash":
            continue
        for offset, raw in enumerate(block.code.splitlines()):
            command = raw.split("  #", 1)[0].strip()
            if command and not command.startswith("#"):
                found.append((block.line + offset, command))
    return found


def _environment(home: Path, endpoint_url: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
    env.update(CREDENTIALS)
    env.update(
        HOME=str(home),
        AWS_ENDPOINT_URL=endpoint_url,
        NO_PROXY="127.0.0.1",
        no_proxy="127.0.0.1",
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
    )
    return env


def _run_python_blocks(page: Path, cwd: Path, env: dict[str, str]) -> int:
    """Run the python blocks of ``page`` in order in a fresh process; check each ran; return how many."""
    python_blocks = [b.line for b in code_blocks(page.read_text()) if b.language == "python"]
    run = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "markdown_examples.py"), str(page)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    ran = [line for line in run.stdout.splitlines() if line.startswith("ran ")]
    assert ran == [f"ran {page.name}:{n}" for n in python_blocks]
    return len(ran)


def test_every_readme_shell_line_is_either_run_or_known_not_to_be() -> None:
    lines = _shell_lines(README)
    unknown = [
        f"README.md:{n}: {c}"
        for n, c in lines
        if not c.startswith("lightning-ckpt ") and not c.startswith(NOT_RUN_PREFIXES)
    ]
    assert not unknown, "new shell examples must run in tests/test_readme.py:\n" + "\n".join(unknown)
    assert sum(c.startswith("lightning-ckpt ") for _, c in lines) >= 6


def test_readme_examples_run(s3_server: S3Server, tmp_path: Path) -> None:
    s3_server.reset()
    _create_bucket(s3_server.endpoint_url, name="my-bucket")
    env = _environment(tmp_path, s3_server.endpoint_url)
    assert _run_python_blocks(README, tmp_path, env) >= 4

    # What the examples claim, checked from outside: the resumed local run and the S3 run.
    local = tmp_path / "runs" / "quickstart" / "checkpoints"
    newest = latest(local)
    assert newest is not None and newest.endswith("ep2-ba192")
    assert read_checkpoint(newest)["global_step"] == 192
    storage_options = {"client_kwargs": {"endpoint_url": s3_server.endpoint_url}}
    remote = latest("s3://my-bucket/quickstart/checkpoints", storage_options)
    assert remote is not None and remote.endswith("ep1-ba128")

    commands = [c for _, c in _shell_lines(README) if c.startswith("lightning-ckpt ")]
    outputs = {}
    for command in commands:
        done = subprocess.run(shlex.split(command), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
        outputs[command.split()[1]] = done.stdout

    assert "ep2-ba192" in outputs["ls"]
    assert json.loads(outputs["inspect"])["global_step"] == 192
    assert "verified" in outputs["verify"]
    consolidated = torch.load(tmp_path / "model.ckpt", weights_only=True)
    assert torch.equal(
        consolidated["state_dict"]["layer.weight"], read_checkpoint(newest)["state_dict"]["layer.weight"]
    )
    assert latest("s3://my-bucket/archive", storage_options) is not None


@pytest.mark.parametrize("page", ["docs/storage_format.md", "docs/how_it_works.md"])
def test_docs_python_examples_run(page: str, tmp_path: Path) -> None:
    env = {**os.environ, "HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    assert _run_python_blocks(ROOT / page, tmp_path, env) >= 1, f"{page} has no python example"


def test_every_relative_link_in_the_docs_points_at_a_file_and_heading() -> None:
    pages = [README, ROOT / "CHANGELOG.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            file_part, _, anchor = target.partition("#")
            path = (page.parent / file_part).resolve() if file_part else page
            if not path.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and path.suffix == ".md" and anchor not in _anchors(path.read_text()):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+\s+(.*)$", markdown, flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}
