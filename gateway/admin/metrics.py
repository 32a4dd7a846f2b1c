"""``/metrics``: Prometheus text, read at scrape time from the plain counters the runtime keeps.

The request path only bumps ints and observes :class:`gateway.dataplane.latency.Histogram`
buckets; a scrape turns a *snapshot* of them into metric families. With
``--workers N`` every worker publishes its snapshot to a per-run directory
once a second, and whichever worker answers a scrape first publishes its own
live snapshot, then sums it with the others' files, so every scrape shows the
whole process group (other workers' numbers are at most ~1 s old). Publishing
before reading is what keeps counters monotonic across scrapes answered by
different workers: a later scrape reads every file at least as new as an
earlier one did. Counters of a worker that died stay in the sum, so totals
never go backwards; its gauges are dropped. The ``process_*`` families are
the same sums over the workers (CPU seconds, memory, open descriptors; the
earliest start time, the lowest descriptor limit), not the numbers of
whichever worker happened to answer.

No family has a key id (or anything else per key) as a label: one series per
key would grow without bound with the keys issued, and the key id of every
request is in the request records and the access log instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from .. import __version__
from ..runtime import Runtime
from ..cache.notices import PROPAGATION_BUCKETS
from ..dataplane.latency import BUCKETS
from ..dataplane.proxy import OUTCOMES, STATUS_CLASSES, Gateway
from ..pipeline.outcomes import PAST_RATE_LIMIT, Outcome, decision_of
from ..process.tasks import stop_task
from .auth import AdminAuth

log = logging.getLogger("keygate.metrics")

PUBLISH_INTERVAL = 1.0


# name -> (type, help, label names). Counters are named without "_total"; the exposition adds it.
FAMILIES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "keygate_requests": ("counter", "Proxied requests by decision (allowed, denied, failed), reason (why it was "
                         "denied or failed; empty when allowed), status class (2xx..5xx) and upstream (its name; "
                         "empty when refused before a route was chosen).", ("decision", "reason", "status", "upstream")),
    "keygate_admin_requests": ("counter", "Admin API requests by decision and reason (empty when allowed).",
                               ("decision", "reason")),
    "keygate_authz_requests": ("counter", "Decisions of the authz listener (asked by an ingress) by decision, reason, "
                               "status class and upstream, as keygate_requests.",
                               ("decision", "reason", "status", "upstream")),
    "keygate_build_info": ("gauge", "Always 1; the version label is the running Keygate's.", ("version",)),
    "keygate_token_exchanges": ("counter", "Token exchanges (POST /.well-known/keygate/token) by result: exchanged, "
                                "or the error answered (invalid_grant, invalid_request, temporarily_unavailable, ...).",
                                ("result",)),
    "keygate_leak_reports": ("counter", "Secret-scanning reports (POST /.well-known/keygate/secret-scanning): tokens "
                             "by label (true_positive, false_positive), and reports refused whole (refused).",
                             ("result",)),
    "keygate_request_duration_seconds": ("histogram", "Time the proxy spent on a request, by decision.",
                                         ("decision",)),
    "keygate_upstream_duration_seconds": ("histogram", "Time until an upstream's response headers arrived.",
                                          ("upstream",)),
    "keygate_upstream_errors": ("counter", "Failed exchanges with an upstream, by upstream and kind: connect "
                                "(refused, unreachable, not resolved), connect_timeout, tls (handshake failed), "
                                "timeout (no answer in time), disconnected (closed or reset), bad_response.",
                                ("upstream", "kind")),
    "keygate_change_propagation_seconds": ("histogram", "Seconds from a change being made (revoke, rotate, role or "
                                           "member change, ...) to this process dropping the cache entries it "
                                           "affects, by the way it came: notice (Redis) or feed (the store's change "
                                           "feed, which every change also takes).", ("via",)),
    "keygate_cache_lookups": ("counter", "Key cache lookups by layer (local, redis) and result (hit, miss; "
                              "error: Redis did not answer).", ("layer", "result")),
    "keygate_cached_keys": ("gauge", "Verified keys held in the cache, by layer.", ("layer",)),
    "keygate_argon2_verifications": ("counter", "argon2 verifications of a secret (cache misses).", ()),
    "keygate_store_reads": ("counter", "Key reads from the store (cache misses).", ()),
    "keygate_argon2_skipped": ("counter", "Cache misses for a key text this process verified before: a store "
                               "read, no argon2.", ()),
    "keygate_argon2_admitted": ("gauge", "Cache misses verifying or waiting to (at most keys.argon2.concurrency "
                                "+ keys.argon2.queue).", ()),
    "keygate_lookups_refused": ("counter", "Cache misses refused before any argon2 run: throttled (failure "
                                "limits, too_many_attempts) or shed (argon2 queue full, verification_busy).",
                                ("reason",)),
    "keygate_ratelimit_decisions": ("counter", "Rate-limit decisions: allowed or limited.", ("result",)),
    "keygate_ratelimit_degraded_decisions": (
        "counter", "Rate-limit decisions made per ratelimit.on_backend_error because Redis failed "
        "(also counted in keygate_ratelimit_decisions).", ("result",)),
    "keygate_recorder_queue_depth": ("gauge", "Request records and last-used entries waiting to be written.", ()),
    "keygate_recorder_flushed": ("counter", "Records written to the store, by kind.", ("kind",)),
    "keygate_recorder_dropped": ("counter", "Records dropped because the buffer was full or the store down.", ()),
    "keygate_recorder_failed_flushes": ("counter", "Batch writes that failed and were retried later.", ()),
    "keygate_audit_pruned": ("counter", "Audit entries deleted past audit.retention_days.", ()),
    "keygate_store_up": ("gauge", "1 if every worker can reach the store, else 0.", ()),
    "keygate_redis_up": ("gauge", "1 if every worker can reach Redis, else 0; absent without redis.url.", ()),
    "keygate_change_notices": ("counter", "Change notices published on Redis by this process's admin API, "
                               "and received from Redis.", ("direction",)),
    "keygate_change_notices_unpublished": ("counter", "Changes Redis did not take: left to the store's change "
                                           "feed.", ()),
    "keygate_ready": ("gauge", "1 if every worker is ready (not draining; store or warm cache), else 0.", ()),
    "keygate_workers": ("gauge", "Worker processes whose numbers this scrape includes.", ()),
    "keygate_webhook_deliveries": ("counter", "Webhook delivery attempts by event and result: delivered, failed "
                                   "(retried later) or abandoned (given up; kept in the store).", ("event", "result")),
    "keygate_webhook_backlog": ("gauge", "Webhook deliveries neither made nor given up (store-wide, counted "
                                "every few seconds).", ()),
    # prometheus_client's ProcessCollector, read in every worker and summed (see the module's docstring).
    "process_cpu_seconds": ("counter", "Total user and system CPU time spent in seconds.", ()),
    "process_virtual_memory_bytes": ("gauge", "Virtual memory size in bytes.", ()),
    "process_resident_memory_bytes": ("gauge", "Resident memory size in bytes.", ()),
    "process_start_time_seconds": ("gauge", "Start time of the process since unix epoch in seconds.", ()),
    "process_open_fds": ("gauge", "Number of open file descriptors.", ()),
    "process_max_fds": ("gauge", "Maximum number of open file descriptors.", ()),
}
# Histogram bucket bounds by family (BUCKETS unless named here).
_BOUNDS: dict[str, tuple[float, ...]] = {"keygate_change_propagation_seconds": PROPAGATION_BUCKETS}
_STATUS_CLASS = ("", "1xx", "2xx", "3xx", "4xx", "5xx")
_PROCESS = ProcessCollector(registry=None)
# Gauges that are true for the group only if true for every worker.
_MIN_GAUGES = frozenset({"keygate_store_up", "keygate_redis_up", "keygate_ready", "process_start_time_seconds",
                         "process_max_fds"})
# Gauges of the whole store that every worker reads: the group shows the largest
# reading (each a few seconds old at most), not their sum.
_MAX_GAUGES = frozenset({"keygate_webhook_backlog", "keygate_build_info"})

Snapshot = dict[str, Any]  # {"pid", "values": {name: [[labels..., value]]}, "histograms": {name: [[labels..., h]]}}


def snapshot(rt: Runtime, admin: AdminAuth) -> Snapshot:
    """This process's numbers now; cheap (a few dozen dict reads)."""
    gw, lookup, rec = rt.gateway, rt.authenticator.lookup, rt.recorder
    authz = rt.decider.decisions if rt.decider is not None else {}
    limited = gw.decisions.get(Outcome.RATE_LIMITED.value, 0) + admin.decisions.get(Outcome.RATE_LIMITED.value, 0) \
        + authz.get(Outcome.RATE_LIMITED.value, 0)
    passed = sum(n for o, n in gw.decisions.items() if Outcome(o) in PAST_RATE_LIMIT) + \
        admin.decisions.get(Outcome.ALLOWED.value, 0) + authz.get(Outcome.ALLOWED.value, 0)
    values: dict[str, list[list[Any]]] = {
        "keygate_requests": _request_rows(gw),
        "keygate_admin_requests": [[decision_of(Outcome(o)), _reason(Outcome(o)), n] for o, n in admin.decisions.items()],
        "keygate_authz_requests": _request_rows(rt.decider) if rt.decider is not None else [],
        "keygate_build_info": [[__version__, 1]],
        "keygate_token_exchanges": [[r, n] for r, n in (rt.well_known.exchanges if rt.well_known else {}).items()],
        "keygate_leak_reports": [[r, n] for r, n in (rt.leaks.results if rt.leaks else {}).items()],
        "keygate_upstream_errors": [[u, k, n] for (u, k), n in gw.forwarder.upstream_errors.items()],  # type: ignore[union-attr]
        "keygate_cache_lookups": [["local", "hit", rt.cache.hits], ["local", "miss", rt.cache.misses]],
        "keygate_cached_keys": [["local", len(rt.cache)]],
        "keygate_argon2_verifications": [[lookup.verifications]],
        "keygate_store_reads": [[lookup.store_reads]],
        "keygate_argon2_skipped": [[lookup.proven_hits]],
        "keygate_argon2_admitted": [[lookup.verifier.admitted]],
        "keygate_lookups_refused": [["throttled", lookup.throttled], ["shed", lookup.shed]],
        "keygate_ratelimit_decisions": [["allowed", passed], ["limited", limited]],
        "keygate_recorder_queue_depth": [[rec.pending]],
        "keygate_recorder_flushed": [["usage", rec.flushed_usage], ["request", rec.flushed_requests]],
        "keygate_recorder_dropped": [[rec.dropped]],
        "keygate_recorder_failed_flushes": [[rec.failed_flushes]],
        "keygate_audit_pruned": [[rt.pruner.pruned]],
        "keygate_store_up": [[int(rt.watcher.store_ok)]],
        "keygate_ready": [[int(rt.ready())]],
        "keygate_workers": [[1]],
        **_process_values(),
    }
    if rt.webhooks is not None:
        values["keygate_webhook_deliveries"] = [[e, r, n] for (e, r), n in rt.webhooks.results.items()]
        values["keygate_webhook_backlog"] = [[rt.webhooks.backlog]]
    for name, rows in _redis_values(rt).items():
        values.setdefault(name, []).extend(rows)
    histograms = {
        "keygate_request_duration_seconds": [[d, h.snapshot()] for d, h in gw.latency.items()],
        "keygate_upstream_duration_seconds": [[u, h.snapshot()] for u, h in gw.forwarder.upstream_latency.items()],  # type: ignore[union-attr]
        "keygate_change_propagation_seconds": [[via, h.snapshot()] for via, h in rt.propagation.items()],
    }
    return {"pid": os.getpid(), "values": values, "histograms": histograms}


