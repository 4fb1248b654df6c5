"""Raw sources, the synthetic set, image decoding, pretokenize and the token-shard contract (Ray Data)."""
