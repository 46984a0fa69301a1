"""Jobs over a collection of photos: the predict run (``predict.py``; with a detector, ``detect.py``), manifests and
``--shard`` blocks (``photo_lists.py``), merging sharded outputs (``merge.py``), ``birder-calibrate``
(``calibrate.py``) and ``birder-eval``'s answer reports (``eval_reports.py``).

This layer sits above the per-batch code of :mod:`birder.inference` and the domain packages (geo, search,
introspection) and below the commands; the import-linter contract in ``pyproject.toml`` keeps it so.
"""