def _reason(outcome: Outcome) -> str:
    """Why a request was refused or failed; empty for an allowed one (its decision says all)."""
    return "" if outcome is Outcome.ALLOWED else outcome.value


def _request_rows(gw: Gateway) -> list[list[Any]]:
    """``[decision, reason, status class, upstream, count]`` for each cell of ``gw.counts`` counted yet."""
    rows: list[list[Any]] = []
    for upstream, row in gw.counts.items():
        for cell, n in enumerate(row):
            if n:
                outcome = OUTCOMES[cell // STATUS_CLASSES]
                rows.append([decision_of(outcome), _reason(outcome), _STATUS_CLASS[cell % STATUS_CLASSES], upstream, n])
    return rows


def _process_values() -> dict[str, list[list[Any]]]:
    """This process's ``process_*`` numbers (none where the platform has no /proc)."""
    return {sample.name.removesuffix("_total"): [[sample.value]]
            for family in _PROCESS.collect() for sample in family.samples}


def _redis_values(rt: Runtime) -> dict[str, list[list[Any]]]:
    """The Redis parts' numbers: none without redis.url, so a single node shows no Redis families."""
    if rt.redis is None:
        return {}
    shared, publisher, subscriber = rt.authenticator.lookup.shared, rt.publisher, rt.subscriber
    values: dict[str, list[list[Any]]] = {
        "keygate_redis_up": [[int(rt.redis.up)]],
        "keygate_change_notices": [["published", publisher.published if publisher else 0],
                                   ["received", subscriber.received if subscriber else 0]],
        "keygate_change_notices_unpublished": [[publisher.unpublished if publisher else 0]],
    }
    if shared is not None:
        values["keygate_cache_lookups"] = [["redis", "hit", shared.hits], ["redis", "miss", shared.misses],
                                           ["redis", "error", shared.errors]]
    if rt.fallback is not None:  # ratelimit.policy = "local" never asks Redis, so it never degrades
        values["keygate_ratelimit_degraded_decisions"] = [
            ["allowed", rt.fallback.decisions - rt.fallback.limited], ["limited", rt.fallback.limited]]
    return values


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class SnapshotDir:
    """The per-run directory where workers publish their snapshots (one file per pid)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def publish(self, snap: Snapshot) -> None:
        target = self.path / f"{snap['pid']}.json"
        temporary = target.with_suffix(".tmp")
        temporary.write_text(json.dumps(snap))
        os.replace(temporary, target)  # readers never see a half-written file

    def others(self, pid: int) -> list[Snapshot]:
        found = []
        for file in self.path.glob("*.json"):
            if file.stem == str(pid):
                continue
            try:
                snap = json.loads(file.read_text())
            except (OSError, ValueError):
                continue  # removed or replaced while we read: the next scrape sees it
            if not _alive(int(snap["pid"])):
                # A dead worker's counters stay (totals never go down); its gauges are gone.
                snap["values"] = {k: v for k, v in snap["values"].items() if FAMILIES[k][0] == "counter"}
            found.append(snap)
        return found


def merge(snaps: Iterable[Snapshot]) -> tuple[dict[str, dict[tuple[str, ...], float]], dict[str, dict[tuple[str, ...], Any]]]:
    values: dict[str, dict[tuple[str, ...], float]] = {}
    histograms: dict[str, dict[tuple[str, ...], Any]] = {}
    for snap in snaps:
        for name, rows in snap["values"].items():
            family = values.setdefault(name, {})
            for *labels, value in rows:
                key = tuple(labels)
                if name in _MIN_GAUGES and key in family:
                    family[key] = min(family[key], value)
                elif name in _MAX_GAUGES and key in family:
                    family[key] = max(family[key], value)
                else:
                    family[key] = family.get(key, 0) + value
        for name, rows in snap["histograms"].items():
            family = histograms.setdefault(name, {})
            for *labels, h in rows:
                key = tuple(labels)
                if key in family:
                    total = family[key]
                    family[key] = {"counts": [a + b for a, b in zip(total["counts"], h["counts"])],
                                   "sum": total["sum"] + h["sum"]}
                else:
                    family[key] = h
    return values, histograms


class KeygateCollector(Collector):
    def __init__(self, local: Callable[[], Snapshot], peers: SnapshotDir | None = None) -> None:
        self.local = local
        self.peers = peers

    def collect(self) -> Iterator[Metric]:
        own = self.local()
        others: list[Snapshot] = []
        if self.peers is not None:
            # Publish before reading the others: our live numbers summed with a peer's file up to 1 s
            # old would make the next scrape, answered by that peer (its numbers live, ours from our
            # older file), count less than this one: a counter going backwards, which Prometheus reads
            # as a reset. With every answering worker publishing first, each scrape reads every file
            # at least as new as the scrape before it did.
            _publish(self.peers, own)
            others = self.peers.others(own["pid"])
        values, histograms = merge([own, *others])
        for name, (kind, help_text, labels) in FAMILIES.items():
            if kind == "histogram":
                family = HistogramMetricFamily(name, help_text, labels=labels)
                bounds = (*map(str, _BOUNDS.get(name, BUCKETS)), "+Inf")
                for key, h in sorted(histograms.get(name, {}).items()):
                    cumulative, buckets = 0, []
                    for bound, count in zip(bounds, h["counts"]):
                        cumulative += count
                        buckets.append((bound, cumulative))
                    family.add_metric(list(key), buckets, h["sum"])
            else:
                cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                family = cls(name, help_text, labels=labels)
                for key, value in sorted(values.get(name, {}).items()):
                    family.add_metric(list(key), value)
            yield family


def metrics_routes(app: web.Application, rt: Runtime, admin: AdminAuth, shared: Path | None) -> None:
    """``GET /metrics`` on ``app``; with ``shared`` (several workers) also the snapshot publisher."""
    peers = SnapshotDir(shared) if shared is not None else None
    local = lambda: snapshot(rt, admin)  # noqa: E731
    registry = CollectorRegistry(auto_describe=False)
    registry.register(KeygateCollector(local, peers))

    async def metrics(request: web.Request) -> web.Response:
        # Prometheus text 0.0.4 by default; OpenMetrics when the scraper asks for it.
        encode, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encode(registry), headers={"Content-Type": content_type})

    app.router.add_get("/metrics", metrics)
    if peers is not None:
        app.cleanup_ctx.append(lambda _app: _publisher(peers, local))


def _publish(peers: SnapshotDir, snap: Snapshot) -> None:
    try:
        peers.publish(snap)
    except OSError as exc:  # the directory went away: the group is stopping
        log.warning(json.dumps({"event": "metrics_publish_failed", "error": str(exc)}))


async def _publisher(peers: SnapshotDir, local: Callable[[], Snapshot]) -> AsyncIterator[None]:
    """Publishes this worker's snapshot every second while the admin app runs, and once at the end."""

    async def run() -> None:
        while True:
            _publish(peers, local())
            await asyncio.sleep(PUBLISH_INTERVAL)

    task = asyncio.create_task(run(), name="keygate-metrics-publisher")
    yield
    await stop_task(task)
    with contextlib.suppress(OSError):
        peers.publish(local())
