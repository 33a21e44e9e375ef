"""Internal plumbing shared by every wing of torch-dissect; not public API.

One home for what the analyses would otherwise each write again:

- :mod:`.checks`: argument checks (positive ints, batched float inputs, unit lists);
- :mod:`.items`: data items and batches -> ``(input, index)``, stacking them;
- :mod:`.chunks`: ``[start, stop)`` row chunks;
- :mod:`.progress`: the one progress-bar policy;
- :mod:`.images`: images to uint8 RGB and PNG files;
- :mod:`.paths`: file-name-safe layer names and per-unit image paths;
- :mod:`.store_layers`: choosing layers of an activation store;
- :mod:`.arrays`: numpy arrays inside JSON documents, exactly;
- :mod:`.deprecation`: renamed keyword arguments kept for one release;
- :mod:`.device`: where a model and its inputs run (the device policy);
- :mod:`.fingerprint`: the hash that identifies a model's weights;
- :mod:`.finite`: counting and reporting non-finite (NaN, inf) activations.

Modules here import nothing from the analyses: the flow is plumbing -> hooks/store ->
analyses -> report.
"""
