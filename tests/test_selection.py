"""How the suite is cut into shares that run at once (tests/selection.py)."""

from __future__ import annotations

import random

from selection import cut_shares


def test_every_test_in_exactly_one_share_and_the_shares_take_the_same_time() -> None:
    rng = random.Random(7)
    durations = {f"t{i}": rng.choice([0.01, 0.2, 1.0, 5.0]) for i in range(200)}
    durations["slow"] = 15.0
    shares = cut_shares(list(durations), 4, durations)
    assert sorted(shares) == sorted(durations) and set(shares.values()) == {0, 1, 2, 3}
    loads = [sum(durations[t] for t, k in shares.items() if k == share) for share in range(4)]
    assert max(loads) - min(loads) <= 1.0, loads  # no more than the second-longest test apart
    # the order the tests were collected in changes nothing: every run cuts the same shares
    assert cut_shares(sorted(durations, reverse=True), 4, durations) == shares


def test_tests_not_timed_yet_count_as_the_median_one() -> None:
    durations = {"a": 1.0, "b": 1.0, "c": 1.0, "long": 9.0}
    shares = cut_shares(["long", "a", "b", "c", "new1", "new2", "new3"], 2, durations)
    assert shares["long"] == 0  # the longest first, alone on its share ...
    assert [k for t, k in shares.items() if t != "long"] == [1] * 6  # ... 6 x 1 s beside it
    # without any durations the shares hold equal counts
    counts = sorted(cut_shares([f"t{i}" for i in range(9)], 3, {}).values())
    assert counts == [0, 0, 0, 1, 1, 1, 2, 2, 2]
