"""``keygate serve``: the listeners, worker processes and graceful shutdown.

SIGTERM (or SIGINT): readiness goes false, the proxy listener stops
accepting, in-flight requests get ``proxy.shutdown_grace`` seconds to finish,
buffers are flushed, and the process exits 0. With ``--workers N`` a small
supervisor forks N workers that share the ports through SO_REUSEPORT,
forwards signals to them and restarts one that dies unexpectedly.

A worker whose event loop stops turning (its heartbeat, the metrics snapshot
it writes every second, is older than ``proxy.worker_timeout``) has its
stacks dumped to the log, is killed and replaced; so is one still running
``STUCK_AFTER`` + ``KILL_AFTER`` seconds past the grace of a shutdown.
SIGUSR1 dumps every thread's stack of every serving process to the log (the
supervisor passes it on to its workers): what a stuck process is doing.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import json
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from .admin.listener import admin_app, admin_runner as admin_listener_runner
from .runtime import Runtime, StartupError, prepare_store, runtime, warn_if_exposed
from .config.load import serving_problems
from .config.schema import Settings
from .process.gc_tuning import settle_heap
from .dataplane.listener import ProxyListener, proxy_listener
from .keys import KeyParser
from .process.log_format import configure_logging
from .process.tasks import running_tasks
from .store import StoreError, configured_store
from .config.units import parse_listen

log = logging.getLogger("keygate")


def event_loop_runner() -> Callable[[Awaitable[int]], int]:
    try:
        import uvloop
    except ImportError:  # uvloop is optional (not on every platform)
        return asyncio.run  # type: ignore[return-value]
    return uvloop.run  # type: ignore[no-any-return]


STUCK_AFTER = 10.0  # seconds past the grace after which a shutdown still running is logged as stuck
KILL_AFTER = 5.0  # seconds past that after which the supervisor kills a worker that has not stopped
DUMP_WAIT = 1.0  # seconds a worker gets to write its stacks (SIGUSR1) before it is killed


def dump_stacks_on_signal() -> None:
    """SIGUSR1 writes every thread's stack to stderr (the log), even while the event loop is blocked."""
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)


async def _bound(site: web.TCPSite) -> str:
    server = site._server  # aiohttp keeps the asyncio server here
    sockets = getattr(server, "sockets", None) or []
    host, port = sockets[0].getsockname()[:2] if sockets else ("?", 0)
    return f"{host}:{port}"


STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})


