"""Hypothesis strategies and cases shared by the feed tests."""

from __future__ import annotations

from hypothesis import strategies as st


def json_values(text_size: int, key_size: int, leaves: int) -> st.SearchStrategy[object]:
    """Any JSON value: null, booleans, numbers and strings of up to ``text_size`` characters,
    nested in lists and objects (keys of up to ``key_size`` characters), ``leaves`` at most."""
    return st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=text_size),
        lambda children: st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=key_size), children, max_size=4),
        max_leaves=leaves)


INVALID_PRICE_TEXTS = ("0", "0.00", "-1.00", "-98.97", "NaN", "Infinity", "abc", "", "98.975",
                       "98.961", "1e30")
"""Bid or ask texts that no SOL_USDC price is (not positive, not a decimal, off the 0.01 step,
beyond any amount): both a Backpack frame and a MarketDataMessage carrying one are dropped as
``bad_price``."""
