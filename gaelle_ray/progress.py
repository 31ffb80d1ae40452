"""Progress bars where a person watches, plain progress lines everywhere else.

The decision (`bars_wanted`): bars are drawn when this process's stdout and stderr are
both terminals; `GAELLE_PROGRESS=1` forces them, `GAELLE_PROGRESS=0` turns them off. Inside
a Ray worker process the answer is always no: a worker's output is a log file that Ray
forwards, so the driver decides and tells the workers (pretraining passes the answer in
the loop config).

The bars:

- `bar(...)`: a tqdm bar on stderr of this process, or a disabled tqdm (every call a
  no-op, iteration passes through) when bars are not wanted. tqdm's default layout shows
  the percentage, the count, elapsed<remaining and the rate, e.g.
  ``toy train:  42%|████▏     | 672/1600 [00:03<00:04, 210.52img/s]``.
- `worker_bar(...)`: a bar drawn on the driver for work running in a Ray worker (the
  Ray Train workers): Ray's distributed tqdm (`ray.experimental.tqdm_ray`), whose state
  lines the worker writes to its stdout and the driver's log monitor turns into a tqdm bar
  on the driver's stderr (needs `log_to_driver`, Ray's default). The state lines are
  written straight to stdout rather than with `print`, which Ray Train replaces in its
  workers with one that also logs the text: a copy of every state line would land in Ray
  Train's application log and, through its console handler, on the worker's stderr.

Without bars, callers keep their progress lines (what `ray job logs`, CI and pipes show).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Iterable, Mapping, TextIO

ENV = "GAELLE_PROGRESS"

__all__ = ["ENV", "bars_wanted", "bar", "worker_bar", "in_ray_worker"]


def in_ray_worker() -> bool:
    """True inside a Ray worker process (a task or actor), False on a driver or without Ray."""
    worker_module = sys.modules.get("ray._private.worker")
    if worker_module is None:  # Ray not even imported: not a Ray worker
        return False
    return worker_module.global_worker.mode == worker_module.WORKER_MODE


def _isatty(stream: TextIO | None) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def bars_wanted(streams: Iterable[TextIO | None] | None = None, env: Mapping[str, str] | None = None) -> bool:
    """Should this process draw progress bars?

    streams: the streams that must be terminals (default: sys.stdout and sys.stderr: the
    bars go to stderr, the progress lines they replace to stdout, so a redirected stdout
    keeps its lines). env: where GAELLE_PROGRESS is read (default os.environ): "1" forces
    bars, "0" turns them off, unset or "" decides by the terminals; any other value is a
    ValueError. Always False inside a Ray worker process.
    """
    if in_ray_worker():
        return False
    value = (os.environ if env is None else env).get(ENV, "").strip()
    if value == "1":
        return True
    if value == "0":
        return False
    if value:
        raise ValueError(f"{ENV} must be 0, 1 or unset, got {value!r}")
    streams = (sys.stdout, sys.stderr) if streams is None else streams
    return all(_isatty(s) for s in streams)


def bar(iterable: Iterable | None = None, *, total: float | None = None, desc: str = "", unit: str = "it",
        enabled: bool | None = None, **kwargs: Any):
    """A tqdm progress bar on stderr, or a disabled one (enabled False, or None and
    `bars_wanted()` says no). Use it as tqdm: iterate over it, or call update(n) /
    set_postfix_str(...) and close() (or use it as a context manager)."""
    from tqdm import tqdm

    on = bars_wanted() if enabled is None else enabled
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not on, dynamic_ncols=True,
                file=sys.stderr, **kwargs)


def worker_bar(total: int | None, desc: str = "", unit: str = "it"):
    """A bar for work inside a Ray worker, drawn by the driver (see the module docstring).
    Has update(n), set_description(text) and close(); updates reach the driver at most once
    a second (and on close)."""
    from ray.experimental import tqdm_ray

    class _StdoutBar(tqdm_ray.tqdm):
        def _dump_state(self, force_flush: bool = False) -> None:
            import time

            now = time.time()
            if not force_flush and now - self._last_flush_time < self._flush_interval_s:
                return
            self._last_flush_time = now
            sys.stdout.write(json.dumps(self._get_state()) + "\n")
            sys.stdout.flush()

    return _StdoutBar(total=total, desc=desc, unit=unit)
