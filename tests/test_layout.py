from __future__ import annotations

import ast
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lightning_ckpt import layout
from lightning_ckpt.errors import ConfigError
from lightning_ckpt.layout import NameFormat, Progress, RankInfo


def test_constants() -> None:
    assert layout.FORMAT_VERSION == 3
    assert layout.FULL_FORMAT_VERSION == 2
    assert layout.MANIFEST_FILENAME == "manifest.json"
    assert layout.OBJECTS_FILENAME == "objects.pt"
    assert layout.SHARD_SUFFIX == ".safetensors"
    assert layout.POINTER_SUFFIX == ".symlink"
    assert layout.DEFAULT_LATEST_FILENAME == "latest"
    assert layout.DEFAULT_FILENAME == "ep{epoch}-ba{batch}"
    assert layout.DIST_VARIABLES == {
        "run_name",
        "rank",
        "local_rank",
        "node_rank",
        "world_size",
        "local_world_size",
    }
    assert layout.PROGRESS_VARIABLES == {"epoch", "batch", "batch_in_epoch"}


@pytest.mark.parametrize("module", ["layout", "interval", "policies"])
def test_pure_stdlib_imports(module: str) -> None:
    path = Path(layout.__file__).with_name(f"{module}.py")
    imported: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported - {"lightning_ckpt"} <= sys.stdlib_module_names


RANK = RankInfo(rank=5, local_rank=1, node_rank=2, world_size=16, local_world_size=8)
PROGRESS = Progress(epoch=3, batch=1200, batch_in_epoch=17, metrics={"val_loss": 0.12345, "val/loss": 0.5})


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("ep{epoch}-ba{batch}", "ep3-ba1200"),
        ("{run_name}/ckpt-{batch:06d}", "bert/ckpt-001200"),
        ("step={batch}-loss={val_loss:.3f}", "step=1200-loss=0.123"),
        ("rank{rank}", "rank5"),
        ("{local_rank}-{node_rank}-{world_size}-{local_world_size}", "1-2-16-8"),
        ("b{batch_in_epoch:03d}", "b017"),
        ("loss={val/loss:.2f}", "loss=0.50"),
        ("{{literal}}-{epoch}", "{literal}-3"),
        ("plain", "plain"),
    ],
)
def test_render(pattern: str, expected: str) -> None:
    assert NameFormat(pattern, argument="filename").render(run_name="bert", rank=RANK, progress=PROGRESS) == expected


@pytest.mark.parametrize(
    ("pattern", "run_name", "progress", "expected"),
    [
        ("ep{epoch}-ba{batch}", "", Progress(epoch=1, batch=4), {"epoch": 1, "batch": 4}),
        ("ep{epoch}-ba{batch}", "", Progress(epoch=0, batch=0), {"epoch": 0, "batch": 0}),
        ("{run_name}/ckpt-{batch:06d}", "my-run", Progress(batch=42), {"run_name": "my-run", "batch": 42}),
        (
            "{run_name}/ckpt-{batch:06d}",
            "a/b",
            Progress(batch=1234567),
            {"run_name": "a/b", "batch": 1234567},
        ),
        (
            "step={batch}-loss={val_loss:.3f}",
            "",
            Progress(batch=7, metrics={"val_loss": 0.12345}),
            {"batch": 7, "val_loss": 0.123},
        ),
        ("rank{rank}", "", None, {"rank": 5}),
        (
            "e{epoch:+d}|{batch:,d}|{batch:6d}",
            "",
            Progress(epoch=2, batch=12345),
            {"epoch": 2, "batch": 12345},
        ),
        ("m={val/loss}", "", Progress(metrics={"val/loss": 1.5}), {"val/loss": 1.5}),
        ("m={a.b:.1e}", "", Progress(metrics={"a.b": 2500.0}), {"a.b": 2500.0}),
        ("acc={acc:.1%}", "", Progress(metrics={"acc": 0.5}), {"acc": 0.5}),
        ("loss={loss}", "", Progress(metrics={"loss": float("-inf")}), {"loss": float("-inf")}),
        ("{{x}}{epoch}", "", Progress(epoch=9), {"epoch": 9}),
    ],
)
def test_parse_inverts_render(
    pattern: str, run_name: str, progress: Progress | None, expected: dict[str, object]
) -> None:
    fmt = NameFormat(pattern, argument="filename")
    name = fmt.render(run_name=run_name, rank=RANK, progress=progress)
    assert fmt.parse(name) == expected


