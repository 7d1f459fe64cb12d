"""The ``lightning-ckpt`` command line on checkpoints written by a real Trainer, locally and on a real S3 server."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import fsspec
import lightning as L
import pytest
import torch
from torch.distributed import HashStore

from lightning_ckpt import CheckpointSaver, latest, read_checkpoint
from lightning_ckpt.cli import main
from lightning_ckpt.commit import update_latest
from lightning_ckpt.demo import TinyRegressor, build_trainer
from lightning_ckpt.dist import Exchange
from lightning_ckpt.lock import FolderLock
from lightning_ckpt.storage import Storage

from .conftest import ROOT
from .s3_server import REGION, S3Bucket, S3Server, storage_options
from .save_helpers import collective_save

NAMES = ["ep0-ba4", "ep0-ba8", "ep1-ba12", "ep1-ba16"]
SHARD = "shard-00000-of-00001.safetensors"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with four committed checkpoints of a real fit; ``latest`` -> ep1-ba16. Do not modify."""
    root = tmp_path_factory.mktemp("cli")
    L.seed_everything(0, verbose=False)
    saver = CheckpointSaver(folder=root / "ckpts", save_interval="4ba", run_name="cli")
    build_trainer(str(root), max_epochs=2, callbacks=[saver]).fit(TinyRegressor())
    return root / "ckpts"


