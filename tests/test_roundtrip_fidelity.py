"""A loaded checkpoint is what ``torch.load`` would give: own memory per tensor, ties, types, flags, data.

Each test compares with ``torch.save`` + ``torch.load`` of the same dict where that is what a user
would check.
"""

from __future__ import annotations

import collections
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_ckpt import CorruptCheckpointError, ShardedCheckpointIO, read_checkpoint
from lightning_ckpt.demo import build_trainer
from lightning_ckpt.manifest import Manifest

SHARD = "shard-00000-of-00001.safetensors"


def _torch_round_trip(obj: Any, **load_kwargs: Any) -> Any:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, **load_kwargs)


def _saved_size(obj: Any) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return len(buffer.getvalue())


def _manifest(path: Path) -> Manifest:
    return Manifest.from_json((path / "manifest.json").read_bytes(), source="manifest.json")


def _mixed_state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return {
        "state_dict": {
            "big.weight": torch.randn(512, 600, generator=g),  # 1.2 MB: large enough to be memory-mapped
            "big.bias": torch.randn(650, generator=g),  # 2.6 KB, the bias of the issue
            "half": torch.randn(33, generator=g).half(),
            "bf16": torch.randn(3, 5, generator=g).bfloat16(),
            "flags": torch.tensor([True, False, True]),
            "mid": torch.randn(70_000, generator=g),  # 280 KB: read into memory of its own
            "empty": torch.empty(0, 4),
        },
        "optimizer_states": [{"state": {0: {"step": torch.tensor(7), "exp_avg": torch.randn(650, generator=g)}}}],
        "global_step": 7,
    }


