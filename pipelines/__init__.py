"""Ray glue around ``dalle_core``, in three wings that a reader can tell apart by folder:

* ``pipelines.data``: raw sources, the synthetic set, image decoding, pretokenize and the token-shard contract;
* ``pipelines.train``: one Ray Train runner and one small file per model (dVAE, DALLE, CLIP);
* ``pipelines.serve``: the Serve application, the batch evaluation driver and its report.

``data`` never imports ``train`` or ``serve``; the top-level modules (config, storage, artifacts, cli,
resources) are shared by all three.
"""