@pytest.fixture
def folder(trained: Path, tmp_path: Path) -> Path:
    """A private copy of the trained folder, for tests that change it."""
    return Path(shutil.copytree(trained, tmp_path / "ckpts", symlinks=True))


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_module(*argv: str) -> subprocess.CompletedProcess[str]:
    """``python -m lightning_ckpt ARGV`` in a fresh process, stdout/stderr not terminals."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "lightning_ckpt", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, check=False)


def assert_one_line_error(err: str) -> None:
    assert err.startswith("lightning-ckpt: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err


def flip_byte(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def reshard(src: Path, dst: Path, world_size: int) -> None:
    """Rewrite ``src`` as a ``world_size``-shard checkpoint: real ranks as threads over one key-value store."""
    checkpoint = read_checkpoint(str(src), weights_only=False)
    store, errors = HashStore(), []

    def rank(r: int) -> None:
        try:
            exchange = Exchange(store, r, world_size, "reshard", 30)
            collective_save(checkpoint, str(dst), exchange=exchange, nonce="cli", peers=tuple(range(world_size)))
        except Exception as err:
            errors.append(err)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_ls_table_marks_latest_and_shows_incomplete(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (folder / "ep2-ba20").mkdir()
    (folder / "ep2-ba20" / SHARD).write_bytes(b"x")  # an upload that never got its manifest
    (folder / ".ep2-ba24.partial-abc123").mkdir()  # a save still being written
    code, out, _ = run(capsys, "ls", folder)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "EPOCH", "STEP", "SIZE", "WRITTEN", "SHARDS", "STATE", "AGE", "LATEST"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert list(rows) == [*NAMES, ".ep2-ba24.partial-abc123", "ep2-ba20"]
    for name in NAMES:
        epoch, step = name[2], name.split("-ba")[1]
        assert rows[name][1:3] == [epoch, step] and rows[name][7:9] == ["1", "committed"], rows[name]
    assert [name for name, cells in rows.items() if cells[-1] == "latest"] == ["ep1-ba16"]
    assert rows["ep1-ba16"][-2:] == ["<-", "latest"]
    assert rows["ep2-ba20"][1:] == ["-", "-", "-", "-", "-", "incomplete", "-"]
    assert rows[".ep2-ba24.partial-abc123"][6] == "incomplete"

    code, out, _ = run(capsys, "ls", folder, "--json")
    listed = json.loads(out)
    assert code == 0 and [r["name"] for r in listed if r["latest"]] == ["ep1-ba16"]


def test_inspect_json_and_text(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "inspect", trained / "latest", "--json")
    info = json.loads(out)
    assert code == 0
    assert (info["name"], info["epoch"], info["global_step"], info["world_size"]) == ("ep1-ba16", 1, 16, 1)
    assert info["weights_only"] is False and info["created"] > 0
    assert sorted(f["name"] for f in info["files"]) == ["objects.pt", SHARD]
    assert all(f["checksum"].startswith("crc32:") and f["size"] > 0 for f in info["files"])
    weight = next(t for t in info["tensors"] if t["key"] == "state_dict/net.0.weight")
    assert (weight["dtype"], weight["shape"], weight["nbytes"]) == ("float32", [32, 16], 32 * 16 * 4)
    assert {"epoch", "global_step", "state_dict", "optimizer_states", "hyper_parameters"} <= set(info["object_keys"])
    assert info["versions"]["torch"] == torch.__version__

    code, out, _ = run(capsys, "inspect", trained / "ep0-ba4")
    assert code == 0
    assert "step         4" in out
    assert re.search(r"\nstate_dict/net\.0\.weight +float32 +\(32, 16\) +2\.0 KiB +1\n", out)
    assert "non-tensor keys: " in out and "optimizer_states" in out


def test_verify_passes_then_names_the_flipped_file(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "verify", folder / "ep1-ba12")
    assert code == 0 and f"ok    {SHARD}" in out and "verified" in out and err == ""
    flip_byte(folder / "ep1-ba12" / SHARD)
    code, out, err = run(capsys, "verify", folder / "ep1-ba12")
    assert code == 1
    assert f"FAIL  {SHARD}: " in out and "checksum crc32:" in out and "ok    objects.pt" in out
    assert_one_line_error(err)
    assert "1 of 2 files failed" in err


def test_consolidate_any_number_of_shards_loads_in_lightning_and_torch(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sharded = tmp_path / "sharded" / "ep1-ba16"
    reshard(trained / "ep1-ba16", sharded, world_size=3)
    assert len(list(sharded.glob("shard-*"))) == 3
    out = tmp_path / "out" / "model.ckpt"
    code, stdout, _ = run(capsys, "consolidate", sharded, out)
    assert code == 0 and stdout.startswith(f"wrote {out}")
    assert sorted(os.listdir(out.parent)) == ["model.ckpt"], "no temporary file left"

    expected = read_checkpoint(str(trained / "ep1-ba16"), weights_only=False)
    model = TinyRegressor.load_from_checkpoint(str(out))
    weights = expected["state_dict"]
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    plain = torch.load(out, weights_only=False)
    assert plain.keys() == expected.keys() and plain["global_step"] == 16
    assert torch.equal(
        plain["optimizer_states"][0]["state"][0]["exp_avg"], expected["optimizer_states"][0]["state"][0]["exp_avg"]
    )


def test_prune_keeps_the_newest_and_the_latest(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    storage, root = Storage.open(folder)
    update_latest(storage, root, "ep0-ba8", "latest")  # latest points at an older checkpoint: it must survive
    code, out, _ = run(capsys, "prune", folder, "--keep", "1", "--dry-run")
    assert code == 0 and out.splitlines() == ["would delete ep0-ba4", "would delete ep1-ba12"]
    assert all((folder / n / "manifest.json").is_file() for n in NAMES), "a dry run deletes nothing"
    live_run = FolderLock.acquire(storage, root, run_name="live")  # a run is saving into the folder
    try:
        code, _, err = run(capsys, "prune", folder, "--keep", "1")
    finally:
        live_run.release()
    assert code == 1 and "is in use by run 'live'" in err
    assert_one_line_error(err)
    assert all((folder / n / "manifest.json").is_file() for n in NAMES), "refused: nothing deleted"
    code, out, _ = run(capsys, "prune", folder, "--keep", "1")
    assert code == 0 and out.splitlines() == ["deleted ep0-ba4", "deleted ep1-ba12"]
    assert sorted(n for n in os.listdir(folder) if not n.startswith(".")) == [
        "ep0-ba8",
        "ep1-ba16",
        "latest",
        "latest.symlink",
    ]
    code, out, _ = run(capsys, "prune", folder, "--keep", "0")
    assert code == 0 and out.strip() == "nothing to delete", "the newest and the latest are never deleted"


def test_prune_keeps_every_n_th_step_like_the_callback(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "prune", folder, "--keep", "1", "--keep-every-n-steps", "8", "--dry-run")
    assert code == 0 and out.splitlines() == ["would delete ep0-ba4", "would delete ep1-ba12"]  # keeps 8 and 16
    code, out, _ = run(capsys, "prune", folder, "--keep", "0", "--keep-every-n-steps", "4")
    assert code == 0 and out.strip() == "nothing to delete"
    code, _, err = run(capsys, "prune", folder, "--keep", "1", "--keep-every-n-steps", "0")
    assert code == 2 and "--keep-every-n-steps must be >= 1" in err
    assert_one_line_error(err)
    assert all((folder / n / "manifest.json").is_file() for n in NAMES)


def test_cp_to_and_from_s3_verifies_and_refuses_a_corrupt_source(
    folder: Path, tmp_path: Path, s3_bucket: S3Bucket, capsys: pytest.CaptureFixture[str]
) -> None:
    options = ["--storage-options", json.dumps(s3_bucket.storage_options)]
    remote = f"{s3_bucket.url}/run/ep1-ba16"
    code, out, _ = run(capsys, *options, "cp", folder / "ep1-ba16", remote)
    assert code == 0 and out.strip() == f"copied to {remote}"
    code, out, _ = run(capsys, "ls", f"{s3_bucket.url}/run", *options)
    assert code == 0 and out.splitlines()[1].split()[8] == "uploaded"

    back = tmp_path / "back"
    code, out, _ = run(capsys, *options, "cp", remote, f"{back}/")
    assert code == 0 and (back / "ep1-ba16" / "manifest.json").is_file()
    expected = read_checkpoint(str(folder / "ep1-ba16"), weights_only=False)
    copied = read_checkpoint(str(back / "ep1-ba16"), weights_only=False)
    assert all(torch.equal(v, expected["state_dict"][k]) for k, v in copied["state_dict"].items())
    assert sorted(os.listdir(back)) == ["ep1-ba16"], "no staging directory left"

    code, out, _ = run(capsys, *options, "consolidate", remote, tmp_path / "remote.ckpt")  # straight from S3
    consolidated = torch.load(tmp_path / "remote.ckpt", weights_only=True)
    assert code == 0 and consolidated["global_step"] == expected["global_step"] == 16
    assert all(torch.equal(v, expected["state_dict"][k]) for k, v in consolidated["state_dict"].items())

    flip_byte(folder / "ep1-ba12" / SHARD, offset=5000)
    code, out, err = run(capsys, *options, "cp", folder / "ep1-ba12", f"{s3_bucket.url}/run/bad")
    assert code == 1 and out == ""
    assert_one_line_error(err)
    assert SHARD in err and "checksum" in err
    fs = fsspec.filesystem("s3", **s3_bucket.storage_options)
    assert not fs.exists(f"{s3_bucket.url}/run/bad/manifest.json"), "nothing committed at DST"
    code, _, err = run(capsys, *options, "cp", folder / "ep1-ba12", tmp_path / "local-bad")
    assert code == 1 and not (tmp_path / "local-bad").exists() and os.listdir(tmp_path) != []


@pytest.fixture
def other_s3(s3_bucket: S3Bucket) -> Iterator[S3Bucket]:
    """A bucket on a second moto server: another endpoint, reached with other credentials (another account)."""
    server = S3Server()
    try:
        options = {**storage_options(server.endpoint_url), "key": "other-account-key", "secret": "other-account-secret"}
        name = f"other-bucket-{uuid.uuid4().hex[:12]}"
        client = boto3.client("s3", endpoint_url=server.endpoint_url, region_name=REGION,
                              aws_access_key_id=options["key"], aws_secret_access_key=options["secret"])  # fmt: skip
        client.create_bucket(Bucket=name)
        client.close()
        yield S3Bucket(f"s3://{name}", options)
    finally:
        server.stop()


def pointer_names(out: str) -> list[str]:
    """The names ``ls`` marks ``<- latest``."""
    return [line.split()[0] for line in out.splitlines() if line.endswith("<- latest")]


def test_cp_between_two_s3_endpoints_with_src_and_dst_storage_options(
    folder: Path, s3_bucket: S3Bucket, other_s3: S3Bucket, capsys: pytest.CaptureFixture[str]
) -> None:
    src_options, dst_options = json.dumps(s3_bucket.storage_options), json.dumps(other_s3.storage_options)
    first = f"{s3_bucket.url}/run/ep1-ba16"
    code, out, err = run(capsys, "cp", folder / "ep1-ba16", first, "--dst-storage-options", src_options)
    assert code == 0 and out.strip() == f"copied to {first}", err

    mirror = f"{other_s3.url}/mirror/ep1-ba16"
    code, out, err = run(capsys, "cp", first, f"{other_s3.url}/mirror/",
                         "--src-storage-options", src_options, "--dst-storage-options", dst_options)  # fmt: skip
    assert code == 0 and out.strip() == f"copied to {mirror}", err
    fs_src = fsspec.filesystem("s3", **s3_bucket.storage_options)
    fs_dst = fsspec.filesystem("s3", **other_s3.storage_options)
    for name in ("objects.pt", SHARD):
        assert fs_dst.cat_file(f"{mirror}/{name}") == (folder / "ep1-ba16" / name).read_bytes(), name
    manifest = json.loads(fs_dst.cat_file(f"{mirror}/manifest.json"))
    assert manifest == json.loads((folder / "ep1-ba16" / "manifest.json").read_bytes())
    assert not fs_src.exists(other_s3.url) and not fs_dst.exists(s3_bucket.url), "each end stayed on its own server"
    code, out, err = run(capsys, "verify", mirror, "--storage-options", dst_options)
    assert code == 0 and "verified" in out, err

    # --storage-options is used for the end that has no option of its own
    again = f"{other_s3.url}/mirror/again"
    code, out, err = run(
        capsys, "--storage-options", src_options, "cp", first, again, "--dst-storage-options", dst_options
    )
    assert code == 0 and out.strip() == f"copied to {again}", err
    copied = read_checkpoint(again, weights_only=False, storage_options=other_s3.storage_options)
    assert copied["global_step"] == 16 and not fs_src.exists(other_s3.url)


def test_cp_set_latest_moves_the_pointers_and_without_it_they_stay(
    folder: Path, tmp_path: Path, s3_bucket: S3Bucket, capsys: pytest.CaptureFixture[str]
) -> None:
    options = ["--storage-options", json.dumps(s3_bucket.storage_options)]
    fs = fsspec.filesystem("s3", **s3_bucket.storage_options)
    remote = f"{s3_bucket.url}/run"
    code, _, err = run(capsys, *options, "cp", folder / "ep1-ba16", f"{remote}/")
    assert code == 0, err
    assert not fs.exists(f"{remote}/latest.symlink"), "without --set-latest no pointer is written"

    code, out, err = run(capsys, *options, "cp", folder / "ep0-ba8", f"{remote}/", "--set-latest")
    assert code == 0 and out.strip() == f"copied to {remote}/ep0-ba8", err
    assert fs.cat_file(f"{remote}/latest.symlink") == b"ep0-ba8"
    code, out, _ = run(capsys, *options, "ls", remote)
    assert code == 0 and pointer_names(out) == ["ep0-ba8"]
    code, out, _ = run(capsys, *options, "inspect", f"{remote}/latest", "--json")  # resolves the pointer
    assert code == 0 and (json.loads(out)["name"], json.loads(out)["global_step"]) == ("ep0-ba8", 8)
    code, _, err = run(capsys, *options, "cp", folder / "ep1-ba12", f"{remote}/")
    assert code == 0 and fs.cat_file(f"{remote}/latest.symlink") == b"ep0-ba8", "no flag: the pointer stays"

    # locally both the pointer file and the symlink move, in a folder whose latest was ep1-ba16
    assert os.readlink(folder / "latest") == "ep1-ba16"
    code, out, err = run(capsys, *options, "cp", f"{remote}/ep0-ba8", folder / "restored-ba8", "--set-latest")
    assert code == 0 and out.strip() == f"copied to {folder / 'restored-ba8'}", err
    assert os.readlink(folder / "latest") == "restored-ba8"
    assert (folder / "latest.symlink").read_bytes() == b"restored-ba8"
    code, out, _ = run(capsys, "ls", folder)
    assert code == 0 and pointer_names(out) == ["restored-ba8"]
    assert read_checkpoint(str(folder / "latest"), weights_only=False)["global_step"] == 8

    fresh = tmp_path / "fresh"
    code, _, err = run(capsys, "cp", folder / "ep0-ba4", f"{fresh}/", "--set-latest")
    assert code == 0, err
    assert latest(fresh) == str(fresh / "ep0-ba4") and os.readlink(fresh / "latest") == "ep0-ba4"
    assert (fresh / "latest.symlink").read_bytes() == b"ep0-ba4"


def test_cp_storage_option_errors_name_the_option_and_hide_values(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dst = tmp_path / "copy"
    code, out, err = run(capsys, "cp", folder / "ep1-ba16", dst, "--dst-storage-options", '{"key": "AKIA-hunter2",')
    assert code == 2 and out == ""
    assert_one_line_error(err)
    assert "--dst-storage-options is not valid JSON" in err and "hunter2" not in err
    code, _, err = run(capsys, "cp", folder / "ep1-ba16", dst, "--src-storage-options", '["hunter2"]')
    assert code == 2 and "--src-storage-options must be a JSON object, got a JSON list" in err and "hunter2" not in err
    assert_one_line_error(err)
    secret = json.dumps({"secret": "hunter2-very-secret", "colour": "blue"})
    code, _, err = run(capsys, "cp", folder / "ep1-ba16", "s3://bucket/run/x", "--dst-storage-options", secret)
    assert code == 2 and "--dst-storage-options='<hidden>' is not valid" in err and "'colour' is not an option" in err
    assert "hunter2" not in err
    assert_one_line_error(err)
    assert sorted(os.listdir(tmp_path)) == ["ckpts"], "nothing copied"


def test_errors_are_one_line_with_exit_codes(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "verify", folder / "missing")
    assert code == 1 and out == ""
    assert_one_line_error(err)
    code, _, err = run(capsys, "prune", folder)
    assert code == 2 and "--keep" in err
    assert_one_line_error(err)
    code, _, err = run(capsys, "frobnicate")
    assert code == 2
    assert_one_line_error(err)
    code, _, err = run(capsys, "--storage-options", "{not json", "ls", "s3://b/x")
    assert code == 2 and "--storage-options is not valid JSON" in err
    secret = json.dumps({"secret": "hunter2-very-secret", "colour": "blue"})
    code, _, err = run(capsys, "ls", "s3://bucket/run", "--storage-options", secret)
    assert code == 2 and "'colour' is not an option" in err and "hunter2" not in err
    assert_one_line_error(err)
    code, _, err = run(capsys, "consolidate", folder / "ep0-ba4", folder / "ep0-ba4" / "manifest.json" / "x.ckpt")
    assert code == 1
    assert_one_line_error(err)


def test_python_dash_m_runs_the_command_line(trained: Path) -> None:
    listed = run_module("ls", str(trained))  # one process only: importing Lightning takes seconds
    assert listed.returncode == 0 and listed.stderr == ""
    assert [line.split()[0] for line in listed.stdout.splitlines() if line.endswith("<- latest")] == ["ep1-ba16"]


def test_the_installed_console_script_runs(trained: Path) -> None:
    script = shutil.which("lightning-ckpt")
    assert script is not None, "pip install -e . installs the lightning-ckpt console script"
    verified = subprocess.run([script, "verify", str(trained / "ep1-ba16")], capture_output=True, text=True,
                              timeout=120, check=False)  # fmt: skip
    assert verified.returncode == 0, verified.stderr
    bad = subprocess.run([script, "verify", str(trained / "no-such")], capture_output=True, text=True, timeout=120,
                         check=False)  # fmt: skip
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr


def _stderr_of(argv: list[str], *, terminal: bool) -> str:
    """Run the installed script with stderr on a pseudo-terminal (``terminal``) or a pipe; return stderr."""
    script = shutil.which("lightning-ckpt") or sys.exit("lightning-ckpt is not installed")
    if not terminal:
        done = subprocess.run([script, *argv], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stderr
    import fcntl
    import struct
    import termios

    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a real terminal has a size
    process = subprocess.Popen([script, *argv], stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert process.wait(timeout=120) == 0
    return b"".join(chunks).decode(errors="replace")


def test_progress_bars_show_on_a_terminal_and_stay_quiet_in_pipes(trained: Path, tmp_path: Path) -> None:
    ckpt = str(trained / "ep1-ba16")
    from tqdm import tqdm

    manifest = json.loads((trained / "ep1-ba16" / "manifest.json").read_text())
    total = tqdm.format_sizeof(sum(f["size"] for f in manifest["files"]), divisor=1024)  # e.g. "15.0k"
    for command, desc, done in (
        (["verify", ckpt], "verify", f"{total}/{total}"),
        (["cp", ckpt, str(tmp_path / "copies") + "/"], "copy", f"{total}/{total}"),
        (["consolidate", ckpt, str(tmp_path / "model.ckpt")], "write", "B/s"),
    ):
        shown = _stderr_of(command, terminal=True)
        assert f"{desc}: 100%" in shown and done in shown, shown
        (tmp_path / "model.ckpt").unlink(missing_ok=True)
        shutil.rmtree(tmp_path / "copies", ignore_errors=True)
        assert _stderr_of(command, terminal=False) == ""


@pytest.mark.parametrize("dst", ["{src}/", "{src}/backup", "{src}"])
def test_cp_into_the_source_itself_is_refused_and_changes_nothing(
    folder: Path, capsys: pytest.CaptureFixture[str], dst: str
) -> None:
    src = folder / "ep1-ba16"
    before = sorted(p.name for p in src.iterdir())
    code, _, err = run(capsys, "cp", str(src), dst.format(src=src))
    assert code == 2 and "is inside the checkpoint SRC" in err, err
    assert_one_line_error(err)
    assert sorted(p.name for p in src.iterdir()) == before


def test_cp_to_a_relative_destination_copies_into_the_current_directory(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "cp", str(folder / "ep1-ba16"), "backup")
    assert code == 0, err
    assert out.strip() == f"copied to {tmp_path / 'backup'}"
    copied, original = read_checkpoint(str(tmp_path / "backup")), read_checkpoint(str(folder / "ep1-ba16"))
    assert all(torch.equal(copied["state_dict"][k], v) for k, v in original["state_dict"].items())