@pytest.mark.parametrize(
    ("pattern", "name"),
    [
        ("ep{epoch}-ba{batch}", "latest"),
        ("ep{epoch}-ba{batch}", "ep1-ba"),
        ("ep{epoch}-ba{batch}", "ep1-ba4x"),
        ("ep{epoch}-ba{batch}", "ep01-ba4"),  # not how {epoch} renders 1
        ("ep{epoch}-ba{batch}", ".ep1-ba4.partial-ab12"),
        ("{run_name}/ckpt-{batch:06d}", "run/ckpt-42"),
        ("step={batch}-loss={val_loss:.3f}", "step=1-loss=abc"),
        ("ep{epoch}-{epoch}", "ep1-2"),  # a repeated variable must agree
    ],
)
def test_parse_returns_none_on_mismatch(pattern: str, name: str) -> None:
    assert NameFormat(pattern, argument="filename").parse(name) is None


def test_properties_and_repr() -> None:
    fmt = NameFormat("{run_name}/ep{epoch}-{val/loss:.3f}-{acc}", argument="filename")
    assert fmt.pattern == "{run_name}/ep{epoch}-{val/loss:.3f}-{acc}"
    assert fmt.placeholders == {"run_name", "epoch", "val/loss", "acc"}
    assert fmt.metric_names == {"val/loss", "acc"}
    assert repr(fmt) == "NameFormat('{run_name}/ep{epoch}-{val/loss:.3f}-{acc}', argument='filename')"


@pytest.mark.parametrize(
    ("pattern", "run_name", "expected"),
    [
        ("{run_name}-r{rank}-ep{epoch}", "bert", "bert-r5-ep{epoch}"),
        ("{run_name}/{world_size:03d}/{val/loss:.3f}", "x", "x/016/{val/loss:.3f}"),
        ("{run_name}-{{lit}}-{batch}", "a{b}", "a{{b}}-{{lit}}-{batch}"),
        ("{run_name}_{node_rank}", "r", "r_2"),
    ],
)
def test_partial(pattern: str, run_name: str, expected: str) -> None:
    fmt = NameFormat(pattern, argument="filename").partial(run_name=run_name, rank=RANK)
    assert fmt.pattern == expected
    full = NameFormat(pattern, argument="filename").render(run_name=run_name, rank=RANK, progress=PROGRESS)
    assert fmt.render(progress=PROGRESS) == full