def _ignore_further_stops(loop: asyncio.AbstractEventLoop) -> None:
    """Once stopping, another SIGTERM or SIGINT changes nothing, up to the process's very end.

    Left to the loop, the default action comes back as the loop closes (or as the interpreter exits,
    which restores it for every signal Python handles), so a signal repeated late (an impatient
    operator, the supervisor passing each one on) ended a clean shutdown as killed by SIGTERM (exit
    status -15). Ignored instead, in one step from the loop's handler: ``remove_signal_handler``
    first would put the default action back for a moment, in which a repeat, arriving now while
    requests are in flight, would cut the drain short.
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    # asyncio's loop would put the default back as it closes (uvloop's stops listening first and leaves it).
    handlers = getattr(loop, "_signal_handlers", None)
    if isinstance(handlers, dict):
        for sig in STOP_SIGNALS:
            handlers.pop(sig, None)
        if not handlers:
            signal.set_wakeup_fd(-1)  # as asyncio does when its last handler goes


async def serve_async(settings: Settings, *, reuse_port: bool = False,
                      on_ready: Callable[[Runtime], None] | None = None, metrics_dir: Path | None = None) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    # A worker is forked with these blocked (see supervise): one sent before now is delivered here.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    grace = settings.proxy.shutdown_grace
    stuck: asyncio.TimerHandle | None = None
    async with runtime(settings) as rt:
        proxy = proxy_listener(rt.gateway.handle, rt.gateway.forwarder.sweeper, settings.proxy)
        authz: ProxyListener | None = None
        admin_runner = admin_listener_runner(admin_app(rt, metrics_dir=metrics_dir))
        await admin_runner.setup()
        # Everything long-lived exists now; what follows is per request.
        settle_heap()
        try:
            bound = []
            host, port = parse_listen(settings.proxy.listen)
            try:
                bound.append(await proxy.start(host, port, reuse_port=reuse_port))
            except OSError as exc:
                raise StartupError(f"cannot listen on {settings.proxy.listen}: {exc.strerror or exc}") from None
            if rt.decider is not None:
                authz = proxy_listener(rt.decider.handle, rt.gateway.forwarder.sweeper, settings.proxy)
                host, port = parse_listen(settings.authz.listen)
                try:
                    bound.append(await authz.start(host, port, reuse_port=reuse_port))
                except OSError as exc:
                    raise StartupError(f"cannot listen on {settings.authz.listen}: {exc.strerror or exc}") from None
            host, port = parse_listen(settings.admin.listen)
            site = web.TCPSite(admin_runner, host, port, reuse_port=reuse_port or None, backlog=1024)
            try:
                await site.start()
            except OSError as exc:
                raise StartupError(f"cannot listen on {settings.admin.listen}: {exc.strerror or exc}") from None
            bound.append(await _bound(site))
            log.info(json.dumps({
                "event": "listening", "proxy": bound[0], "admin": bound[-1],
                **({"authz": bound[1]} if authz is not None else {}),
                "pid": os.getpid(), "store": settings.store.url.split(":", 1)[0],
            }))
            if on_ready is not None:
                on_ready(rt)
            await stop.wait()
            _ignore_further_stops(loop)
            log.info(json.dumps({"event": "draining", "grace_seconds": grace, "pid": os.getpid()}))
            rt.draining = True
            if rt.webhooks is not None:
                rt.webhooks.stop_claiming()  # a batch in flight finishes (or its lease ends) before exit
            # Should the shutdown ever hang, the log says where (it is then up to the supervisor's SIGKILL).
            stuck = loop.call_later(grace + STUCK_AFTER, lambda: log.error(json.dumps({
                "event": "shutdown_stuck", "pid": os.getpid(), "tasks": running_tasks()})))
            # Stops accepting, lets in-flight requests finish up to the grace, then cuts them.
            await asyncio.gather(proxy.shutdown(grace), *([authz.shutdown(grace)] if authz is not None else []))
        finally:
            await proxy.shutdown(0)
            if authz is not None:
                await authz.shutdown(0)
            await admin_runner.cleanup()
    if stuck is not None:
        stuck.cancel()
    log.info(json.dumps({"event": "stopped", "pid": os.getpid()}))
    return 0


def run_worker(settings: Settings, *, reuse_port: bool = False, metrics_dir: Path | None = None) -> int:
    """One serving process; returns its exit status."""
    try:
        return event_loop_runner()(serve_async(settings, reuse_port=reuse_port, metrics_dir=metrics_dir))
    except StartupError as exc:
        log.error(json.dumps({"event": "startup_failed", "error": str(exc)}))
        return 1
    except StoreError as exc:
        log.error(json.dumps({"event": "startup_failed", "error": f"store unavailable: {exc}"}))
        return 1


def configure_logs(settings: Settings) -> None:
    """Logging as ``[log]`` says, with any key in a record's text shown as its id."""
    parser = KeyParser(kind.prefix for kind in settings.keys.kinds.values())
    configure_logging(settings.log.level, settings.log.format, redact=parser.redact_text)


def _worker_main(settings: Settings, metrics_dir: Path) -> None:
    # Forked with SIGTERM and SIGINT blocked and the supervisor's handlers: those are not a
    # worker's (they signal every worker); its event loop takes the signals over (serve_async).
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    configure_logs(settings)
    dump_stacks_on_signal()
    sys.exit(run_worker(settings, reuse_port=True, metrics_dir=metrics_dir))


async def _prepare_once(settings: Settings) -> None:
    store = configured_store(settings.store)
    await store.open()
    try:
        await prepare_store(store, settings)
    finally:
        await store.close()