def _tensors(tree: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(tree, torch.Tensor):
        yield prefix, tree
    elif isinstance(tree, dict):
        for key, value in tree.items():
            yield from _tensors(value, f"{prefix}/{key}")
    elif isinstance(tree, (list, tuple)):
        for index, value in enumerate(tree):
            yield from _tensors(value, f"{prefix}/{index}")


# -- 3.2: every loaded tensor has memory of its own ---------------------------------------------------------


def _assert_own_memory(state: dict[str, Any], loaded: dict[str, Any]) -> None:
    for key, tensor in _tensors(loaded):
        assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size(), key
    again = _torch_round_trip(loaded)  # mixed dtypes: refused while they were views of one shard
    for (key, a), (_, b) in zip(_tensors(state), _tensors(again), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), key
    for name in ("big.bias", "big.weight"):  # saving one loaded tensor writes its bytes, not the whole shard
        assert _saved_size(loaded["state_dict"][name]) == _saved_size(state["state_dict"][name].clone())


def test_loaded_tensors_own_their_memory_so_saving_them_is_like_saving_fresh_tensors(tmp_path: Path) -> None:
    state = _mixed_state()
    path = tmp_path / "ep0-ba7"
    ShardedCheckpointIO().save_checkpoint(state, path)
    loaded = read_checkpoint(str(path))
    _assert_own_memory(state, loaded)
    _assert_own_memory(state, ShardedCheckpointIO(verify_checksums=False).load_checkpoint(path))

    loaded["state_dict"]["big.weight"].zero_()  # changes neither the checkpoint nor another load
    loaded["state_dict"]["big.bias"].zero_()
    again = read_checkpoint(str(path))  # every checksum verified: the files are unchanged
    assert torch.equal(again["state_dict"]["big.weight"], state["state_dict"]["big.weight"])
    assert torch.equal(again["state_dict"]["big.bias"], state["state_dict"]["big.bias"])

    entry = _manifest(path).tensors["state_dict/big.weight"]
    with open(path / SHARD, "r+b") as shard:  # one flipped bit inside the large tensor is still caught
        shard.seek(entry.offset + entry.nbytes // 2)
        byte = shard.read(1)[0]
        shard.seek(entry.offset + entry.nbytes // 2)
        shard.write(bytes([byte ^ 0x01]))
    with pytest.raises(CorruptCheckpointError, match=rf"{SHARD}: checksum crc32:[0-9a-f]+, expected crc32:"):
        read_checkpoint(str(path))


def test_tensors_loaded_from_an_object_store_own_their_memory(tmp_path: Path) -> None:
    state = _mixed_state()
    path = f"memory://fidelity-{tmp_path.name}/ep0-ba7"
    ShardedCheckpointIO().save_checkpoint(state, path)
    _assert_own_memory(state, read_checkpoint(path))


# -- 3.4: a callable map_location is called as torch.load calls it ------------------------------------------


def test_callable_map_location_gets_each_tensors_own_storage_and_saved_location(tmp_path: Path) -> None:
    state = _mixed_state()
    ShardedCheckpointIO().save_checkpoint(state, tmp_path / "c")

    def calls_of(load: Any) -> list[tuple[int, str]]:
        seen: list[tuple[int, str]] = []

        def record(storage: torch.UntypedStorage, location: str) -> torch.UntypedStorage:
            seen.append((storage.nbytes(), location))
            return storage

        load(record)
        return sorted(seen)

    ours = calls_of(lambda f: ShardedCheckpointIO().load_checkpoint(tmp_path / "c", map_location=f))
    theirs = calls_of(lambda f: _torch_round_trip(state, map_location=f, weights_only=True))
    assert ours == theirs and len(ours) == len(list(_tensors(state)))  # once per tensor, its own bytes


def test_callable_map_location_gets_the_location_recorded_at_save_and_places_tensors_on_its_storage(
    tmp_path: Path,
) -> None:
    ShardedCheckpointIO().save_checkpoint({"w": torch.arange(4.0), "b": torch.ones(2)}, tmp_path / "c")
    manifest_path = tmp_path / "c" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for tensor in manifest["tensors"]:  # as a save from a GPU records it (the manifest's "device" field)
        if tensor["key"] == "w":
            tensor["device"] = "cuda:0"
    manifest_path.write_text(json.dumps(manifest))
    placed: dict[str, torch.UntypedStorage] = {}

    def to_host(storage: torch.UntypedStorage, location: str) -> torch.UntypedStorage | None:
        if location != "cuda:0":
            return None  # as torch.load: None keeps the default placement (here, the CPU)
        placed[location] = storage.clone()
        return placed[location]

    loaded = ShardedCheckpointIO().load_checkpoint(tmp_path / "c", map_location=to_host)
    assert torch.equal(loaded["w"], torch.arange(4.0)) and torch.equal(loaded["b"], torch.ones(2))
    assert loaded["w"].untyped_storage().data_ptr() == placed["cuda:0"].data_ptr()
    assert ShardedCheckpointIO().load_checkpoint(tmp_path / "c", map_location={"cuda:0": "cpu"})["w"].device.type == (
        "cpu"
    )
    with pytest.raises(TypeError, match=r"map_location=.*It returned int for a tensor saved on 'cpu'"):
        ShardedCheckpointIO().load_checkpoint(tmp_path / "c", map_location=lambda storage, location: 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU to save a tensor from one")
def test_callable_map_location_sees_the_gpu_a_tensor_was_saved_from(tmp_path: Path) -> None:
    state = {"w": torch.arange(4.0, device="cuda:0"), "b": torch.ones(2)}
    ShardedCheckpointIO().save_checkpoint(state, tmp_path / "c")
    seen: list[tuple[int, str, str]] = []

    def record(storage: torch.UntypedStorage, location: str) -> torch.UntypedStorage:
        seen.append((storage.nbytes(), location, storage.device.type))
        return storage.cuda() if location.startswith("cuda") else storage

    loaded = ShardedCheckpointIO().load_checkpoint(tmp_path / "c", map_location=record)
    assert sorted(seen) == [(8, "cpu", "cpu"), (16, "cuda:0", "cpu")]
    assert loaded["w"].device == torch.device("cuda:0") and torch.equal(loaded["w"].cpu(), torch.arange(4.0))


# -- 3.5: tied weights are written once and load tied --------------------------------------------------------


class TiedLanguageModel(L.LightningModule):
    """A tiny next-token model whose output layer shares its weight with the embedding (weight tying)."""

    def __init__(self, vocab: int = 64, width: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(vocab, width)
        self.norm = torch.nn.LayerNorm(width)
        self.out = torch.nn.Linear(width, vocab, bias=False)
        self.out.weight = self.embed.weight

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        tokens, targets = batch
        return torch.nn.functional.cross_entropy(self.out(self.norm(self.embed(tokens))), targets)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)

    def train_dataloader(self) -> DataLoader[Any]:
        tokens = torch.randint(0, 64, (32,), generator=torch.Generator().manual_seed(1))
        return DataLoader(TensorDataset(tokens, (tokens + 1) % 64), batch_size=8)


def test_tied_weights_are_written_once_and_resume_tied(tmp_path: Path) -> None:
    model = TiedLanguageModel()
    options: dict[str, Any] = {"max_epochs": 1, "limit_val_batches": 0, "enable_checkpointing": False}
    trainer = build_trainer(str(tmp_path / "run"), plugins=[ShardedCheckpointIO()], **options)
    trainer.fit(model)
    trainer.save_checkpoint(tmp_path / "tied")

    manifest = _manifest(tmp_path / "tied")
    assert "state_dict/embed.weight" in manifest.tensors and "state_dict/out.weight" not in manifest.tensors
    weight_bytes = model.embed.weight.numel() * 4
    assert sum(t.nbytes for t in manifest.tensors.values() if t.key.startswith("state_dict/")) == weight_bytes + 2 * 64
    loaded = read_checkpoint(str(tmp_path / "tied"))["state_dict"]
    expected = _torch_round_trip(model.state_dict())
    assert expected["out.weight"].data_ptr() == expected["embed.weight"].data_ptr()  # what torch.load gives
    assert loaded["out.weight"].data_ptr() == loaded["embed.weight"].data_ptr()
    assert torch.equal(loaded["out.weight"], model.embed.weight.detach())

    resumed = TiedLanguageModel()
    resuming = build_trainer(str(tmp_path / "resumed"), plugins=[ShardedCheckpointIO()], **options)
    resuming.fit(resumed, ckpt_path=str(tmp_path / "tied"))
    assert resumed.out.weight is resumed.embed.weight
    assert torch.equal(resumed.embed.weight, model.embed.weight)


def test_different_views_of_one_memory_are_not_mistaken_for_ties(tmp_path: Path) -> None:
    base = torch.arange(12.0)
    state = {"whole": base, "head": base[:4], "as_matrix": base.view(3, 4), "same": base.detach(), "empty": base[:0]}
    ShardedCheckpointIO().save_checkpoint(state, tmp_path / "c")
    loaded = read_checkpoint(str(tmp_path / "c"))
    for key, value in state.items():
        assert torch.equal(loaded[key], value) and loaded[key].shape == value.shape, key
    assert loaded["same"].data_ptr() == loaded["whole"].data_ptr()  # one view of one memory: a tie
    assert sorted(_manifest(tmp_path / "c").tensors) == ["as_matrix", "empty", "head", "whole"]


# -- 3.9: strided nested tensors ----------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
def test_strided_nested_tensors_round_trip(tmp_path: Path) -> None:
    nested = torch.nested.nested_tensor([torch.arange(3.0), torch.arange(5.0)], layout=torch.strided)
    ShardedCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(2)}, "ragged": nested}, tmp_path / "c")
    loaded = ShardedCheckpointIO().load_checkpoint(tmp_path / "c")
    assert loaded["ragged"].is_nested and loaded["ragged"].layout == torch.strided
    assert [t.tolist() for t in loaded["ragged"].unbind()] == [[0.0, 1.0, 2.0], [0.0, 1.0, 2.0, 3.0, 4.0]]


# -- 3.14: Parameter type, requires_grad, defaultdict factories, data shaped like a marker ----------------


def test_parameters_and_requires_grad_come_back_as_torch_load_gives_them(tmp_path: Path) -> None:
    trainable = torch.nn.Parameter(torch.ones(3))
    state = {
        "trainable": trainable,
        "frozen": torch.nn.Parameter(torch.zeros(2), requires_grad=False),
        "grad_tensor": torch.full((2,), 5.0, requires_grad=True),
        "same_parameter_twice": trainable,
        "plain_view_of_it": trainable.detach(),
        "plain": torch.ones(2),
    }
    ShardedCheckpointIO().save_checkpoint(state, tmp_path / "c")
    ours = ShardedCheckpointIO().load_checkpoint(tmp_path / "c")
    theirs = _torch_round_trip(state, weights_only=True)
    for key in state:
        assert type(ours[key]) is type(theirs[key]), key
        assert ours[key].requires_grad == theirs[key].requires_grad, key
        assert torch.equal(ours[key].detach(), theirs[key].detach()), key
    assert ours["same_parameter_twice"] is ours["trainable"]  # one object saved twice, as pickle gives
    assert ours["plain_view_of_it"].data_ptr() == ours["trainable"].data_ptr()


def test_defaultdict_keeps_its_factory(tmp_path: Path) -> None:
    counts: collections.defaultdict[str, list[torch.Tensor]] = collections.defaultdict(list)
    counts["seen"].append(torch.ones(2))
    state = {"callbacks": {"Counter": counts}, "ordered": collections.OrderedDict(b=torch.zeros(1), a=1)}
    ShardedCheckpointIO().save_checkpoint(state, tmp_path / "c")
    loaded = ShardedCheckpointIO().load_checkpoint(tmp_path / "c", weights_only=False)
    theirs = _torch_round_trip(state, weights_only=False)
    assert loaded["callbacks"]["Counter"].default_factory is theirs["callbacks"]["Counter"].default_factory is list
    assert torch.equal(loaded["callbacks"]["Counter"]["seen"][0], torch.ones(2))
    loaded["callbacks"]["Counter"]["new"].append(1)  # the factory works
    assert type(loaded["ordered"]) is collections.OrderedDict and list(loaded["ordered"]) == ["b", "a"]


def test_user_data_shaped_like_the_internal_markers_round_trips(tmp_path: Path) -> None:
    state = {
        "state_dict": {"w": torch.ones(2)},
        "notes": {"__lightning_ckpt_tensor__": "state_dict/w"},
        "attrs": {"__lightning_ckpt_tensor__": "x", "__lightning_ckpt_tensor_attrs__": {"parameter": True}},
        "escaped": {"__lightning_ckpt_escaped__": {"__lightning_ckpt_tensor__": "y"}},
        "ordered": collections.OrderedDict(__lightning_ckpt_tensor__="z"),
        "with_tensor": {"__lightning_ckpt_tensor__": torch.arange(3)},
    }
    ShardedCheckpointIO().save_checkpoint(state, tmp_path / "c")
    loaded = ShardedCheckpointIO().load_checkpoint(tmp_path / "c")
    for key in ("notes", "attrs", "escaped"):
        assert loaded[key] == state[key], key
    assert type(loaded["ordered"]) is collections.OrderedDict and loaded["ordered"] == state["ordered"]
    assert torch.equal(loaded["with_tensor"]["__lightning_ckpt_tensor__"], torch.arange(3))
