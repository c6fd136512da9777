"""Which shard owns what: one pure function of the config, used by everyone."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from cluster.config import Settings
from engine.position_ids import book_tag_of, is_position_id


@dataclass(frozen=True, slots=True)
class ShardSpec:
    """One shard: it holds the book of ``asset`` for the positions opened on split ``split``.

    ``book_tag`` (0..255) is unique across the layout and is encoded into every position id the
    shard's book issues, so ids never collide between shards and name their shard.
    """

    name: str
    asset: str
    split: int
    split_count: int
    book_tag: int


def shard_name(asset: str, split: int) -> str:
    """The name of ``asset``'s shard ``split`` (its actor's, and its directory's in DATA_DIR)."""
    return f"shard-{asset}-{split}"


def split_of_name(name: str) -> tuple[str, int] | None:
    """``(asset, split)`` of a name :func:`shard_name` makes; None for any other."""
    match = re.fullmatch(r"shard-([A-Za-z0-9]+)-([0-9]+)", name)
    return None if match is None else (match[1], int(match[2]))


def shard_layout(settings: Settings) -> tuple[ShardSpec, ...]:
    """Every shard of the platform, in a stable order (asset registry order, then split)."""
    specs: list[ShardSpec] = []
    for asset in settings.assets.assets:
        count = settings.shards_of(asset.name)
        for split in range(count):
            specs.append(ShardSpec(shard_name(asset.name, split), asset.name, split, count,
                                   book_tag=len(specs)))
    if len(specs) > 256:
        raise ValueError("at most 256 shards are supported")
    return tuple(specs)


class Layout:
    """The shard layout with its lookups: by asset, by position id, for a new position."""

    def __init__(self, settings: Settings) -> None:
        self.shards = shard_layout(settings)
        self.names = tuple(s.name for s in self.shards)
        self._by_tag = {s.book_tag: s for s in self.shards}
        self._splits = {a.name: tuple(s for s in self.shards if s.asset == a.name)
                        for a in settings.assets.assets}

    def of_asset(self, asset: str) -> tuple[ShardSpec, ...]:
        """The shards that hold ``asset`` (all its splits; every one receives its ticks)."""
        return self._splits.get(asset, ())

    def for_new_position(self, asset: str, key: int,
                         down: Callable[[str], bool] = lambda name: False) -> ShardSpec:
        """The split of ``asset`` that takes a new position; ``key`` spreads opens over its
        splits that are not ``down`` (by name), or over all of them when every one is."""
        splits = self._splits[asset]
        up = [s for s in splits if not down(s.name)] or splits
        return up[key % len(up)]

    def of_position(self, position_id: object) -> ShardSpec | None:
        """The shard that issued ``position_id`` (None for anything that is not one)."""
        if not is_position_id(position_id):
            return None
        assert isinstance(position_id, int)
        return self._by_tag.get(book_tag_of(position_id))
