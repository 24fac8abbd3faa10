"""Where Numba keeps lstmkit's compiled kernels: a per-user cache folder, never the installed package.

Numba's `cache=True` writes compiled code next to the source (`lstmkit/__pycache__/*.nbi, *.nbc`)
whenever that folder is writable. For an installed lstmkit that is site-packages: a later
`pip install -e .` removes the package but not those files, and the left-over `lstmkit/` folder
then shadows the editable install as an empty namespace package (`cannot import name
'__version__'`). So lstmkit's kernels are cached in

    $LSTMKIT_CACHE_DIR                       if set, else
    <user cache dir>/lstmkit/numba           (~/.cache/lstmkit/numba on Linux, XDG_CACHE_HOME honoured)

and, if that cannot be written, in a per-user folder under the system's temporary directory.
Numba's own NUMBA_CACHE_DIR, when the user sets it, still wins. Only functions defined in
lstmkit's own files are affected: other Numba code in the same process keeps Numba's rules.
"""

from __future__ import annotations

import os
import tempfile

from numba.core import caching, config
from numba.misc.appdirs import AppDirs

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def cache_root() -> str:
    """The folder lstmkit's compiled kernels go to (created on first use)."""
    env = os.environ.get("LSTMKIT_CACHE_DIR")
    if env:
        return os.path.abspath(env)
    return os.path.join(AppDirs("lstmkit", appauthor=False).user_cache_dir, "numba")


def _fallback_root() -> str:
    uid = os.getuid() if hasattr(os, "getuid") else os.getlogin()
    return os.path.join(tempfile.gettempdir(), f"lstmkit-{uid}", "numba")


class LstmkitCacheLocator(caching._SourceFileBackedLocatorMixin, caching._CacheLocator):
    """Numba cache locator for functions in lstmkit's own files: caches under cache_root()."""

    def __init__(self, py_func, py_file, root):
        self._py_file = py_file
        self._lineno = py_func.__code__.co_firstlineno
        self._cache_path = os.path.join(root, self.get_suitable_cache_subpath(py_file))

    def get_cache_path(self):
        return self._cache_path

    @classmethod
    def from_function(cls, py_func, py_file):
        if config.CACHE_DIR:      # the user chose a Numba cache folder: Numba's own locator uses it
            return None
        if os.path.dirname(os.path.abspath(py_file)) != PACKAGE_DIR:
            return None
        for root in (cache_root(), _fallback_root()):
            locator = cls(py_func, py_file, root)
            try:
                locator.ensure_cache_path()
            except OSError:       # not writable: try the next folder
                continue
            return locator
        return None


def install() -> None:
    """Put the lstmkit locator first in Numba's list (idempotent)."""
    impl = getattr(caching, "CacheImpl", None) or caching._CacheImpl     # renamed in Numba 0.61
    classes = impl._locator_classes
    if LstmkitCacheLocator not in classes:
        classes.insert(0, LstmkitCacheLocator)
