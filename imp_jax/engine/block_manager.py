"""Page allocator for the paged KV cache, with ref-counting and hash-chained prefix caching.

Pages 1..num_pages-1 are handed out; page 0 is reserved (padding page-table entries point at it,
see docs/architecture.md). A sequence's page i holds its positions [i*page_size, (i+1)*page_size).

Every page is in exactly one of three states:
  used     refcount > 0 (owned by that many sequences; >1 only via prefix hits or fork)
  cached   refcount 0, but a full page whose hash is registered: its KV is still valid and can be
           re-attached by `match_prefix`; evicted LRU when the plain free list runs dry
  free     refcount 0, no hash, on the free list

Prefix caching: once a *full* page's KV has been written (`commit_computed`), it is registered
under hash((parent_hash, tuple(page tokens))), parent_hash being the previous page's hash (None for
the first page). The chain makes a page's hash depend on the whole prefix, so a hit at page i
implies pages 0..i-1 matched too. Each registered page also keeps its exact key, and a lookup
compares it, so a hash collision on one page's tokens can never return a wrong page.

Only full pages are ever shared by prefix matching, and full pages are never written again, so
shared pages are immutable. The one writable shared case, a fork's last partial page, is copied
eagerly (`fork` returns the (src, dst) copy for the engine to perform).
"""

from __future__ import annotations

from collections import OrderedDict

from imp_jax.engine.sequence import Sequence

