"""Settings read from the environment: where downloaded models go.

``BIRDER_DTYPE`` (the dtype an inference run uses) is read where that choice is made, in
:mod:`birder.inference.optimize`.
"""

import os
from pathlib import Path

# Where Birder itself puts downloaded models: relative to the working directory. We never write there, but a
# file a user already has in it is used (docs/compatibility.md, "Known defects of the reference not copied").
LEGACY_MODELS_DIR = Path("models")


def models_dir() -> Path:
    """The download cache for pretrained models: ``$BIRDER_MODELS_DIR``, else ``~/.cache/birder/models``.

    ``$XDG_CACHE_HOME`` is honoured for the per-user default. Read at call time so tests and users can change
    the environment after import.
    """
    env_dir = os.environ.get("BIRDER_MODELS_DIR")
    if env_dir:
        return Path(env_dir).expanduser()

    cache_home = os.environ.get("XDG_CACHE_HOME")
    base = Path(cache_home).expanduser() if cache_home else Path.home() / ".cache"
    return base / "birder" / "models"
