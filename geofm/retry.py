"""The one retry helper: exponential backoff with jitter (tenacity), for outages only.

Callers name which exceptions are transient (an object store or git remote that does not
answer); everything else propagates at once. A retry gives up by re-raising the last error
when its attempts or its time are spent, or as soon as `stop` (a threading.Event, e.g. set by
SIGTERM) is set; the wait between attempts is cut short by `stop` too.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

import tenacity

T = TypeVar("T")


class Transient(Exception):
    """An infrastructure error worth retrying (network, server, remote unavailable)."""


def retry(
    fn: Callable[[], T],
    *,
    what: str,
    log: Callable[[str], None],
    on: tuple[type[BaseException], ...] = (Transient,),
    stop: threading.Event | None = None,
    first: float = 1.0,
    cap: float = 300.0,
    attempts: int | None = None,
    within: float | None = None,
) -> T:
    """fn(), retried on the exceptions in `on`; the last one is re-raised when giving up."""
    conditions = []
    if attempts is not None:
        conditions.append(tenacity.stop_after_attempt(attempts))
    if within is not None:
        conditions.append(tenacity.stop_after_delay(within))
    if stop is not None:
        conditions.append(tenacity.stop_when_event_set(stop))

    def before_sleep(state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        log(f"{what} failed ({error}); retrying in {state.next_action.sleep:.1f} s")

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(on),
        wait=tenacity.wait_exponential_jitter(multiplier=first, max=cap, jitter=first / 4),
        stop=tenacity.stop_any(*conditions) if conditions else tenacity.stop_never,
        sleep=stop.wait if stop is not None else tenacity.nap.sleep,
        before_sleep=before_sleep,
        reraise=True,
    )
    return retrying(fn)
