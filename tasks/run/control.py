"""What holds or stops a build from outside: the global GPU slot on the Prefect server, and the stops (Ctrl-C,
and SIGTERM: a cancel from the Prefect UI, a pod stopped by Kubernetes), turned into a graceful stop."""

from __future__ import annotations

import signal
import threading
import time
from contextlib import ExitStack, contextmanager

from prefect import get_run_logger
from prefect.concurrency.sync import concurrency
from prefect.exceptions import TerminationSignal
from prefect.settings import PREFECT_API_URL

GPU_LIMIT = "dafactory-gpu"
# API URLs of the Prefect servers that a command started for itself (flows.cli): like Prefect's temporary
# server, no other build shares them, so they hold no GPU limit
TEMPORARY_SERVERS: set[str] = set()


STOPS = (KeyboardInterrupt, TerminationSignal)  # Ctrl-C, and SIGTERM (a cancel from the Prefect UI)


def stop_in(exc: BaseException) -> BaseException | None:
    """The stop (Ctrl-C, SIGTERM) behind an exception: a signal that lands inside Ray's C code surfaces
    as a SystemError whose context is the stop."""
    while exc is not None:
        if isinstance(exc, STOPS):
            return exc
        exc = exc.__context__
    return None


@contextmanager
def sigterm_stops():
    """While shards stream, SIGTERM (how a Prefect runner cancels a run, and how Kubernetes stops a pod)
    stops the build like Ctrl-C does, instead of Ray's driver handler (installed by ray.init) exiting the
    process at once. The handler is Prefect's own SIGTERM bridge: it raises TerminationSignal, and a
    runner that sees it installed can record the cancellation, so the run ends Cancelled, not Crashed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    try:
        from prefect.utilities.engine import _prefect_sigterm_handler as stop
    except ImportError:  # another Prefect: the same behaviour, without the runner's acknowledgement

        def stop(signum, frame):
            raise TerminationSignal(signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class SlotTimeout(Exception):
    """No slot of the global GPU limit came free within gpu_slot_timeout_s."""


@contextmanager
def gpu_slot(timeout_s: float, record: dict):
    """One slot of the global GPU limit (`dafactory serve` creates it on the Prefect server), taken
    before any stage actor is created or any model loads and held until they are gone: two scheduled
    builds never hold the cluster's GPUs at once. Logs while it waits; ephemeral runs have no limit."""
    if not PREFECT_API_URL.value() or PREFECT_API_URL.value() in TEMPORARY_SERVERS:
        yield
        return
    logger = get_run_logger()
    t0 = time.time()
    # One acquire with the whole timeout: a short first try that times out makes Prefect's slot service log an
    # ERROR (a TimeoutError) for what is a normal wait. The "waiting" line comes from a timer instead.
    waiting = threading.Timer(1.0, logger.info, ("waiting for a slot of %s (another build holds it), at most %gs",
                                                 GPU_LIMIT, timeout_s))
    waiting.daemon = True
    with ExitStack() as stack:
        waiting.start()
        try:
            stack.enter_context(concurrency(GPU_LIMIT, occupy=1, timeout_seconds=timeout_s, strict=False))
        except TimeoutError:
            raise SlotTimeout(f"no slot of {GPU_LIMIT} came free within {timeout_s:g}s "
                              "(gpu_slot_timeout_s); another build holds it") from None
        finally:
            waiting.cancel()
        record.update(acquired_at=time.time(), waited_s=round(time.time() - t0, 3))
        if record["waited_s"] >= 1:
            logger.info("took a slot of %s after %.1fs", GPU_LIMIT, record["waited_s"])
        try:
            yield
        finally:
            record["released_at"] = time.time()
