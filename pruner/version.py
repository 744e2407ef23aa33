"""The package's version: ``__version__`` here, the installed distribution's where there is one.

Example:
    >>> package_version() == __version__
    True
"""

from __future__ import annotations

__version__ = "0.1.0"


def package_version() -> str:
    """The installed distribution's version (``importlib.metadata``), else :data:`__version__`
    (running from a source tree)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pruner")
    except PackageNotFoundError:
        return __version__
