"""KV cache tiers beyond the local block pool: content hashes of prefix blocks, the wire format
of a cached block (K/V plus CCA states), and the shared Redis store (L2)."""
