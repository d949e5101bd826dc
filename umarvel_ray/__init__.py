"""umarvel-ray: universal multimodal retrieval (U-MARVEL recipe) on Ray."""

import os as _os

if not _os.environ.get("RAY_ADDRESS"):
    # No cluster to join, so this process will start its own local Ray: keep all of it on
    # loopback. Ray reads this switch when it is imported, so it must be set before any import of
    # ray, which is why it lives here and not in runtime.ensure_ray.
    _os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    _os.environ.setdefault("RAY_AUTH_MODE", "disabled")

__version__ = "0.1.0"
