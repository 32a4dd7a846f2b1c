"""Wiring: builds every resource from the settings, each with one owner and one lifetime.

:func:`runtime` is an async context manager that opens the store, Redis
(when configured), the HTTP client session, the recorder, the change
watcher, the change subscriber, the audit pruner and the webhook deliverer in order and closes them
in reverse, flushing the recorder before the store closes. The admin
listener's app is :mod:`gateway.admin.listener`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field


from .manage.audit import AuditPruner, utcnow
from .cache.local import KeyCache
from .config.schema import Settings
from .dataplane.forward import Forwarder
from .dataplane.tunnels import TunnelGuard
from .cache.change_feed import ChangeWatcher
from .keys import KeyParser
from .cache.notices import PROPAGATION_BUCKETS, ChangePublisher, ChangeSubscriber
from .dataplane.latency import Histogram
from .pipeline.client_ip import ClientIpResolver
from .pipeline.failures import FailureLimiter
from .pipeline.authenticate import Authenticator
from .pipeline.lookup import KeyLookup
from .pipeline.prepared import PreparedKey
from .pipeline.ratelimit import LocalTokenBuckets, RateLimiter
from .pipeline.ratelimit_redis import Fallback, LocalFirstBuckets, RedisTokenBuckets, SharedBuckets
from .pipeline.scope import RouteTable
from .pipeline.target import TargetCanonicalizer
from .authz.decide import Decider
from .identity.exchange import WellKnown
from .identity.jwks import SigningKeys
from .identity.verify import TokenVerifier
from .hygiene.github_keys import GitHubKeys
from .hygiene.leaks import LeakReports
from .dataplane.proxy import Gateway
from .config.ratelimit_spec import parse_rate_limit
from .recorder import Recorder
from .cache.redis_link import RedisLink
from .cache.shared import SharedKeyCache
from .manage.service import bootstrap, hasher_from, resolve_pepper
from .store import KeyStore, StoreError, StoreRefused, configured_store
from .dataplane.sweeper import Sweeper
from .hygiene.webhooks import WebhookDeliverer
from .hygiene.canary import CanaryAlarms
from .hygiene.sweeper import HygieneSweeper

log = logging.getLogger("keygate")


class StartupError(Exception):
    """Start-up cannot go on; the message is one line for the operator."""


@dataclass
class Runtime:
    settings: Settings
    store: KeyStore
    authenticator: Authenticator
    gateway: Gateway
    watcher: ChangeWatcher
    recorder: Recorder
    cache: KeyCache[PreparedKey]
    pruner: AuditPruner
    redis: RedisLink | None = None
    fallback: Fallback | None = None
    # For management actions made in this process (the admin API): publishes their changes.
    publisher: ChangePublisher | None = None
    subscriber: ChangeSubscriber | None = None
    # The authz listener's handler, when authz.listen is set.
    decider: Decider | None = None
    # Keygate's own endpoints on the proxy listener (the identity exchange).
    well_known: WellKnown | None = None
    # Delivers the webhook outbox in the background.
    webhooks: WebhookDeliverer | None = None
    hygiene: HygieneSweeper | None = None
    # GitHub's secret-scanning reports (POST /.well-known/keygate/secret-scanning), dispatched by well_known.
    leaks: LeakReports | None = None
    # Seconds from a change being made to this process dropping what it affects, by the path it came:
    # "notice" (Redis pub/sub) or "feed" (the store's change feed, which every change also takes).
    propagation: dict[str, Histogram] = field(default_factory=dict)
    draining: bool = field(default=False)

    def ready(self) -> bool:
        """Ready unless draining, and only if keys can be checked: store reachable or cache warm.

        Redis is not a condition: without it requests still flow (see README, failure behaviour).
        """
        return not self.draining and (self.watcher.store_ok or len(self.cache) > 0)

    def redis_state(self) -> str:
        return "off" if self.redis is None else ("up" if self.redis.up else "down")


async def prepare_store(store: KeyStore, settings: Settings) -> None:
    """The embedded store migrates itself; PostgreSQL must have been migrated."""
    if settings.store.url.startswith("sqlite:"):
        await bootstrap(store)
    elif await store.pending_migrations():
        raise StartupError("the store's schema is not up to date: run `keygate migrate` first")


async def rate_limiter(
    settings: Settings, link: RedisLink | None, stack: AsyncExitStack,
) -> tuple[RateLimiter, Fallback | None]:
    """The ``ratelimit.policy`` in force: per-process without Redis, else the chosen Redis policy."""
    r = settings.ratelimit
    if link is None or r.policy == "local":
        return LocalTokenBuckets(), None
    fallback = Fallback(r.on_backend_error)
    fallback.watch(link)
    shared = SharedBuckets(link)
    if r.policy == "redis":
        return RedisTokenBuckets(shared, fallback), fallback
    limiter = LocalFirstBuckets(shared, fallback, batch=r.batch, sync_interval=r.sync_interval)
    await limiter.start()
    # Closed before Redis is: unused leases go back to the global buckets.
    stack.push_async_callback(limiter.close)
    return limiter, fallback


@asynccontextmanager
async def runtime(settings: Settings, *, migrate: bool = True) -> AsyncIterator[Runtime]:
    if not settings.upstreams:
        raise StartupError("no upstreams configured: add an [[upstreams]] table (name, url) to the config")
    async with AsyncExitStack() as stack:
        store = configured_store(settings.store)
        await store.open()
        stack.push_async_callback(store.close)
        if migrate:
            await prepare_store(store, settings)
        try:
            pepper = await resolve_pepper(store, settings)
        except StoreRefused:
            raise StartupError("no pepper: keys.pepper is not set and the store holds none, and this store role "
                               "may not store one; run `keygate migrate` (it stores one) or set keys.pepper") from None

        c = settings.cache
        cache: KeyCache[PreparedKey] = KeyCache(
            ttl=c.ttl, negative_ttl=c.negative_ttl, stale_if_error=c.stale_if_error, max_entries=c.max_entries,
        )
        link: RedisLink | None = None
        shared: SharedKeyCache | None = None
        if settings.redis.enabled:
            link = RedisLink(settings.redis)
            stack.push_async_callback(link.close)
            if not await link.probe():
                # Start anyway: everything Redis does has a fallback, and the link reconnects.
                log.warning(json.dumps({"event": "redis_unavailable_at_start"}))
            shared = SharedKeyCache(link, ttl=c.ttl, negative_ttl=c.negative_ttl)
        argon2, f = settings.keys.argon2, settings.failures
        p = settings.proxy
        lookup = KeyLookup(
            store, pepper=pepper, hasher=hasher_from(settings), cache=cache,
            default_rate_limit=parse_rate_limit(settings.ratelimit.default),
            verify_concurrency=argon2.concurrency, verify_queue=argon2.queue,
            failures=FailureLimiter(per_client=f.per_client, per_network=f.per_network, per_key=f.per_key,
                                    window=f.window, verify_per_second=f.verify_per_second),
            shared=shared,
        )
        stack.callback(lookup.close)
        # Refusals are paced by how long a verification takes here; measured once before serving.
        await lookup.calibrate()

        # Every timeout of the proxy listener and its upstream connections runs on this one timer.
        sweeper = Sweeper(asyncio.get_running_loop())
        stack.callback(sweeper.close)
        # Open WebSocket tunnels are held to their keys: a change the cache hears of re-checks them.
        tunnels = TunnelGuard(cache, lookup.current)
        forwarder = Forwarder(sweeper, max_body_size=p.max_body_bytes, client_timeout=p.client_timeout,
                              tunnels=tunnels)
        stack.callback(forwarder.close)
        stack.push_async_callback(tunnels.close)

        recorder = Recorder(store, flush_interval=settings.recorder.flush_interval,
                            max_buffer=settings.recorder.max_buffer, logger=logging.getLogger("keygate.recorder"),
                            alarms=CanaryAlarms(store, settings))
        await recorder.start()
        # Registered after the forwarder, so it runs before the store closes: buffers are flushed.
        stack.push_async_callback(recorder.close)

        propagation = {"feed": Histogram(PROPAGATION_BUCKETS)}
        watcher = ChangeWatcher(store, cache, shared=shared, observe_delay=propagation["feed"].observe)
        await watcher.start()
        stack.push_async_callback(watcher.close)

        subscriber: ChangeSubscriber | None = None
        if settings.redis.enabled:
            propagation["notice"] = Histogram(PROPAGATION_BUCKETS)
            subscriber = ChangeSubscriber(settings.redis, cache, observe_delay=propagation["notice"].observe)
            await subscriber.start()
            stack.push_async_callback(subscriber.close)
            try:
                # Serve only once notices can be heard, unless Redis is down (then the feed covers).
                await asyncio.wait_for(subscriber.connected.wait(), timeout=4 * settings.redis.timeout)
            except TimeoutError:
                log.warning(json.dumps({"event": "change_notices_unavailable_at_start"}))

        limiter, fallback = await rate_limiter(settings, link, stack)

        # Every worker prunes: deletes are idempotent and batched, so they only share the work.
        pruner = AuditPruner(store, retention_days=settings.audit.retention_days,
                             interval=settings.audit.prune_interval, logger=logging.getLogger("keygate.audit"))
        if await store.may("DELETE", "audit_events"):
            await pruner.start()
            stack.push_async_callback(pruner.close)
        else:
            # The data plane's role (keygate_dataplane) may not delete history: the owner's plane prunes.
            log.info(json.dumps({"event": "audit_pruner_off", "reason": "the store role may not delete audit "
                                 "events; a gateway or job with the owner role prunes"}))

        # Every worker delivers webhooks: the outbox's leased claim gives each row to one of them at a time.
        h = settings.hygiene
        webhooks = WebhookDeliverer(store, settings.webhooks, retry_for=h.webhook_retry_for,
                                    max_backoff=h.webhook_max_backoff, clock=utcnow)
        if await store.may("UPDATE", "webhook_outbox"):
            await webhooks.start()
            stack.push_async_callback(webhooks.close)
        else:
            # The data plane's role queues events (canary alarms) but does not deliver: the owner's plane does.
            log.info(json.dumps({"event": "webhook_delivery_off", "reason": "the store role may not update the "
                                 "webhook outbox; a gateway with the owner role delivers"}))

        # Stages 1-7, one instance for every listener of this process.
        authenticator = Authenticator(
            parser=KeyParser(k.prefix for k in settings.keys.kinds.values()),
            lookup=lookup,
            client_ips=ClientIpResolver(p.trusted_proxies),
            routes=RouteTable(settings.routes, settings.upstreams),
            limiter=limiter,
            alarm=recorder.canary_used,  # canary uses: recorded off the request path, as requests are
        )
        publisher = ChangePublisher(link, shared) if link is not None and shared is not None else None
        # Idle and expiring keys: every worker sweeps; row locks make each event happen once.
        hygiene = HygieneSweeper(store, settings, notifier=publisher)
        if await store.may("UPDATE", "keys"):
            await hygiene.start()
            stack.push_async_callback(hygiene.close)
        else:
            log.info(json.dumps({"event": "hygiene_sweeper_off", "reason": "the store role may not update keys; "
                                 "a gateway with the owner role finds idle and expiring keys"}))
        # The identity exchange and self-revocation (/.well-known/keygate/...) on the proxy listener.
        e = settings.exchange
        signing_keys = SigningKeys(ttl=e.jwks_ttl, timeout=e.fetch_timeout)
        stack.push_async_callback(signing_keys.close)
        # Leak reports: GitHub's keys cached; work left after an answer is drained before the store closes.
        github_keys = GitHubKeys(settings.leaks.github_keys_url, ttl=settings.leaks.keys_ttl,
                                 timeout=settings.leaks.fetch_timeout)
        stack.push_async_callback(github_keys.close)
        leaks = LeakReports(store=store, settings=settings, lookup=lookup, parser=authenticator.parser,
                            limiter=limiter, keys=github_keys, notifier=publisher, forget_key=cache.invalidate_key,
                            clock=utcnow)
        stack.push_async_callback(leaks.close)
        well_known = WellKnown(
            store=store, settings=settings, authenticator=authenticator, verifier=TokenVerifier(signing_keys, clock=utcnow),
            limiter=limiter, notifier=publisher, forget_key=cache.invalidate_key, leaks=leaks,
        )
        gateway = Gateway(
            authenticator=authenticator,
            well_known=well_known.handle,
            forwarder=forwarder,
            recorder=recorder,
            log_requests=p.access_log,
            targets=TargetCanonicalizer(encoded_slashes=p.encoded_slashes, path_parameters=p.path_parameters),
        )
        # The authz listener: the same stages, caches and buckets, with its own trusted hops (the ingresses).
        decider = Decider(
            authenticator=authenticator.with_client_ips(ClientIpResolver(settings.authz.trusted_proxies)),
            forwarder=None, recorder=recorder, log_requests=p.access_log, targets=gateway.targets,
        ) if settings.authz.listen else None
        yield Runtime(settings=settings, store=store, authenticator=authenticator, gateway=gateway, watcher=watcher, recorder=recorder,
                      cache=cache, pruner=pruner, redis=link, fallback=fallback, subscriber=subscriber, decider=decider,
                      publisher=publisher, well_known=well_known, webhooks=webhooks, hygiene=hygiene,
                      leaks=leaks, propagation=propagation)


def warn_if_exposed(settings: Settings) -> None:
    host = settings.proxy.listen.rsplit(":", 1)[0].strip("[]")
    if host not in ("127.0.0.1", "::1", "localhost") and not settings.proxy.trusted_proxies:
        log.warning(json.dumps({
            "event": "no_trusted_proxies",
            "message": f"proxy listens on {settings.proxy.listen} with no proxy.trusted_proxies: "
                       "X-Forwarded-For is ignored and the socket peer is the client IP. If Keygate runs "
                       "behind a load balancer, set proxy.trusted_proxies to its addresses.",
        }))


__all__ = ["Runtime", "StartupError", "StoreError", "runtime", "prepare_store", "warn_if_exposed"]
