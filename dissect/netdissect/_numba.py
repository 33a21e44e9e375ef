"""numba for the compiled CPU engine: :func:`_jit` (``njit`` with an on-disk cache, or the plain
function where numba is missing) and :func:`available`."""

from __future__ import annotations

try:  # numba is a dependency; the torch engine still works where it cannot be imported
    import numba
except ImportError:  # pragma: no cover - exercised only without numba
    numba = None


def _jit(fn=None, **options):
    """``numba.njit(cache=True, nogil=True, **options)``, or the plain function without numba.

    Where numba finds no writable cache folder (next to this file, or the user's cache
    folder; ``NUMBA_CACHE_DIR`` sets one) it refuses ``cache=True``: then the kernels are
    compiled in every process instead.
    """
    if fn is None:
        return lambda f: _jit(f, **options)
    if numba is None:
        return fn
    try:
        return numba.njit(cache=True, nogil=True, **options)(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return numba.njit(nogil=True, **options)(fn)


def available() -> bool:
    """Whether numba could be imported (the ``"numba"`` engine needs it)."""
    return numba is not None