def supervise(settings: Settings) -> int:
    """Fork ``proxy.workers`` workers, pass signals on, restart crashed ones, exit 0 after a clean stop."""
    try:
        # Migrate once here, not racing in every worker.
        asyncio.run(_prepare_once(settings))
    except (StartupError, StoreError) as exc:
        log.error(json.dumps({"event": "startup_failed", "error": str(exc)}))
        return 1
    context = multiprocessing.get_context("fork")
    stopping = False
    # Workers share /metrics through this directory; it lives as long as this run.
    metrics_dir = Path(tempfile.mkdtemp(prefix="keygate-metrics-"))

    def start() -> multiprocessing.process.BaseProcess:
        process = context.Process(target=_worker_main, args=(settings, metrics_dir), name="keygate-worker")
        # Blocked across the fork, so that a SIGTERM reaching the new worker before its event loop
        # runs waits for the loop's handler instead of killing it (or running the supervisor's).
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        return process

    workers: list[multiprocessing.process.BaseProcess] = []
    killed: set[int | None] = set()  # workers the supervisor killed for not answering: started again regardless

    stop_deadline = 0.0

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping, stop_deadline
        if not stopping:
            stop_deadline = time.monotonic() + settings.proxy.shutdown_grace + STUCK_AFTER + KILL_AFTER
        stopping = True
        for w in workers:
            _tell_to_stop(w, told)

    told: set[int] = set()  # workers sent SIGTERM; one forked as the signal came is sent it by the loop below

    # Workers still to pass SIGUSR1 on to: one per turn, so that their stacks do not interleave in the log.
    to_dump: list[int] = []  # places in workers: a worker restarted meanwhile gets it in its place

    def pass_on(signum: int, _frame: object) -> None:
        to_dump[:] = range(len(workers))

    # Before the first fork: a SIGTERM once any worker listens must reach the workers, not end
    # the supervisor alone and leave them running.
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGUSR1, pass_on)
    for _ in range(settings.proxy.workers):
        if not stopping:
            workers.append(start())
    started_at = {w.pid: time.monotonic() for w in workers}
    born = {w.pid: time.time() for w in workers}  # the same, on the clock file times are read with
    log.info(json.dumps({"event": "supervising", "workers": [w.pid for w in workers], "pid": os.getpid()}))
    status = 0
    while not (stopping and not any(w.is_alive() for w in workers)):
        time.sleep(0.2)
        if to_dump:
            dump = workers[to_dump.pop(0)]
            if dump.is_alive() and dump.pid is not None:
                # Python's own text follows (faulthandler writes it even while the worker's loop is blocked).
                log.warning(json.dumps({"event": "stacks", "pid": dump.pid}))
                os.kill(dump.pid, signal.SIGUSR1)
        if stopping:
            for w in workers:
                if w.pid not in told:
                    _tell_to_stop(w, told)
            if time.monotonic() > stop_deadline:
                for w in workers:
                    if w.is_alive():
                        _kill_stuck(w, "shutdown_stuck", time.monotonic() - stop_deadline + KILL_AFTER)
                        status = 1
            continue
        for w in workers:
            silent = _silent_for(metrics_dir, w, born[w.pid])
            if silent is not None and silent > settings.proxy.worker_timeout:
                _kill_stuck(w, "unresponsive", silent)  # and restarted below, as any worker that died
                killed.add(w.pid)
        for i, w in enumerate(workers):
            if w.is_alive():
                continue
            log.error(json.dumps({"event": "worker_exited", "pid": w.pid, "exitcode": w.exitcode}))
            if time.monotonic() - started_at.get(w.pid, 0.0) < 5 and w.pid not in killed:
                # Dying right after start means it cannot start (port, store): give up.
                status = 1
                forward(signal.SIGTERM, None)
                break
            workers[i] = start()
            started_at[workers[i].pid] = time.monotonic()
            born[workers[i].pid] = time.time()
    # Stopped: as in a worker, a stop signal from now on changes nothing (at its exit the interpreter
    # puts back the default action of a signal it handles, but leaves an ignored one ignored).
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    for w in workers:
        w.join()
        if w.exitcode and not status:
            status = 1
    shutil.rmtree(metrics_dir, ignore_errors=True)
    return status


def _tell_to_stop(worker: multiprocessing.process.BaseProcess, told: set[int]) -> None:
    """SIGTERM to a live worker, noted in ``told``."""
    if worker.is_alive() and worker.pid is not None:
        # Gone all the same when this handler ran inside the main loop's own wait for that worker
        # (which reaped it before noting so): nothing left to tell.
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, signal.SIGTERM)
        told.add(worker.pid)


def _silent_for(metrics_dir: Path, worker: multiprocessing.process.BaseProcess, born: float) -> float | None:
    """Seconds since a live worker's last heartbeat (its metrics snapshot); None before its first one.

    ``born``: when it was started (epoch seconds): a snapshot older than that is a dead worker's
    whose pid this one now has.
    """
    if not worker.is_alive():
        return None
    try:
        beat = (metrics_dir / f"{worker.pid}.json").stat().st_mtime
    except OSError:
        return None  # still starting
    return None if beat < born else time.time() - beat


def _kill_stuck(worker: multiprocessing.process.BaseProcess, reason: str, seconds: float) -> None:
    """Dump a stuck worker's stacks to the log, then SIGKILL it."""
    assert worker.pid is not None
    log.error(json.dumps({"event": "worker_killed", "pid": worker.pid, "reason": reason,
                          "seconds": round(seconds, 1)}))
    with contextlib.suppress(ProcessLookupError):
        os.kill(worker.pid, signal.SIGUSR1)
    worker.join(DUMP_WAIT)
    if worker.is_alive():  # not once it has been reaped: its pid may be another process's by now
        worker.kill()
    worker.join(5)


def serve(settings: Settings) -> int:
    configure_logs(settings)
    warn_if_exposed(settings)
    # `keygate serve` loads its settings with serving=True, which reports these before; this is for other callers.
    problems = serving_problems(settings.model_dump())
    for problem in problems:
        log.error(json.dumps({"event": "startup_failed", "error": problem}))
    if problems:
        return 2
    if settings.proxy.workers > 1:
        return supervise(settings)
    dump_stacks_on_signal()
    return run_worker(settings)
