"""Eviction policies on hand-made access sequences with known hit counts, plus Belady's optimality."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_local.cache import POLICIES, make_policy
from moe_local.errors import MoeLocalError

ONLINE = [p for p in POLICIES if p != "belady"]


def run(name: str, seq: list, capacity: int) -> tuple[int, list]:
    """Demand-only cache of `capacity` slots; the key being loaded is pinned. Returns (hits, evicted)."""
    policy = make_policy(name, capacity, future=seq if name == "belady" else None)
    resident: set = set()
    hits, evicted = 0, []
    for key in seq:
        hit = key in resident
        hits += hit
        policy.on_access(key, hit)
        if not hit:
            if len(resident) >= capacity:
                victim = policy.victim(resident, {key})
                assert victim in resident and victim != key
                resident.remove(victim)
                policy.on_remove(victim)
                evicted.append(victim)
            resident.add(key)
            policy.on_insert(key)
    return hits, evicted


# Silberschatz, Operating System Concepts: the reference string with 3 frames has 12 LRU faults and 9 OPT faults.
TEXTBOOK = [7, 0, 1, 2, 0, 3, 0, 4, 2, 3, 0, 3, 2, 1, 2, 0, 1, 7, 0, 1]


def test_textbook_lru_and_belady_fault_counts():
    assert len(TEXTBOOK) - run("lru", TEXTBOOK, 3)[0] == 12
    assert len(TEXTBOOK) - run("belady", TEXTBOOK, 3)[0] == 9


def test_lru_evicts_least_recent():
    hits, evicted = run("lru", ["A", "A", "A", "B", "C", "A"], 2)
    assert (hits, evicted) == (2, ["A", "B"])  # C evicts A (older than B), then A evicts B


@pytest.mark.parametrize("name", ["lfu-aging", "arc", "belady"])
def test_frequency_keeps_the_hot_key(name):
    # A is used three times; C must evict the once-used B, so the final A hits.
    hits, evicted = run(name, ["A", "A", "A", "B", "C", "A"], 2)
    assert (hits, evicted) == (3, ["B"])


def test_lfu_aging_halves_counts():
    policy = make_policy("lfu-aging", 2)
    policy.period = 4
    for key in ["A", "A", "A"]:
        policy.on_access(key, key == "A")
    policy.on_insert("A")
    policy.on_access("B", False)  # 4th access: every count halves -> A 1, B 0 (then B is counted before halving)
    policy.on_insert("B")
    assert policy.victim({"A", "B"}, set()) == "B"  # B (0) ranks below A (1), though B is more recent
    policy.on_access("B", True)  # B 1 = A 1: the tie goes to the less recent, A -- so A is 1, not 3
    assert policy.victim({"A", "B"}, set()) == "A"


def test_arc_resists_a_scan():
    # hot keys seen twice live in T2; a one-pass scan of cold keys only cycles through T1
    seq = ["h1", "h2", "h1", "h2"] + [f"s{i}" for i in range(10)] + ["h1", "h2"]
    arc_hits, _ = run("arc", seq, 4)
    lru_hits, _ = run("lru", seq, 4)
    assert arc_hits == 4 and lru_hits == 2


@pytest.mark.parametrize("name", POLICIES)
def test_pinned_keys_are_never_evicted(name):
    keys = ["A", "B", "C"]
    policy = make_policy(name, 3, future=keys * 3)
    for k in keys:
        policy.on_access(k, False)
        policy.on_insert(k)
    first = policy.victim(set(keys), set())
    assert first in keys
    second = policy.victim(set(keys), {first})
    assert second in keys and second != first
    third = policy.victim(set(keys), {first, second})
    assert third in keys and third not in (first, second)
    assert policy.victim(set(keys), set(keys)) is None
    # victim() is pure: asking again gives the same answer
    assert policy.victim(set(keys), set()) == first


def test_prefetch_insert_without_access():
    lru = make_policy("lru", 3)
    for k in ["A", "B"]:
        lru.on_access(k, False)
        lru.on_insert(k)
    lru.on_insert("P")  # prefetched: counts as the most recent, not yet used
    assert lru.victim({"A", "B", "P"}, set()) == "A"

    lfu = make_policy("lfu-aging", 3)
    lfu.on_access("A", False)
    lfu.on_insert("A")
    lfu.on_access("A", True)
    lfu.on_access("B", False)
    lfu.on_insert("B")
    lfu.on_insert("P")  # no use yet: frequency 0, the first to go unless pinned
    assert lfu.victim({"A", "B", "P"}, set()) == "P"
    assert lfu.victim({"A", "B", "P"}, {"P"}) == "B"

    arc = make_policy("arc", 3)
    arc.on_access("A", False)
    arc.on_insert("A")
    arc.on_insert("P")
    arc.on_access("P", True)  # first real use of a prefetch: still "seen once" (T1), not frequent (T2)
    assert "P" in arc.t1 and "P" not in arc.t2
    arc.on_access("A", True)
    assert "A" in arc.t2

    bel = make_policy("belady", 2, future=["A", "B", "A"])
    bel.on_access("A", False)
    bel.on_insert("A")
    bel.on_insert("X")  # prefetched, never demanded: infinitely far
    assert bel.victim({"A", "X"}, set()) == "X"


def test_make_policy_errors():
    with pytest.raises(MoeLocalError, match="unknown cache policy 'fifo'"):
        make_policy("fifo", 4)
    with pytest.raises(MoeLocalError, match="needs the future"):
        make_policy("belady", 4)
    with pytest.raises(MoeLocalError, match="at least 1 slot"):
        make_policy("lru", 0)


@settings(max_examples=150, deadline=None)
@given(
    seq=st.lists(st.integers(0, 9), min_size=1, max_size=120),
    capacity=st.integers(1, 8),
)
def test_belady_is_optimal_on_random_sequences(seq, capacity):
    best, _ = run("belady", seq, capacity)
    for name in ONLINE:
        assert best >= run(name, seq, capacity)[0], name


@settings(max_examples=100, deadline=None)
@given(
    ops=st.lists(st.tuples(st.sampled_from(["access", "prefetch"]), st.integers(0, 11), st.integers(0, 2)),
                 min_size=1, max_size=150),
    capacity=st.integers(3, 8),
    name=st.sampled_from(ONLINE),
)
def test_policies_keep_the_contract_under_prefetch_and_pins(ops, capacity, name):
    """Whatever the mix of demand accesses and prefetch inserts, victim() names a resident,
    unpinned key, or None only when every resident key is pinned."""
    policy = make_policy(name, capacity)
    resident: set[int] = set()
    for op, key, n_pin in ops:
        pinned = set(sorted(resident)[:n_pin]) | {key}
        if op == "access":
            hit = key in resident
            policy.on_access(key, hit)
            if hit:
                continue
        elif key in resident:
            continue
        if len(resident) >= capacity:
            victim = policy.victim(resident, pinned)
            if victim is None:
                assert resident <= pinned
                continue
            assert victim in resident and victim not in pinned
            resident.remove(victim)
            policy.on_remove(victim)
        resident.add(key)
        policy.on_insert(key)
