"""Make the packages named in HIDE_PACKAGES (comma-separated) look not installed: the import system's path
finder no longer finds them, exactly as when they are absent. Put this folder on PYTHONPATH."""
import os
from importlib.machinery import PathFinder

_HIDDEN = {p for p in os.environ.get("HIDE_PACKAGES", "").split(",") if p}

if _HIDDEN:
    _find_spec = PathFinder.find_spec

    def _hiding_find_spec(name, path=None, target=None):
        if name.split(".")[0] in _HIDDEN:
            return None
        return _find_spec(name, path, target)

    PathFinder.find_spec = staticmethod(_hiding_find_spec)
