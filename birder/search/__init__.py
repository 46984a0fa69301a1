"""Similarity search over a photo collection: embeddings, a faiss vector index, duplicates and clusters.

Needs the ``search`` extra (faiss-cpu, hdbscan). The command line is ``birder-index`` (:mod:`birder.scripts.index`).
"""
