"""The tree engine's KV pages: the allocator (free list, reference counts, memory accounting) and the write
plan a program applies to the pool.

The allocator is host-side bookkeeping (the device pool lives in the engine and is written inside its
programs, as a `WritePlan` built by `PlanBuilder` says). A node's
block table lists the pages of its whole context, root first; it holds one reference to each of them. A node
owns the pages of its own tokens (fresh pages, the first one a copy of its parent's partial last page when its
first position is not page-aligned) and shares its ancestors' pages. `release` drops a table's references; a
page returns to the free list when its count reaches zero.

The pool grows by a factor of `GROWTH` from `initial_pages` up to `max_pages` (each size is one more set of
compiled programs, so few, large steps); needing more than `max_pages` raises `PoolExhausted`, which names the
config key to raise.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from prs_jax.kernels.paged import copy_pages, write_slots


GROWTH = 4  # pool size factor per growth step


class PoolExhausted(RuntimeError):
    """The KV pool has fewer free pages than a call needs."""


@dataclasses.dataclass
class PageStats:
    """Pages and bytes of the pool: in use now, peak since the engine started, and capacity."""

    page_size: int
    page_bytes: int
    pages_used: int
    pages_free: int
    pages_peak: int
    pages_allocated: int  # device pool size now (grows in steps of GROWTH x)
    pages_max: int  # EngineConfig.pool_pages

    def as_dict(self) -> dict[str, int]:
        """Counts plus the same in bytes."""
        out = dataclasses.asdict(self)
        for name in ("used", "peak", "allocated", "max"):
            out[f"bytes_{name}"] = out[f"pages_{name}"] * self.page_bytes
        return out


class PageAllocator:
    """Free list and per-page reference counts of a pool of `max_pages` pages (`allocated` exist on device)."""

    def __init__(self, max_pages: int, initial_pages: int, page_size: int, page_bytes: int,
                 key: str = "EngineConfig.pool_pages"):
        if max_pages < 1 or initial_pages < 1:
            raise ValueError(f"PageAllocator: pool sizes must be >= 1 (max {max_pages}, initial {initial_pages}).")
        self.max_pages, self.page_size, self.page_bytes, self.key = max_pages, page_size, page_bytes, key
        self.allocated = min(initial_pages, max_pages)
        self.refcount = np.zeros(self.allocated, np.int64)
        self._free: list[int] = list(range(self.allocated - 1, -1, -1))  # a stack: lowest ids first
        self.peak = 0

    @property
    def used(self) -> int:
        return self.allocated - len(self._free)

    @property
    def free(self) -> int:
        """Pages free now, counting those the pool may still grow by."""
        return len(self._free) + self.max_pages - self.allocated

    def pages_for(self, start: int, stop: int) -> int:
        """Pages a node owns when its tokens cover context positions start..stop-1 (its first page is
        shared with the parent's last, i.e. copied, when start is not page-aligned)."""
        ps = self.page_size
        return max(-(-stop // ps), -(-start // ps)) - start // ps

    def need(self, pages: int, what: str) -> int:
        """Check that `pages` more pages fit; returns the device pool size they need (>= allocated)."""
        if pages > self.free:
            raise PoolExhausted(
                f"{what}: the KV pool is exhausted: {pages} pages of {self.page_size} tokens needed, {self.free} "
                f"free of {self.max_pages} ({self.used} in use). Raise {self.key} (or page_size), or release "
                f"nodes that will not be built on (TreeEngine.release).")
        size = self.allocated
        while len(self._free) + size - self.allocated < pages:
            size = min(GROWTH * size, self.max_pages)
        return size

    def grow(self, size: int) -> None:
        """Record that the device pool now has `size` pages (the new ones free)."""
        if size <= self.allocated:
            return
        self.refcount = np.concatenate([self.refcount, np.zeros(size - self.allocated, np.int64)])
        self._free = list(range(size - 1, self.allocated - 1, -1)) + self._free
        self.allocated = size

    def alloc(self, pages: int, what: str) -> list[int]:
        """`pages` fresh page ids, each with one reference (the device pool must already be big enough)."""
        if pages > len(self._free):
            self.need(pages, what)  # raises when over the maximum
            raise RuntimeError(f"{what}: the device pool was not grown before allocating (engine bug).")
        ids = [self._free.pop() for _ in range(pages)]
        self.refcount[ids] += 1
        self.peak = max(self.peak, self.used)
        return ids

    def incref(self, ids: Sequence[int]) -> None:
        """One more reference to each page of `ids` (a new block table sharing them)."""
        if len(ids):
            np.add.at(self.refcount, np.asarray(ids, np.int64), 1)

    def decref(self, ids: Sequence[int]) -> None:
        """One reference fewer to each page of `ids`; pages reaching zero are freed."""
        if not len(ids):
            return
        arr = np.asarray(ids, np.int64)
        drop = np.bincount(arr, minlength=self.allocated)
        if np.any(drop > self.refcount):
            bad = np.flatnonzero(drop > self.refcount).tolist()
            raise RuntimeError(f"page allocator: releasing unreferenced pages {bad} (engine bug).")
        self.refcount -= drop
        for p in sorted(set(arr[self.refcount[arr] == 0].tolist()), reverse=True):
            self._free.append(p)

    def stats(self) -> PageStats:
        """Current accounting."""
        return PageStats(page_size=self.page_size, page_bytes=self.page_bytes, pages_used=self.used,
                         pages_free=self.free, pages_peak=self.peak, pages_allocated=self.allocated,
                         pages_max=self.max_pages)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class WritePlan:
    """Where one program writes the KV it computes (suffix [L, 2, R, K, T, D]) into the pool; page id N (the
    pool size) means "no write". Applied in order: completions, page copies, row writes.

    comp_page/comp_off/comp_row [Q]: slot 0 of row comp_row (a parent's last token, fed again as the first
    token of what is built on it) is written at (comp_page, comp_off): the parent's own page, and copies of
    it made earlier in the same call. cow_src/cow_dst [R]: copy on write of a parent's partial last page into
    a new node's first page. wr_page/wr_off [R, T]: destination of every slot of every row."""

    comp_page: jax.Array
    comp_off: jax.Array
    comp_row: jax.Array
    cow_src: jax.Array
    cow_dst: jax.Array
    wr_page: jax.Array
    wr_off: jax.Array


def apply_write_plan(pool: jax.Array, suffix_lrktd: jax.Array, plan: WritePlan) -> jax.Array:
    """pool [L, 2, N, ps, K, D] after writing a program's new KV [L, 2, R, K, T, D] as `plan` says."""
    first = jnp.take(suffix_lrktd[:, :, :, :, 0, :], plan.comp_row, axis=2)  # [L, 2, Q, K, D]
    pool = pool.at[:, :, plan.comp_page, plan.comp_off].set(first.astype(pool.dtype), mode="drop")
    pool = copy_pages(pool, plan.cow_src, plan.cow_dst)
    return write_slots(pool, jnp.swapaxes(suffix_lrktd, 3, 4), plan.wr_page, plan.wr_off)


class PlanBuilder:
    """Host-side arrays of one program's `WritePlan` (R rows of T slots, pool of `pool_pages` pages)."""

    def __init__(self, rows: int, slots: int, pool_pages: int, page_size: int):
        self.n, self.ps, self.rows = pool_pages, page_size, rows
        self.items: set[int] = set()  # the call's items this program runs (set by the engine)
        self.comps: list[tuple[int, int, int]] = []
        self.cow_src = np.zeros((rows,), np.int32)
        self.cow_dst = np.full((rows,), pool_pages, np.int32)
        self.wr_page = np.full((rows, slots), pool_pages, np.int32)
        self.wr_off = np.zeros((rows, slots), np.int32)

    def complete(self, row: int, pos: int, pages: Sequence[int]) -> None:
        """Row's slot 0 is context position `pos`: write it into each page of `pages` at pos's offset."""
        for p in pages:
            self.comps.append((int(p), pos % self.ps, row))

    def copy(self, row: int, src: int, dst: int) -> None:
        self.cow_src[row], self.cow_dst[row] = src, dst

    def write(self, row: int, first_slot: int, count: int, start: int, own: Sequence[int]) -> None:
        """Slots first_slot .. first_slot + count - 1 of `row` hold context positions start, start + 1, ...;
        `own` are the pages of positions from (start // ps) * ps on (slots past them are dropped)."""
        slots = self.wr_page.shape[1]
        count = max(0, min(count, slots - first_slot))
        pos = start + np.arange(count)
        idx = pos // self.ps - start // self.ps
        ok = idx < len(own)
        pages = np.asarray(list(own) + [self.n], np.int32)[np.where(ok, idx, len(own))]
        self.wr_page[row, first_slot:first_slot + count] = pages
        self.wr_off[row, first_slot:first_slot + count] = pos % self.ps

    def build(self) -> WritePlan:
        """The plan as device arrays (completions padded to a power of two >= 2 per row with "no write")."""
        # one completion per row plus the copies earlier programs of the call made: rarely more than 2 per row
        q = max(2 * self.rows, 1 << (len(self.comps) - 1).bit_length())
        comp = np.array(self.comps + [(self.n, 0, 0)] * (q - len(self.comps)), np.int32).reshape(q, 3)
        return WritePlan(comp_page=jnp.asarray(comp[:, 0]), comp_off=jnp.asarray(comp[:, 1]),
                         comp_row=jnp.asarray(comp[:, 2]), cow_src=jnp.asarray(self.cow_src),
                         cow_dst=jnp.asarray(self.cow_dst), wr_page=jnp.asarray(self.wr_page),
                         wr_off=jnp.asarray(self.wr_off))
