"""Explanation maps: where in a photo a ViT looked (attention rollout) and what drove one class (Grad-CAM).

:func:`explain` is the entry point; :mod:`.overlay` draws a map over its photo.
"""

from birder.introspection.explain import EXPLAIN_METHODS, Explanation, explain, explain_tensor

__all__ = ["EXPLAIN_METHODS", "Explanation", "explain", "explain_tensor"]