_Key = tuple  # (parent_hash | None, tuple[int, ...])


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True) -> None:
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is reserved), got {num_pages}")
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self.num_usable_pages = num_pages - 1  # page 0 reserved

        self._refcount = [0] * num_pages
        # LIFO free list; reversed so the first allocations get pages 1, 2, 3, ... (readable).
        self._free: list[int] = list(range(num_pages - 1, 0, -1))
        # Cached pages with refcount 0, least recently used first.
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._hash_to_page: dict[int, int] = {}
        self._page_key: dict[int, _Key] = {}  # registered page -> exact key (collision guard)
        self._page_hash: dict[int, int] = {}

        # Prefix-cache counters, in tokens: hits / queries is the hit rate.
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.num_evictions = 0

    # ------------------------------------------------------------------ counters
    @property
    def num_free_pages(self) -> int:
        """Pages available to allocate: plain free + cached-but-unreferenced (evictable)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_free_pages(self) -> int:
        """Unreferenced pages that still hold reusable prefix KV (a subset of num_free_pages)."""
        return len(self._evictable)

    @property
    def num_used_pages(self) -> int:
        return self.num_usable_pages - self.num_free_pages

    @property
    def usage(self) -> float:
        """Fraction of usable pages referenced by at least one sequence."""
        return self.num_used_pages / self.num_usable_pages

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    @property
    def capacity_tokens(self) -> int:
        """Most tokens one sequence could ever hold (the whole pool)."""
        return self.num_usable_pages * self.page_size

    def refcount(self, page: int) -> int:
        return self._refcount[page]

    def is_cached(self, page: int) -> bool:
        return page in self._page_key

    def num_pages_for(self, num_tokens: int) -> int:
        return _cdiv(num_tokens, self.page_size)

    # ------------------------------------------------------------------ allocation
    def _take_page(self) -> int:
        if self._free:
            page = self._free.pop()
        elif self._evictable:
            page, _ = self._evictable.popitem(last=False)  # LRU
            self._unregister(page)
            self.num_evictions += 1
        else:
            raise RuntimeError("KV page pool exhausted (caller must check can_allocate first)")
        assert self._refcount[page] == 0
        self._refcount[page] = 1
        return page

    def _unregister(self, page: int) -> None:
        h = self._page_hash.pop(page)
        del self._page_key[page]
        del self._hash_to_page[h]

    def num_new_pages_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        # asked per row per step: the arithmetic inline, no helper calls
        need = -(-(seq.num_computed_tokens + num_new_tokens) // self.page_size) \
            - len(seq.page_ids)
        return need if need > 0 else 0

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.num_new_pages_needed(seq, num_new_tokens) <= self.num_free_pages

    def allocate(self, seq: Sequence, num_new_tokens: int) -> list[int]:
        """Grow seq's page list to cover num_computed_tokens + num_new_tokens; return new pages."""
        n = self.num_new_pages_needed(seq, num_new_tokens)
        if n > self.num_free_pages:
            raise RuntimeError(
                f"cannot allocate {n} pages for {seq.request_id!r}: {self.num_free_pages} free"
            )
        new = [self._take_page() for _ in range(n)]
        seq.page_ids.extend(new)
        return new

    def free(self, seq: Sequence) -> None:
        """Drop seq's references; its KV is gone for it (num_computed_tokens -> 0).

        Pages are released last-first so that, among one sequence's cached pages, the tail is
        evicted before the head: heads are the most widely shared prefixes.
        """
        for page in reversed(seq.page_ids):
            rc = self._refcount[page] - 1
            if rc < 0:
                raise AssertionError(f"page {page} freed more often than referenced")
            self._refcount[page] = rc
            if rc == 0:
                if page in self._page_key:
                    self._evictable[page] = None  # most recently used end
                else:
                    self._free.append(page)
        seq.page_ids = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    # ------------------------------------------------------------------ prefix caching
    def _lookup(self, key: _Key) -> tuple[int, int] | None:
        h = hash(key)
        page = self._hash_to_page.get(h)
        if page is None or self._page_key[page] != key:
            return None
        return h, page

    def match_prefix(self, seq: Sequence, *, record_stats: bool = True) -> int:
        """At admission: attach the longest chain of cached full pages; return cached tokens.

        Sets seq.num_computed_tokens to the number of cached tokens. At least one token is
        always left uncomputed so the step produces logits to sample from. Undo with `free`.
        `record_stats=False` lets a caller that may still back out count the query later via
        `record_prefix_query`.
        """
        if seq.page_ids or seq.num_computed_tokens:
            raise ValueError(f"match_prefix needs a sequence without pages: {seq!r}")
        ps = self.page_size
        pages: list[int] = []
        hashes: list[int] = []
        if self.enable_prefix_caching:
            parent = None
            limit = seq.num_tokens - 1
            if seq.max_cached_tokens is not None:
                limit = min(limit, seq.max_cached_tokens)
            for i in range(limit // ps):
                hit = self._lookup((parent, tuple(seq.token_ids_slice(i * ps, (i + 1) * ps))))
                if hit is None:
                    break
                parent, page = hit
                hashes.append(parent)
                pages.append(page)
        for page in pages:
            if self._refcount[page] == 0:
                del self._evictable[page]
            self._refcount[page] += 1
        seq.page_ids = pages
        seq.block_hashes = hashes
        seq.num_computed_tokens = seq.num_cached_tokens = len(pages) * ps
        if record_stats:
            self.record_prefix_query(seq.num_tokens, seq.num_cached_tokens)
        return seq.num_cached_tokens

    def record_prefix_query(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        if self.enable_prefix_caching:
            self.prefix_cache_queries += num_query_tokens
            self.prefix_cache_hits += num_hit_tokens

    def commit_computed(self, seq: Sequence, num_tokens: int | None = None) -> None:
        """Register seq's newly completed full pages (call after their KV has been written).

        `num_tokens`: only the pages full within seq's first num_tokens computed tokens (the
        scheduler commits a decode block's pages in the order of the steps that filled them);
        default all of its computed tokens.

        If an identical page is already cached (two sequences computed the same prefix
        concurrently) the existing entry wins and this page stays private; it is simply freed
        later. The hash chain is still extended so later pages of seq can be registered.
        """
        if not self.enable_prefix_caching:
            return
        ps = self.page_size
        n_full = (seq.num_computed_tokens if num_tokens is None else num_tokens) // ps
        hashes = seq.block_hashes
        start = len(hashes)
        if start >= n_full:  # the common case: no page filled since the last commit
            return
        parent = hashes[-1] if hashes else None
        for i in range(start, n_full):
            key = (parent, tuple(seq.token_ids_slice(i * ps, (i + 1) * ps)))
            h = hash(key)
            page = seq.page_ids[i]
            if h not in self._hash_to_page and page not in self._page_key:
                self._hash_to_page[h] = page
                self._page_key[page] = key
                self._page_hash[page] = h
            hashes.append(h)
            parent = h

    def reset_prefix_cache(self) -> int:
        """Forget every unreferenced cached page (e.g. after weights change); return count."""
        n = len(self._evictable)
        while self._evictable:
            page, _ = self._evictable.popitem(last=False)
            self._unregister(page)
            self._free.append(page)
        return n

    # ------------------------------------------------------------------ fork (n > 1 samples)
    def can_fork(self, parent: Sequence) -> bool:
        partial = parent.num_computed_tokens % self.page_size != 0
        return not partial or self.num_free_pages >= 1

    def fork(self, parent: Sequence, child: Sequence) -> tuple[int, int] | None:
        """Share parent's computed pages with child (refcount++); copy the partial last page.

        Full pages are immutable, so sharing them is safe. The last page, if partial, would be
        written by both sequences' next tokens, so the child gets its own page now (eager
        copy-on-write): the return value (src, dst) is the page copy the engine must perform
        on every layer's K and V pool before the child's next step. None if nothing to copy.
        """
        if child.page_ids or child.num_computed_tokens:
            raise ValueError(f"fork target must have no pages: {child!r}")
        nc = parent.num_computed_tokens
        if child.num_tokens <= nc or child.token_ids_slice(0, nc) != parent.token_ids_slice(0, nc):
            raise ValueError(
                f"child {child.request_id!r} must extend the parent's {nc} computed tokens"
            )
        if not self.can_fork(parent):
            raise RuntimeError("no free page for the fork's copy-on-write page")
        ps = self.page_size
        shared = parent.page_ids[: self.num_pages_for(nc)]
        copy = None
        if nc % ps:
            src = shared.pop()
            dst = self._take_page()
            copy = (src, dst)
        for page in shared:
            self._refcount[page] += 1
        child.page_ids = shared + ([copy[1]] if copy else [])
        child.block_hashes = parent.block_hashes[: nc // ps]
        child.num_computed_tokens = nc
        return copy

    # ------------------------------------------------------------------ checks
    def check_invariants(self, seqs: list[Sequence] | None = None) -> None:
        """Raise AssertionError if the allocator state is inconsistent.

        With `seqs` (every sequence that may hold pages), also check that each page's refcount
        equals the number of sequences owning it and that each sequence's pages cover its
        computed tokens.
        """

        def check(cond: bool, msg: str) -> None:
            if not cond:
                raise AssertionError(msg)

        rc = self._refcount
        check(rc[0] == 0 and 0 not in self._evictable and 0 not in self._free, "page 0 in use")
        free = set(self._free)
        check(len(free) == len(self._free), "duplicate page on the free list")
        check(not (free & self._evictable.keys()), "page both free and cached")
        for p in free:
            check(rc[p] == 0, f"free page {p} has refcount {rc[p]}")
            check(p not in self._page_key, f"free page {p} still registered")
        for p in self._evictable:
            check(rc[p] == 0, f"cached page {p} has refcount {rc[p]}")
            check(p in self._page_key, f"evictable page {p} not registered")
        used = [p for p in range(1, self.num_pages) if rc[p] > 0]
        check(all(rc[p] >= 0 for p in range(self.num_pages)), "negative refcount")
        check(
            len(free) + len(self._evictable) + len(used) == self.num_usable_pages,
            f"leak: free {len(free)} + cached {len(self._evictable)} + used {len(used)} "
            f"!= {self.num_usable_pages}",
        )
        check(
            len(self._hash_to_page) == len(self._page_key) == len(self._page_hash),
            "hash tables out of sync",
        )
        for h, p in self._hash_to_page.items():
            check(self._page_hash.get(p) == h and hash(self._page_key[p]) == h, f"bad hash of {p}")
        if seqs is None:
            return
        owners = [0] * self.num_pages
        for s in seqs:
            check(len(set(s.page_ids)) == len(s.page_ids), f"{s.request_id}: page listed twice")
            check(
                len(s.page_ids) >= self.num_pages_for(s.num_computed_tokens),
                f"{s.request_id}: pages do not cover its computed tokens",
            )
            check(
                len(s.block_hashes) <= s.num_computed_tokens // self.page_size,
                f"{s.request_id}: hashed a page that is not full",
            )
            for p in s.page_ids:
                check(0 < p < self.num_pages, f"{s.request_id}: bad page id {p}")
                owners[p] += 1
        for p in range(1, self.num_pages):
            check(owners[p] == rc[p], f"page {p}: refcount {rc[p]} but {owners[p]} owners")
