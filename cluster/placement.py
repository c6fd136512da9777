"""Which shard actor owns what: one pure function of the config, used by everyone."""

from __future__ import annotations

from dataclasses import dataclass

from cluster.config import Settings


@dataclass(frozen=True, slots=True)
class ShardSpec:
    """One shard actor: it holds the book of ``asset`` for positions ``id % split_count == split``.

    ``book_tag`` (0..255) is unique across the layout and is encoded into every position id the
    shard's book issues, so ids never collide between shards.
    """

    name: str
    asset: str
    split: int
    split_count: int
    book_tag: int


def shard_layout(settings: Settings) -> tuple[ShardSpec, ...]:
    """Every shard actor of the platform, in a stable order (asset registry order, then split)."""
    specs: list[ShardSpec] = []
    for asset in settings.assets.assets:
        count = settings.shards_of(asset.name)
        for split in range(count):
            specs.append(ShardSpec(f"shard-{asset.name}-{split}", asset.name, split, count,
                                   book_tag=len(specs)))
    if len(specs) > 256:
        raise ValueError("at most 256 shard actors are supported")
    return tuple(specs)


def shards_for_asset(settings: Settings, asset: str) -> tuple[ShardSpec, ...]:
    """The shards that receive ``asset``'s ticks (all its splits)."""
    return tuple(s for s in shard_layout(settings) if s.asset == asset)


def shard_for_new_position(settings: Settings, asset: str, key: int) -> ShardSpec:
    """The split of ``asset`` that takes a new position; ``key`` spreads opens (e.g. a counter)."""
    splits = shards_for_asset(settings, asset)
    return splits[key % len(splits)]


def shard_for_book_tag(settings: Settings, book_tag: int) -> ShardSpec:
    """The shard that issued a position id carrying ``book_tag``."""
    return shard_layout(settings)[book_tag]
