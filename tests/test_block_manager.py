"""BlockManager: ref-counting, prefix caching, LRU eviction, fork copy-on-write.

The oracle is a fake KV store keyed by page id: every "computed" token writes its token id into
its slot, and after every operation each live sequence must read its own tokens back through its
page table. A page freed while still referenced, handed to two owners, or a prefix hit on the
wrong content all break that read-back.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import imp_jax.engine.block_manager as bm_mod
from imp_jax.engine import BlockManager, Sequence

# Shared prompt prefixes (lengths straddle page boundaries) so prefix hits actually happen.
PREFIXES = [[], [1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 9, 9], [5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5]]


class Harness:
    """Drives a BlockManager the way the engine does and checks it against a fake KV store."""

    def __init__(self, num_pages: int = 12, page_size: int = 4, prefix_caching: bool = True):
        self.bm = BlockManager(num_pages, page_size, enable_prefix_caching=prefix_caching)
        self.ps = page_size
        self.kv: dict[int, list[int | None]] = {}
        self.live: dict[str, Sequence] = {}
        self.n = 0
        self.ops = 0

    # ---- fake model
    def _compute(self, seq: Sequence, n: int) -> None:
        toks = seq.all_token_ids
        for pos in range(seq.num_computed_tokens, seq.num_computed_tokens + n):
            page = seq.page_ids[pos // self.ps]
            self.kv.setdefault(page, [None] * self.ps)[pos % self.ps] = toks[pos]
        seq.num_computed_tokens += n
        self.bm.commit_computed(seq)

    def read_back(self, seq: Sequence) -> None:
        toks = seq.all_token_ids
        for pos in range(seq.num_computed_tokens):
            page = seq.page_ids[pos // self.ps]
            got = self.kv.get(page, [None] * self.ps)[pos % self.ps]
            assert got == toks[pos], f"{seq.request_id} pos {pos} page {page}: {got} != {toks[pos]}"

    def _pick(self, idx: int) -> Sequence | None:
        if not self.live:
            return None
        return list(self.live.values())[idx % len(self.live)]

    # ---- operations
    def admit(self, prefix_id: int, suffix: list[int], frac: float) -> None:
        self.ops += 1
        seq = Sequence(f"s{self.n}", PREFIXES[prefix_id] + suffix)
        self.n += 1
        cached = self.bm.match_prefix(seq)
        assert cached % self.ps == 0 and 0 <= cached < seq.num_tokens
        assert seq.num_computed_tokens == cached == len(seq.page_ids) * self.ps
        self.read_back(seq)  # a hit must hold exactly this prompt's tokens
        n = max(1, round(seq.num_uncomputed_tokens * frac))
        if self.bm.can_allocate(seq, n):
            self.bm.allocate(seq, n)
            self._compute(seq, n)
            self.live[seq.request_id] = seq
        else:
            self.bm.free(seq)  # back out of the admission

    def step(self, idx: int, frac: float, token: int) -> None:
        self.ops += 1
        seq = self._pick(idx)
        if seq is None:
            return
        if seq.num_uncomputed_tokens == 0:
            seq.output_token_ids.append(token)  # "sampled" a token: next step decodes it
        n = max(1, round(seq.num_uncomputed_tokens * frac))
        if self.bm.can_allocate(seq, n):
            self.bm.allocate(seq, n)
            self._compute(seq, n)

    def fork(self, idx: int, token: int) -> None:
        self.ops += 1
        parent = self._pick(idx)
        if parent is None:
            return
        child = parent.fork(f"s{self.n}")
        self.n += 1
        if child.num_tokens <= parent.num_computed_tokens:
            child.output_token_ids.append(token)
        if not self.bm.can_fork(parent):
            return
        copy = self.bm.fork(parent, child)
        if parent.num_computed_tokens % self.ps:
            assert copy is not None and copy[0] == parent.page_ids[len(child.page_ids) - 1]
            src, dst = copy
            assert dst not in parent.page_ids and self.bm.refcount(dst) == 1
            self.kv[dst] = list(self.kv[src])  # the engine's KV page copy
        else:
            assert copy is None
        self.live[child.request_id] = child

    def free(self, idx: int) -> None:
        self.ops += 1
        seq = self._pick(idx)
        if seq is None:
            return
        del self.live[seq.request_id]
        self.bm.free(seq)
        assert seq.page_ids == [] and seq.num_computed_tokens == 0

    def check(self) -> None:
        seqs = list(self.live.values())
        self.bm.check_invariants(seqs)
        bm = self.bm
        assert bm.num_free_pages + bm.num_used_pages == bm.num_usable_pages
        for seq in seqs:
            self.read_back(seq)

    def drain(self) -> None:
        for seq in list(self.live.values()):
            self.bm.free(seq)
        self.live.clear()
        self.bm.check_invariants([])
        assert self.bm.num_free_pages == self.bm.num_usable_pages
        assert self.bm.num_used_pages == 0 and self.bm.usage == 0.0


# ------------------------------------------------------------------ randomized


@pytest.mark.parametrize("prefix_caching", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_ops(seed: int, prefix_caching: bool) -> None:
    rng = random.Random(seed)
    h = Harness(num_pages=rng.choice([6, 12, 24]), page_size=rng.choice([1, 2, 4]), prefix_caching=prefix_caching)
    for _ in range(4000):
        r = rng.random()
        if r < 0.25:
            h.admit(rng.randrange(len(PREFIXES)), [rng.randrange(4) for _ in range(rng.randint(1, 8))], rng.random())
        elif r < 0.75:
            h.step(rng.randrange(1000), rng.random(), rng.randrange(4))
        elif r < 0.83:
            h.fork(rng.randrange(1000), rng.randrange(4))
        else:
            h.free(rng.randrange(1000))
        h.check()
    if prefix_caching:
        assert h.bm.prefix_cache_hits > 0 and h.bm.num_evictions > 0
    else:
        assert h.bm.prefix_cache_queries == 0 and h.bm.num_cached_free_pages == 0
    h.drain()


class BlockManagerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.h = Harness(num_pages=10, page_size=2)

    @rule(
        prefix_id=st.integers(0, len(PREFIXES) - 1),
        suffix=st.lists(st.integers(0, 3), min_size=1, max_size=8),
        frac=st.floats(0, 1),
    )
    def admit(self, prefix_id, suffix, frac):
        self.h.admit(prefix_id, suffix, frac)

    @precondition(lambda self: self.h.live)
    @rule(idx=st.integers(0, 100), frac=st.floats(0, 1), token=st.integers(0, 3))
    def step(self, idx, frac, token):
        self.h.step(idx, frac, token)

    @precondition(lambda self: self.h.live)
    @rule(idx=st.integers(0, 100), token=st.integers(0, 3))
    def fork(self, idx, token):
        self.h.fork(idx, token)

    @precondition(lambda self: self.h.live)
    @rule(idx=st.integers(0, 100))
    def free(self, idx):
        self.h.free(idx)

    @rule()
    def reset_cache(self):
        self.h.bm.reset_prefix_cache()
        assert self.h.bm.num_cached_free_pages == 0

    @invariant()
    def consistent(self):
        self.h.check()

    def teardown(self):
        self.h.drain()


TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerMachine.settings = settings(
    max_examples=40, stateful_step_count=60, deadline=None, suppress_health_check=list(HealthCheck)
)


# ------------------------------------------------------------------ deterministic


def _run_prompt(bm: BlockManager, rid: str, tokens: list[int]) -> Sequence:
    """Admit, fully prefill and commit a prompt."""
    seq = Sequence(rid, tokens)
    bm.match_prefix(seq)
    bm.allocate(seq, seq.num_uncomputed_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.commit_computed(seq)
    return seq


def test_page_zero_reserved_and_exhaustion() -> None:
    bm = BlockManager(num_pages=4, page_size=2)
    seq = Sequence("a", [1, 2, 3, 4, 5, 6])
    assert bm.can_allocate(seq, 6) and not bm.can_allocate(seq, 7)
    assert bm.allocate(seq, 6) == [1, 2, 3]
    with pytest.raises(RuntimeError):
        bm.allocate(Sequence("b", [1]), 1)
    assert bm.allocate(seq, 6) == []  # already covered: no growth
    bm.free(seq)
    bm.check_invariants([])
    with pytest.raises(ValueError):
        BlockManager(num_pages=1, page_size=2)


def test_identical_prefix_gets_identical_pages() -> None:
    bm = BlockManager(num_pages=16, page_size=4)
    a = _run_prompt(bm, "a", list(range(10)))  # pages: [0..3] [4..7] [8,9]
    assert len(a.block_hashes) == 2  # only full pages are registered
    b = Sequence("b", list(range(10)) + [77])
    assert bm.match_prefix(b) == 8
    assert b.page_ids == a.page_ids[:2]
    assert [bm.refcount(p) for p in a.page_ids] == [2, 2, 1]
    assert bm.prefix_cache_hits == 8 and bm.prefix_cache_queries == 10 + 11
    bm.check_invariants([a, b])
    # Still hits after both owners are gone (pages stay cached).
    a_pages = list(a.page_ids)
    bm.free(a)
    bm.free(b)
    assert bm.num_cached_free_pages == 2
    c = Sequence("c", list(range(9)))
    assert bm.match_prefix(c) == 8 and c.page_ids == a_pages[:2]
    bm.free(c)
    bm.check_invariants([])


def test_commit_up_to_a_token_count_registers_only_the_pages_full_by_then() -> None:
    # A decode block's pages are committed in the order of the steps that filled them, after
    # its computed count has moved past them all.
    bm = BlockManager(num_pages=16, page_size=4)
    a = Sequence("a", list(range(13)))
    bm.allocate(a, 13)
    a.num_computed_tokens = 13
    bm.commit_computed(a, 7)
    assert len(a.block_hashes) == 1 and bm.is_cached(a.page_ids[0])
    assert not bm.is_cached(a.page_ids[1])
    bm.commit_computed(a, 8)
    assert len(a.block_hashes) == 2 and bm.is_cached(a.page_ids[1])
    bm.commit_computed(a)  # the default: every computed token
    assert len(a.block_hashes) == 3
    # the same hashes as committing everything at once
    assert a.block_hashes == _run_prompt(BlockManager(16, 4), "b", list(range(13))).block_hashes
    bm.check_invariants([a])


def test_never_matches_whole_prompt() -> None:
    bm = BlockManager(num_pages=16, page_size=4)
    a = _run_prompt(bm, "a", list(range(8)))
    assert len(a.block_hashes) == 2
    same = Sequence("b", list(range(8)))
    assert bm.match_prefix(same) == 4  # the last token must still be computed for logits
    one_page = Sequence("c", list(range(4)))
    assert bm.match_prefix(one_page) == 0
    bm.check_invariants([a, same, one_page])


def test_different_prefix_never_hits() -> None:
    bm = BlockManager(num_pages=16, page_size=2)
    _run_prompt(bm, "a", [1, 2, 3, 4, 5])
    # Same second page, different first page: the chain hash differs, so no hit at all.
    b = Sequence("b", [9, 9, 3, 4, 5])
    assert bm.match_prefix(b) == 0 and b.page_ids == []
    # Same first page only.
    c = Sequence("c", [1, 2, 4, 3, 5])
    assert bm.match_prefix(c) == 2


def test_hash_collision_is_not_a_hit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bm_mod, "hash", lambda key: 42, raising=False)  # every key collides
    bm = BlockManager(num_pages=16, page_size=2)
    a = _run_prompt(bm, "a", [1, 2, 3])
    b = Sequence("b", [7, 8, 9])
    assert bm.match_prefix(b) == 0
    c = Sequence("c", [1, 2, 3])
    assert bm.match_prefix(c) == 2 and c.page_ids == a.page_ids[:1]
    bm.check_invariants([a, b, c])


def test_lru_eviction_order() -> None:
    bm = BlockManager(num_pages=8, page_size=2)  # 7 usable pages
    a = _run_prompt(bm, "a", [1, 2, 3, 4, 5])  # pages 1, 2 full; 3 partial
    b = _run_prompt(bm, "b", [6, 7, 8, 9, 10])  # pages 4, 5 full; 6 partial
    a_pages, b_pages = list(a.page_ids), list(b.page_ids)
    bm.free(a)
    bm.free(b)
    # Released tail-first: LRU order is a's 2nd, a's 1st, b's 2nd, b's 1st.
    assert list(bm._evictable) == [a_pages[1], a_pages[0], b_pages[1], b_pages[0]]
    assert bm.num_free_pages == 7 and bm.num_cached_free_pages == 4
    # Plain free pages (the two partial pages + page 7) go before any cached page.
    filler = Sequence("f", [0] * 6)
    bm.allocate(filler, 6)
    assert bm.num_evictions == 0 and sorted(filler.page_ids) == sorted([a_pages[2], b_pages[2], 7])
    # Touch a's prefix: re-attached then released, it becomes most recently used.
    a2 = Sequence("a2", [1, 2, 3, 4, 5])
    assert bm.match_prefix(a2) == 4
    bm.free(a2)
    assert list(bm._evictable) == [b_pages[1], b_pages[0], a_pages[1], a_pages[0]]
    # Next allocation evicts b's tail page first.
    g = Sequence("g", [0, 0])
    assert bm.allocate(g, 2) == [b_pages[1]] and bm.num_evictions == 1
    b2 = Sequence("b2", [6, 7, 8, 9, 10])
    assert bm.match_prefix(b2) == 2 and b2.page_ids == [b_pages[0]]
    bm.check_invariants([filler, g, b2])


def test_fork_copy_on_write_and_refcounts() -> None:
    bm = BlockManager(num_pages=16, page_size=4)
    parent = _run_prompt(bm, "p", list(range(10)))  # 2 full pages + partial (2 tokens)
    parent.output_token_ids.append(100)
    child = parent.fork("c")
    child.output_token_ids[-1] = 200  # its own sample; that token has no KV yet
    src, dst = bm.fork(parent, child)
    assert src == parent.page_ids[2] and dst not in parent.page_ids
    assert child.page_ids[:2] == parent.page_ids[:2] and child.page_ids[2] == dst
    assert child.num_computed_tokens == 10 and child.block_hashes == parent.block_hashes
    assert [bm.refcount(p) for p in parent.page_ids] == [2, 2, 1]
    bm.check_invariants([parent, child])
    # Page-aligned parent: nothing to copy, all pages shared.
    p2 = _run_prompt(bm, "p2", list(range(50, 58)))
    p2.output_token_ids.append(1)
    c2 = p2.fork("c2")
    assert bm.fork(p2, c2) is None and c2.page_ids == p2.page_ids
    # Child that does not extend the parent is refused.
    with pytest.raises(ValueError):
        bm.fork(p2, Sequence("x", [1, 2, 3]))
    for s in (parent, child, p2, c2):
        bm.free(s)
    bm.check_invariants([])
    assert bm.num_used_pages == 0


def test_duplicate_concurrent_prefix_stays_private() -> None:
    # Two sequences prefill the same prompt in the same step (neither sees the other's pages).
    bm = BlockManager(num_pages=16, page_size=2)
    a, b = Sequence("a", [1, 2, 3]), Sequence("b", [1, 2, 3])
    for s in (a, b):
        bm.match_prefix(s)
        bm.allocate(s, 3)
    for s in (a, b):
        s.num_computed_tokens = 3
        bm.commit_computed(s)
    assert bm.is_cached(a.page_ids[0]) and not bm.is_cached(b.page_ids[0])
    assert a.block_hashes == b.block_hashes
    bm.free(b)
    bm.free(a)
    assert bm.num_cached_free_pages == 1
    bm.check_invariants([])


def test_reset_prefix_cache() -> None:
    bm = BlockManager(num_pages=8, page_size=2)
    bm.free(_run_prompt(bm, "a", [1, 2, 3, 4, 5]))
    assert bm.reset_prefix_cache() == 2
    assert bm.match_prefix(Sequence("b", [1, 2, 3, 4, 5])) == 0
