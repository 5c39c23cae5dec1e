"""A TCP proxy on 127.0.0.1 that adds one-way delay and a bandwidth limit.

This machine's kernel has no netem qdisc, so a WAN link is simulated in user
space: every chunk that enters one side leaves the other side after it has
been serialised onto a link of `mbit` Mbit/s (one queue per direction) and
has then travelled `rtt_ms / 2`. gRPC's HTTP/2 runs through it unchanged.
"""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass


@dataclass
class Link:
    rtt_ms: float
    mbit: float

    @property
    def one_way(self) -> float:
        return self.rtt_ms / 2000.0

    @property
    def bytes_per_second(self) -> float:
        return self.mbit * 1e6 / 8


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: Link) -> None:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    async def receive() -> None:
        link_free = 0.0
        try:
            while data := await reader.read(1 << 16):
                # When this chunk has left the sender's end of the link, and when it arrives.
                done = max(loop.time(), link_free) + len(data) / link.bytes_per_second
                link_free = done
                await queue.put((done + link.one_way, data))
        finally:
            await queue.put(None)  # a reset connection closes the other side too

    async def deliver() -> None:
        while (item := await queue.get()) is not None:
            at, data = item
            delay = at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            writer.write(data)
            await writer.drain()
        writer.close()

    await asyncio.gather(receive(), deliver(), return_exceptions=True)


class DelayProxy:
    """Listens on 127.0.0.1:<port> and forwards to `target` through a simulated link."""

    def __init__(self, target: str, link: Link) -> None:
        self.target_host, port = target.rsplit(":", 1)
        self.target_port = int(port)
        self.link = link
        self.loop = asyncio.new_event_loop()
        self._connections: set[asyncio.Task] = set()   # one per proxied connection, for cut()
        self.ready = threading.Event()
        self.port = 0
        self.thread = threading.Thread(target=self._run, name="delay-proxy", daemon=True)
        self.thread.start()
        if not self.ready.wait(10):
            raise RuntimeError("the delay proxy did not start")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def handle(reader, writer) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._connections.add(task)
            up_w = None
            try:
                up_r, up_w = await asyncio.open_connection(self.target_host, self.target_port)
                await asyncio.gather(_pipe(reader, up_w, self.link), _pipe(up_r, writer, self.link))
            except (asyncio.CancelledError, OSError):
                # Proxy shutting down, its connections cut, or the target went away: both sides close.
                writer.close()
                if up_w is not None:
                    up_w.close()
            finally:
                self._connections.discard(task)

        async def main() -> None:
            self._stop = asyncio.Event()
            server = await asyncio.start_server(handle, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            self.ready.set()
            try:
                await self._stop.wait()
            finally:
                server.close()
                others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
                for t in others:
                    t.cancel()
                await asyncio.gather(*others, return_exceptions=True)

        self.loop.run_until_complete(main())
        self.loop.close()

    def cut(self) -> None:
        """Reset every connection through the proxy now, as a link that drops would; new ones still pass."""
        def cancel() -> None:
            for task in list(self._connections):
                task.cancel()

        self.loop.call_soon_threadsafe(cancel)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(5)

    def __enter__(self) -> DelayProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
