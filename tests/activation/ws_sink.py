"""A websocket endpoint for ansible-rulebook's event log: ``python ws_sink.py OUT``.

Listens on 127.0.0.1 (a free port), writes ``PORT`` to ``OUT.port`` once listening,
then appends every message it receives to ``OUT`` as one JSON line. Runs until it
gets SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

from websockets.asyncio.server import ServerConnection, serve


async def main(out: Path) -> None:
    async def handler(connection: ServerConnection) -> None:
        async for message in connection:
            data: Any = json.loads(message)
            with out.open("a") as f:
                f.write(json.dumps(data) + "\n")

    stop = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set_result, None)
    async with serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        tmp = out.with_suffix(".port.tmp")
        tmp.write_text(str(port))
        tmp.rename(out.with_suffix(".port"))
        await stop


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