def test_partial_keeps_restrictions() -> None:
    fmt = NameFormat("{run_name}", argument="folder", allow_progress=False).partial(run_name="r", rank=RANK)
    assert fmt.pattern == "r"
    with pytest.raises(ConfigError) as info:
        NameFormat("{run_name}", argument="folder").partial(run_name="", rank=RANK)
    assert str(info.value) == (
        "folder='{run_name}' is not valid. It renders to an empty name with run_name=''. "
        "Example of a valid value: 'ep{epoch}-ba{batch}'."
    )


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ("", "non-empty string"),
        (3, "non-empty string"),
        ("ep{epoch", "braces are malformed"),
        ("a}b", "braces are malformed"),
        ("{epoch!r}", "Conversions like '{epoch!r}' are not supported"),
        ("{}", "'{}' is not a variable name"),
        ("{0}", "'{0}' is not a variable name"),
        ("{ epoch }", "'{ epoch }' is not a variable name"),
        ("{loss:.{p}f}", "Nested fields"),
        ("{epoch:.3s}", "The format spec ':.3s' of '{epoch}' is invalid"),
        ("{run_name:d}", "The format spec ':d' of '{run_name}' is invalid"),
        ("{val_loss:d}", "The format spec ':d' of '{val_loss}' is invalid"),
    ],
)
def test_bad_patterns(pattern: Any, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        NameFormat(pattern, argument="filename")
    message = str(info.value)
    assert message.startswith(f"filename={pattern!r} is not valid.")
    assert reason in message
    assert "Example of a valid value: 'ep{epoch}-ba{batch}'." in message


def test_unknown_variable_without_metrics_lists_known_variables() -> None:
    with pytest.raises(ConfigError) as info:
        NameFormat("{run_nam}", argument="latest_filename", allow_metrics=False)
    assert str(info.value) == (
        "latest_filename='{run_nam}' is not valid. '{run_nam}' is not a known variable; the known variables "
        "are {batch}, {batch_in_epoch}, {epoch}, {local_rank}, {local_world_size}, {node_rank}, {rank}, "
        "{run_name}, {world_size}. Example of a valid value: 'ep{epoch}-ba{batch}'."
    )


@pytest.mark.parametrize("pattern", ["{run_name}/ep{epoch}", "ckpt/{batch}", "{val_loss}", "{batch_in_epoch}"])
def test_folder_may_not_hold_progress_or_metrics(pattern: str) -> None:
    with pytest.raises(ConfigError) as info:
        NameFormat(pattern, argument="folder", allow_progress=False)
    message = str(info.value)
    assert message.startswith(f"folder={pattern!r} is not valid. It may not contain '{{")
    assert "{rank}" in message
    assert "Example of a valid value: '{run_name}/checkpoints'." in message


def test_folder_progress_variable_lists_only_dist_variables() -> None:
    with pytest.raises(ConfigError) as info:
        NameFormat("{epoch}", argument="folder", allow_progress=False, allow_metrics=False)
    assert str(info.value) == (
        "folder='{epoch}' is not valid. It may not contain '{epoch}'; only "
        "{local_rank}, {local_world_size}, {node_rank}, {rank}, {run_name}, {world_size} are allowed here. "
        "Example of a valid value: '{run_name}/checkpoints'."
    )


def test_render_shows_an_unlogged_metric_as_nan_and_names_it() -> None:
    fmt = NameFormat("ep{epoch}-{val_acc:.2f}", argument="filename")
    progress = Progress(epoch=1, metrics={"val_loss": 0.5, "train_loss": 1.0})
    assert fmt.missing_metrics(progress) == ["val_acc"]
    assert fmt.render(progress=progress) == "ep1-nan"
    assert fmt.parse("ep1-nan") is not None


def test_render_without_progress() -> None:
    fmt = NameFormat("ep{epoch}-ba{batch}", argument="filename")
    with pytest.raises(ConfigError) as info:
        fmt.render()
    assert str(info.value) == (
        "filename='ep{epoch}-ba{batch}' is not valid. ['batch', 'epoch'] need training progress, "
        "which is not known here. Example of a valid value: 'ep{epoch}-ba{batch}'."
    )


@pytest.mark.parametrize(
    ("index", "count", "expected"),
    [
        (0, 1, "shard-00000-of-00001.safetensors"),
        (3, 4, "shard-00003-of-00004.safetensors"),
        (0, 123456, None),
    ],
)
def test_shard_filename_roundtrip(index: int, count: int, expected: str | None) -> None:
    name = layout.shard_filename(index, count)
    if expected is not None:
        assert name == expected
    assert layout.parse_shard_filename(name) == (index, count)


@pytest.mark.parametrize(
    ("index", "count", "message"),
    [
        (
            4,
            4,
            "index=4 is not valid. It must be in [0, count=4). Example of a valid value: 0 (any int in [0, 4)).",
        ),
        (-1, 4, "index=-1 is not valid. It must be in [0, count=4)."),
        (True, 4, "index=True is not valid."),
        (0, 0, "count=0 is not valid. It must be an int >= 1. Example of a valid value: 4."),
        (0, 2.0, "count=2.0 is not valid."),
    ],
)
def test_shard_filename_rejects(index: Any, count: Any, message: str) -> None:
    with pytest.raises(ValueError) as info:
        layout.shard_filename(index, count)
    assert str(info.value).startswith(message)


@pytest.mark.parametrize(
    "name",
    [
        "objects.pt",
        "shard-00004-of-00004.safetensors",
        "shard-0001-of-00004.safetensors",
        "shard-00001-of-00004.safetensors.tmp",
        "shard-00001-of-00004",
        ".shard-00001-of-00004.safetensors",
    ],
)
def test_parse_shard_filename_rejects(name: str) -> None:
    assert layout.parse_shard_filename(name) is None


def test_pointer_filename() -> None:
    assert layout.pointer_filename("latest") == "latest.symlink"
    assert layout.pointer_filename("latest-rank0") == "latest-rank0.symlink"
    with pytest.raises(ConfigError, match=r"^latest_filename='a/b' is not valid.*Example of a valid value: 'latest'"):
        layout.pointer_filename("a/b")


@pytest.mark.parametrize(
    ("make", "expected", "example"),
    [
        (layout.partial_dirname, ".ep1-ba4.partial-ab12", "'ep1-ba4'"),
        (layout.trash_dirname, ".ep1-ba4.trash-ab12", "'ep1-ba4'"),
        (layout.temp_filename, ".ep1-ba4.tmp-ab12", "'manifest.json'"),
    ],
)
def test_hidden_names(make: Callable[[str, str], str], expected: str, example: str) -> None:
    name = make("ep1-ba4", "ab12")
    assert name == expected
    assert layout.is_hidden_name(name)
    assert layout.is_partial_dirname(name) is (make is layout.partial_dirname)
    with pytest.raises(ConfigError) as info:
        make("..", "ab12")
    assert str(info.value) == (
        f"name='..' is not valid. It must be a single path component. Example of a valid value: {example}."
    )
    with pytest.raises(ConfigError) as info:
        make("ep1-ba4", "a/b")
    assert str(info.value) == (
        "token='a/b' is not valid. It must be letters, digits, '_' or '-'. Example of a valid value: '1f2e3d4c'."
    )


@pytest.mark.parametrize(
    ("name", "partial"),
    [
        (".ep1-ba4.partial-ab12", True),
        (".run.x.partial-0f_-A", True),
        ("ep1-ba4.partial-ab12", False),
        (".ep1-ba4.partial-", False),
        (".ep1-ba4.partial-a/b", False),
        (".partial-ab12", False),
    ],
)
def test_is_partial_dirname(name: str, partial: bool) -> None:
    assert layout.is_partial_dirname(name) is partial


def test_temp_filename_of_manifest() -> None:
    assert layout.temp_filename("manifest.json", "ab12") == ".manifest.json.tmp-ab12"


@pytest.mark.parametrize(
    ("name", "hidden"), [(".ep1", True), (".", True), ("ep1-ba4", False), ("latest.symlink", False)]
)
def test_is_hidden_name(name: str, hidden: bool) -> None:
    assert layout.is_hidden_name(name) is hidden


@pytest.mark.parametrize(
    ("name", "plain"),
    [
        ("ep1-ba4", True),
        ("manifest.json", True),
        (".hidden", True),
        ("", False),
        (".", False),
        ("..", False),
        ("a/b", False),
        ("a\\b", False),
        ("a\0b", False),
        ("/abs", False),
        (None, False),
    ],
)
def test_is_plain_name(name: Any, plain: bool) -> None:
    assert layout.is_plain_name(name) is plain
