"""Progress bars that stay readable in a log file.

On a terminal a bar redraws in place; redirected to a file every redraw is one more line, so
without a terminal a bar redraws at most every ``LOG_INTERVAL_S`` seconds (and once at the end).
"""

from __future__ import annotations

import sys

LOG_INTERVAL_S = 30.0


def progress_bar(**kwargs):
    """A ``tqdm`` bar on stderr (``kwargs`` as tqdm's), throttled when stderr is not a terminal."""
    from tqdm.auto import tqdm

    if not _isatty(sys.stderr):
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
    return tqdm(**kwargs)


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced or closed stream
        return False
