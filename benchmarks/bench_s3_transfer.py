"""Upload and download one large file to a local S3 (moto): s3fs vs boto3 vs ``lightning_ckpt.transfer``.

All peers run in one process against one ``moto_server`` started by this script on 127.0.0.1,
in an interleaved order (the order rotates each repetition), on the same random input file, after
one tiny untimed round trip per peer (sessions and connection pools warm):

* ``s3fs``: ``put_file`` / ``get_file`` with its defaults;
* ``boto3``: ``upload_file`` / ``download_file`` with 8 MiB parts, 8 threads, 8 MiB threshold;
* ``lightning_ckpt``: ``transfer.put_file`` / ``transfer.get_file`` at ``max_concurrency`` 8 and 16.

Each upload goes to a fresh key (deleted afterwards, untimed); downloads all read one object
uploaded once up front, and every downloaded copy is checked (size and SHA-256, untimed) and deleted.
moto on loopback is bound by the server (one Python process), so the figures compare client
efficiency against the same server; they are not S3 speeds.

Usage::

    python benchmarks/bench_s3_transfer.py [--mib 1024] [--reps 3] [--dir PATH] [--json out.json]
    python benchmarks/bench_s3_transfer.py --smoke      # --mib 16 --reps 1, for CI
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tests.s3_server import CREDENTIALS, REGION, S3Server  # noqa: E402

MIB = 2**20
BLOCK = 64 * MIB
Upload = Callable[[str, str], None]  # (local path, key)
Download = Callable[[str, str], None]  # (key, local path)


@dataclass
class Peer:
    """One client under test and its timings in seconds."""

    name: str
    upload: Upload
    download: Download
    up_s: list[float] = field(default_factory=list)
    down_s: list[float] = field(default_factory=list)
    error: str = ""


def machine_facts() -> dict[str, Any]:
    """Cores, RAM, and the versions of everything in the data path."""
    mem_kib = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    versions = {name: _version(name) for name in ("torch", "s3fs", "aiobotocore", "boto3", "moto", "lightning")}
    return {
        "cpus": os.cpu_count(),
        "ram_gib": round(mem_kib / 2**20, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        **versions,
    }


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


def write_input(path: str, mib: int) -> str:
    """Write ``mib`` MiB of random bytes in 64 MiB blocks; return their SHA-256."""
    digest = hashlib.sha256()
    remaining = mib * MIB
    with open(path, "wb") as f:
        while remaining:
            block = os.urandom(min(BLOCK, remaining))
            digest.update(block)
            f.write(block)
            remaining -= len(block)
    return digest.hexdigest()


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            digest.update(block)
    return digest.hexdigest()


def boto3_client(endpoint_url: str) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=REGION,
        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    )


def s3fs_options(endpoint_url: str) -> dict[str, Any]:
    """Plain s3fs options (library-default retries and caches, unlike the test fixtures)."""
    return {
        "key": CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "secret": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "client_kwargs": {"endpoint_url": endpoint_url, "region_name": REGION},
    }


def s3fs_peer(endpoint_url: str, bucket: str) -> Peer:
    import s3fs

    fs = s3fs.S3FileSystem(**s3fs_options(endpoint_url))
    return Peer(
        "s3fs put_file/get_file (defaults)",
        lambda local, key: fs.put_file(local, f"{bucket}/{key}"),
        lambda key, local: fs.get_file(f"{bucket}/{key}", local),
    )


def boto3_peer(client: Any, bucket: str) -> Peer:
    from boto3.s3.transfer import TransferConfig

    config = TransferConfig(multipart_threshold=8 * MIB, multipart_chunksize=8 * MIB, max_concurrency=8)
    return Peer(
        "boto3 upload_file/download_file (8 MiB x 8)",
        lambda local, key: client.upload_file(local, bucket, key, Config=config),
        lambda key, local: client.download_file(bucket, key, local, Config=config),
    )


def lightning_ckpt_peer(endpoint_url: str, bucket: str, concurrency: int) -> Peer:
    from lightning_ckpt import transfer
    from lightning_ckpt.storage import Storage

    options = s3fs_options(endpoint_url)
    storage, root = Storage.open(f"s3://{bucket}", options)  # one per peer, as the package's uploader keeps one

    def upload(local: str, key: str) -> None:
        transfer.put_file(storage, local, f"{root}/{key}", max_concurrency=concurrency)

    def download(key: str, local: str) -> None:
        transfer.get_file(storage, f"{root}/{key}", local, max_concurrency=concurrency)

    return Peer(f"lightning_ckpt.transfer (max_concurrency={concurrency})", upload, download)


def timed(action: Callable[[], None]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def run_upload(peer: Peer, client: Any, bucket: str, src: str) -> None:
    key = f"up/{uuid.uuid4().hex}.bin"
    try:
        peer.up_s.append(timed(lambda: peer.upload(src, key)))
        size = client.head_object(Bucket=bucket, Key=key)["ContentLength"]
        if size != os.path.getsize(src):
            raise RuntimeError(f"uploaded {size} bytes, expected {os.path.getsize(src)}")
    except Exception as err:  # one peer failing must not end the run
        peer.error = f"upload: {type(err).__name__}: {err}"
    finally:
        client.delete_object(Bucket=bucket, Key=key)


def run_download(peer: Peer, source_key: str, workdir: str, expected_sha: str) -> None:
    local = os.path.join(workdir, f"down-{uuid.uuid4().hex}.bin")
    try:
        peer.down_s.append(timed(lambda: peer.download(source_key, local)))
        if sha256_of(local) != expected_sha:
            raise RuntimeError("downloaded bytes differ from the source")
    except Exception as err:
        peer.error = f"download: {type(err).__name__}: {err}"
    finally:
        if os.path.exists(local):
            os.unlink(local)


def warm_up(peers: list[Peer], bucket: str, workdir: str) -> None:
    """One tiny untimed round trip per peer, so sessions and connection pools exist before timing."""
    tiny = os.path.join(workdir, "warm-up.bin")
    with open(tiny, "wb") as f:
        f.write(b"w" * 1024)
    for peer in peers:
        peer.upload(tiny, "warm-up/tiny.bin")
        peer.download("warm-up/tiny.bin", tiny + ".back")
        os.unlink(tiny + ".back")
    os.unlink(tiny)


def run_benchmark(peers: list[Peer], client: Any, bucket: str, src: str, reps: int, workdir: str) -> None:
    """Uploads then downloads, every peer once per repetition, starting at a different peer each time."""
    expected_sha = sha256_of(src)
    source_key = "source/input.bin"
    client.upload_file(src, bucket, source_key)
    warm_up(peers, bucket, workdir)
    for rep in range(reps):
        order = peers[rep % len(peers) :] + peers[: rep % len(peers)]
        for peer in order:
            run_upload(peer, client, bucket, src)
        for peer in order:
            run_download(peer, source_key, workdir, expected_sha)
        print(f"rep {rep + 1}/{reps} done", flush=True)


def summarize(seconds: list[float], nbytes: int) -> dict[str, float]:
    """Median and range of the throughput in GB/s (10^9 bytes per second)."""
    if not seconds:
        return {}
    rates = [nbytes / 1e9 / s for s in seconds]
    return {"median_gbps": nbytes / 1e9 / statistics.median(seconds), "min_gbps": min(rates), "max_gbps": max(rates)}


def _cell(stats: dict[str, float], best: float) -> str:
    if not stats:
        return "failed | -"
    rate = f"{stats['median_gbps']:.3f} ({stats['min_gbps']:.3f}-{stats['max_gbps']:.3f})"
    return f"{rate} | {stats['median_gbps'] / best:.2f}x"


def markdown_table(results: list[dict[str, Any]]) -> str:
    best_up = max((r["upload"]["median_gbps"] for r in results if r["upload"]), default=1.0)
    best_down = max((r["download"]["median_gbps"] for r in results if r["download"]), default=1.0)
    lines = [
        "| client | upload GB/s, median (min-max) | vs fastest | download GB/s, median (min-max) | vs fastest |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['name']} | {_cell(r['upload'], best_up)} | {_cell(r['download'], best_down)} |")
    lines += [f"\n{r['name']}: {r['error']}" for r in results if r["error"]]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024, help="file size in MiB")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="--mib 16 --reps 1: a few seconds, for CI")
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temp dir under benchmarks/results)")
    parser.add_argument("--json", default=None, help="write the raw numbers here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.mib, args.reps = 16, 1
    return args


def print_facts(facts: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"# S3 transfer benchmark: {args.mib} MiB file, {args.reps} reps")
    print(", ".join(f"{k}={v}" for k, v in facts.items()))
    print(
        "Note: moto on loopback is server-bound (~0.05-0.16 GB/s measured here before); "
        "the table shows relative client efficiency against the same server, not S3 speed.\n",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    facts = machine_facts()
    print_facts(facts, args)
    os.environ.update({**CREDENTIALS, "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"})
    results_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(args.dir or results_dir, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="s3-transfer-", dir=args.dir or results_dir)
    try:
        src = os.path.join(workdir, "input.bin")
        write_input(src, args.mib)
        with S3Server() as server:
            client = boto3_client(server.endpoint_url)
            bucket = f"bench-{uuid.uuid4().hex[:12]}"
            client.create_bucket(Bucket=bucket)
            peers = [
                s3fs_peer(server.endpoint_url, bucket),
                boto3_peer(client, bucket),
                lightning_ckpt_peer(server.endpoint_url, bucket, 8),
                lightning_ckpt_peer(server.endpoint_url, bucket, 16),
            ]
            started = time.perf_counter()
            run_benchmark(peers, client, bucket, src, args.reps, workdir)
            wall_s = time.perf_counter() - started
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    nbytes = args.mib * MIB
    results = [
        {
            "name": p.name,
            "upload": summarize(p.up_s, nbytes),
            "download": summarize(p.down_s, nbytes),
            "upload_s": p.up_s,
            "download_s": p.down_s,
            "error": p.error,
        }
        for p in peers
    ]
    print(markdown_table(results))
    print(f"\nwall time of the timed section: {wall_s:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": facts, "mib": args.mib, "reps": args.reps, "results": results}, f, indent=2)
    return 1 if any(p.error for p in peers) else 0


if __name__ == "__main__":
    sys.exit(main())
