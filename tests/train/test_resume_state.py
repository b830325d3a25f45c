"""A saved resume state is read like any file from a stranger: every field is checked for type and range (issue 33
item 10: `consumed` of 10**30 was accepted and the epoch then yielded nothing; a damaged state raised AttributeError
or KeyError)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from latentcache.errors import ConfigError
from latentcache.train.dataset import LatentShardDataset
from latentcache.train.resume import StatefulLoader


def _saved(encoded_dir: Path, items: int = 1) -> dict:
    dataset = LatentShardDataset(encoded_dir, seed=5)
    for i, _ in enumerate(dataset):
        if i + 1 == items:
            break
    return json.loads(json.dumps(dataset.state_dict()))


def test_a_count_past_the_epoch_is_refused(encoded_dir: Path) -> None:
    state = _saved(encoded_dir)
    state["consumed"] = {"0": 10**30}
    for target in (LatentShardDataset(encoded_dir, seed=5), StatefulLoader(LatentShardDataset(encoded_dir, seed=5))):
        with pytest.raises(ConfigError, match="consumed"):
            target.load_state_dict(state)
    # 9 items from a slot that holds 8: past the end, refused too; 8 (the whole epoch seen) is a real position
    state["consumed"] = {"0": 9}
    with pytest.raises(ConfigError, match="slot 0 delivered 9 items, yet it holds at most 8"):
        LatentShardDataset(encoded_dir, seed=5).load_state_dict(state)
    state["consumed"] = {"0": 8}
    dataset = LatentShardDataset(encoded_dir, seed=5)
    dataset.load_state_dict(state)
    assert list(dataset) == []


def test_the_bound_follows_the_slot_split_and_epoch_items(encoded_dir: Path) -> None:
    """2 slots over 4 shards of 2: each slot holds 4 samples; with epoch_items=3, 3 items."""
    state = _saved(encoded_dir)
    state.update(slots=2, consumed={"1": 5})
    with pytest.raises(ConfigError, match="at most 4"):
        LatentShardDataset(encoded_dir, seed=5).load_state_dict(state)
    state = json.loads(json.dumps(LatentShardDataset(encoded_dir, seed=5, epoch_items=3).state_dict()))
    state.update(consumed={"0": 4})
    with pytest.raises(ConfigError, match="at most 3"):
        LatentShardDataset(encoded_dir, seed=5, epoch_items=3).load_state_dict(state)


@pytest.mark.parametrize(("change", "named"), [
    ({"consumed": [3]}, "consumed is a list"),
    ({"consumed": {"zero": 1}}, "consumed slot"),
    ({"consumed": {"0": "3"}}, r"consumed\['0'\]"),
    ({"consumed": {"0": 1.5}}, r"consumed\['0'\]"),
    ({"consumed": {"0": -1}}, r"consumed\['0'\]"),
    ({"consumed": {"0": True}}, r"consumed\['0'\]"),
    ({"consumed": {"7": 1}}, "consumed slot"),  # slot 7 of 1
    ({"epoch": "0"}, "epoch"),
    ({"epoch": None}, "epoch"),
    ({"epoch": 2**64}, "epoch"),
    ({"slots": 0}, "slots"),
    ({"slots": [1]}, "slots"),
    ({"next_worker": 5}, "next_worker"),
    ({"next_worker": "x"}, "next_worker"),
])
def test_a_damaged_field_is_named(encoded_dir: Path, change: dict, named: str) -> None:
    state = {**_saved(encoded_dir), **change}
    for target in (LatentShardDataset(encoded_dir, seed=5), StatefulLoader(LatentShardDataset(encoded_dir, seed=5))):
        with pytest.raises(ConfigError, match=named):
            target.load_state_dict(state)


@pytest.mark.parametrize("state", [None, [], "state", 3])
def test_a_state_that_is_no_dict(encoded_dir: Path, state) -> None:
    with pytest.raises(ConfigError, match="resume state is a"):
        LatentShardDataset(encoded_dir).load_state_dict(state)


@pytest.mark.parametrize("missing", ["epoch", "consumed"])
def test_a_missing_field_is_named(encoded_dir: Path, missing: str) -> None:
    state = _saved(encoded_dir)
    del state[missing]
    with pytest.raises(ConfigError, match=f"no {missing}"):
        LatentShardDataset(encoded_dir, seed=5).load_state_dict(state)
