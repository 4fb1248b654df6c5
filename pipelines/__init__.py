"""Ray Data building blocks: raw-shard readers and writers, the synthetic set, pretokenize, token-shard manifest.

``read_manifest`` and ``check_manifest`` are what training calls before it takes any cluster resource.
"""

from pipelines.manifest import check_manifest, read_manifest

__all__ = ["check_manifest", "read_manifest"]
