"""Open N keep-alive TLS connections to a proxy and hold them idle.

Run as `python -m bench.idle PORT N`: each connection does a TLS 1.3 handshake and one
`GET /small` (so it is a real keep-alive connection the proxy has served), then stays
open.  Prints `READY <opened>` once all are open, holds them until stdin closes or a line
arrives, then closes them.  A separate process so its descriptors and CPU are its own.
"""

from __future__ import annotations

import asyncio
import resource
import ssl
import sys

REQUEST = b"GET /small HTTP/1.1\r\nHost: proxy.test\r\n\r\n"


def raise_nofile(want: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(want, soft)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def _open_one(port: int, ctx: ssl.SSLContext, sem: asyncio.Semaphore,
                    held: list[asyncio.StreamWriter]) -> bool:
    async with sem:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port, ssl=ctx,
                                        server_hostname="proxy.test"), 30)
            writer.write(REQUEST)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await asyncio.wait_for(reader.readexactly(length), 30)
            if not head.startswith(b"HTTP/1.1 200"):
                writer.close()
                return False
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ssl.SSLError):
            return False
        held.append(writer)
        return True


async def main(port: int, count: int, parallel: int = 200) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    sem = asyncio.Semaphore(parallel)
    held: list[asyncio.StreamWriter] = []
    results = await asyncio.gather(*(_open_one(port, ctx, sem, held) for _ in range(count)))
    print(f"READY {sum(results)}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    for writer in held:
        writer.transport.abort()


if __name__ == "__main__":
    raise_nofile(int(sys.argv[2]) + 100)
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
