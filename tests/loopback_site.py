"""An aiohttp application on 127.0.0.1 that a test can take offline and back on the same port:
the base of the stand-ins for servers that cannot run here (an OpenID issuer's keys, GitHub's)."""

from __future__ import annotations

from typing import Self

from aiohttp import web


class LoopbackSite:
    """Serves :meth:`app` on 127.0.0.1 (a free port, kept across :meth:`go_offline` / :meth:`go_online`)."""

    def __init__(self) -> None:
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self.port = 0

    def app(self) -> web.Application:
        raise NotImplementedError

    async def start(self) -> Self:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        await self.go_online()
        return self

    async def go_online(self) -> None:
        """Listen (again, on the same port after go_offline); nothing to do when listening."""
        assert self._runner is not None
        if self._site is not None:
            return
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await self._site.start()
        if not self.port:
            self.port = self._runner.addresses[0][1]

    async def go_offline(self) -> None:
        """Stop listening and drop the open connections (the clients' kept-alive ones too): refused."""
        if self._site is not None:
            await self._site.stop()
            self._site = None
        if self._runner is not None and self._runner.server is not None:
            for connection in self._runner.server.connections:
                connection.force_close()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
