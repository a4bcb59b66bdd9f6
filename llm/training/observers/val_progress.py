"""Progress lines for a long validation: a preset's validation split can take minutes, and a run that prints
nothing meanwhile looks hung.

`validation_progress` wraps the batch iterator of one validation. It says nothing until the validation has run
`FIRST_LINE_S` seconds (a tiny run's validation never prints), then one line through the run's logger every
`INTERVAL_S` seconds, on rank 0 only, naming the flag that caps the work; a closing line follows only where
progress lines were printed. Per batch it costs one clock read.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

FIRST_LINE_S = 20.0  # a validation shorter than this stays silent
INTERVAL_S = 30.0  # then a line every this many seconds

_clock = time.monotonic  # the tests replace it


def _planned(loader: Any, limit: int) -> int | None:
    """Batches this rank will validate: the loader's length capped by `limit` (None: unknown length)."""
    try:
        total = len(loader)
    except TypeError:
        return limit or None
    return min(total, limit) if limit else total


def validation_progress(batches: Iterable[Any], *, loader: Any, limit: int, step: int, logger: Any,
                        show: bool = True) -> Iterator[Any]:
    """Yield `batches`, logging a progress line every `INTERVAL_S` s once the validation passes `FIRST_LINE_S` s
    (`show=False`, on ranks other than 0: only yield)."""
    if not show:
        yield from batches
        return
    total, start = _planned(loader, limit), _clock()
    next_line, done = start + FIRST_LINE_S, 0
    for batch in batches:
        yield batch
        done += 1
        now = _clock()
        if now >= next_line:
            next_line = now + INTERVAL_S
            logger.info("%s", _line(step, done, total, now - start, capped=bool(limit)))
    if next_line != start + FIRST_LINE_S:  # progress was shown: close it
        logger.info("validation at step %d: %s batches in %.0f s", step, f"{done:,}", _clock() - start)


def _line(step: int, done: int, total: int | None, elapsed: float, capped: bool) -> str:
    if total:
        left = elapsed / done * (total - done)
        where = f"{done:,}/{total:,} batches ({100 * done / total:.0f}%), {elapsed:.0f} s, about {left:.0f} s left"
    else:
        where = f"{done:,} batches, {elapsed:.0f} s"
    hint = "" if capped else "; --training-val-max-batches N validates only N batches"
    return f"validation at step {step}: {where}{hint}"
