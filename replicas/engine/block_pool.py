"""Fixed pools the scheduler hands out: KV blocks (ref-counted, so forks share full blocks)
and CCA state slots (one per running sequence)."""

from __future__ import annotations

from collections import OrderedDict, deque


class BlockPool:
    """KV blocks with reference counts and, for prefix caching, a content index.

    A full block whose K/V (and CCA state snapshot) are computed can be sealed under the hash of
    its token prefix. When its last user lets go it is not wiped: it waits in an LRU of
    evictable blocks, still findable by hash, and is only reused (and unhashed) when a new
    allocation finds no never-used block left.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks
        self._evictable: OrderedDict[int, None] = OrderedDict()  # ref 0, still hashed
        self._hash_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        return len(self._block_of)

    def allocate(self, count: int) -> list[int]:
        if count > self.num_free:
            raise RuntimeError(f"asked for {count} KV blocks, {self.num_free} free")
        blocks = []
        for _ in range(count):
            if self._free:
                b = self._free.popleft()
            else:  # evict the least recently released cached block
                b, _ = self._evictable.popitem(last=False)
                del self._block_of[self._hash_of.pop(b)]
            self._refs[b] = 1
            blocks.append(b)
        return blocks

    def share(self, blocks: list[int]) -> None:
        for b in blocks:
            if self._refs[b] == 0:  # a cache hit on a released block revives it
                assert b in self._evictable, f"sharing free block {b}"
                del self._evictable[b]
            self._refs[b] += 1

    def ref_count(self, block: int) -> int:
        return self._refs[block]

    def free(self, blocks: list[int]) -> None:
        # Tail blocks first, so that under pressure a prefix's end is evicted before its start.
        for b in reversed(blocks):
            assert self._refs[b] > 0, f"double free of block {b}"
            self._refs[b] -= 1
            if self._refs[b] == 0:
                if b in self._hash_of:
                    self._evictable[b] = None
                else:
                    self._free.append(b)

    def seal(self, block: int, block_hash: bytes) -> bool:
        """Index a computed full block by its prefix hash (first writer wins); True if new."""
        if block in self._hash_of or block_hash in self._block_of:
            return False
        self._hash_of[block] = block_hash
        self._block_of[block_hash] = block
        return True

    def lookup(self, hashes: list[bytes]) -> list[int]:
        """Blocks of the longest cached prefix of `hashes`."""
        found = []
        for h in hashes:
            b = self._block_of.get(h)
            if b is None:
                break
            found.append(b)
        return found


class StateSlots:
    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._free: deque[int] = deque(range(num_slots))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        return self._free.popleft()

    def free(self, slot: int) -> None:
        # A slot freed twice would later go to two sequences at once, mixing their states.
        assert 0 <= slot < self.num_slots and slot not in self._free, (
            f"double free of state slot {slot}")
        self._free.append(slot)
