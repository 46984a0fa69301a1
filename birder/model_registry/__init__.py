"""Names -> networks, and names -> pretrained weights.

Birder's import forms work as written: ``from birder.model_registry import registry`` is the registry object,
``Task`` the task enum and ``manifest`` the module of pretrained entries.
"""

from birder.model_registry import manifest
from birder.model_registry.model_registry import ModelRegistry, registry
from birder.tasks import Task

__all__ = ["ModelRegistry", "Task", "manifest", "registry"]
