"""examples/http_service.py on 127.0.0.1: one playbook streamed to the end, one cancelled by DELETE."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import runner_spawn
from tests import procs
from tests.conftest import JobDir

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "http_service.py"

OK_PLAYBOOK = """
- hosts: all
  gather_facts: false
  tasks:
    - debug: msg=hello
"""

NAP_PLAYBOOK = """
- hosts: all
  gather_facts: false
  tasks:
    - command: sleep 30
"""


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("http_service_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


@pytest.fixture
def example() -> Any:
    was_installed = runner_spawn.is_installed()
    yield load_example()
    if not was_installed:
        runner_spawn.uninstall()


class Client:
    """One connection per request, as the service speaks; all closed at the end."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.writers: list[asyncio.StreamWriter] = []

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, asyncio.StreamReader]:
        """Send one request; return the status code and a reader positioned at the body."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writers.append(writer)  # dropping it would close the connection (and cancel a job)
        writer.write(f"{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        return int(head.split(b" ", 2)[1]), reader

    async def close(self) -> None:
        for writer in self.writers:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def server_sent_events(reader: asyncio.StreamReader) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """(event name, data) for each server-sent event until the server closes the stream."""
    name, data = "", ""
    while line := (await reader.readline()).decode():
        line = line.rstrip("\n")
        if line.startswith("event: "):
            name = line[len("event: ") :]
        elif line.startswith("data: "):
            data = line[len("data: ") :]
        elif not line and name:
            yield name, json.loads(data)
            name, data = "", ""


def test_http_service_streams_one_job_and_cancels_another(job_dir: JobDir, example: Any) -> None:
    pdd = job_dir(OK_PLAYBOOK, extra_files={"project/nap.yml": NAP_PLAYBOOK})
    before = procs.descendants()

    async def main() -> None:
        server, service = await example.start_server(str(pdd), "127.0.0.1", 0)
        client = Client(server.sockets[0].getsockname()[1])
        http = client.request
        try:
            # A playbook streamed from start to end.
            code, reader = await http("POST", "/jobs", b'{"playbook": "site.yml"}')
            assert code == 200
            got = [ev async for ev in server_sent_events(reader)]
            assert got[0][0] == "job" and got[-1][0] == "end"
            job_id = got[0][1]["id"]
            assert got[-1][1] == {"id": job_id, "status": "successful", "rc": 0, "playbook": "site.yml"}
            files = (pdd / "artifacts" / job_id / "job_events").glob("*.json")
            on_disk = sorted((json.loads(f.read_text()) for f in files), key=lambda e: e["counter"])
            assert [data["uuid"] for _, data in got[1:-1]] == [e["uuid"] for e in on_disk]

            # A playbook cancelled with DELETE while its task runs.
            code, reader = await http("POST", "/jobs", b'{"playbook": "nap.yml"}')
            assert code == 200
            events = server_sent_events(reader)
            name, data = await events.__anext__()
            assert name == "job"
            job_id = data["id"]
            async for name, _ in events:
                if name == "runner_on_start":
                    break
            for _ in range(600):  # until the task's process runs
                if any(cmdline(p) == "sleep 30" for p in new_processes(before)):
                    break
                await asyncio.sleep(0.05)
            code, body = await http("DELETE", f"/jobs/{job_id}")
            assert code == 200
            assert json.loads(await body.read())["status"] == "canceled"
            assert new_processes(before) == {}  # DELETE answers once the job has stopped
            rest = [ev async for ev in events]
            assert rest[-1] == ("end", {"id": job_id, "status": "canceled", "rc": 254, "playbook": "nap.yml"})

            code, body = await http("GET", "/jobs")
            assert code == 200
            assert [job["status"] for job in json.loads(await body.read())] == ["successful", "canceled"]
        finally:
            await client.close()
            server.close()
            await service.close()
            await server.wait_closed()

    asyncio.run(asyncio.wait_for(main(), 90))


def new_processes(before: dict[int, int]) -> dict[int, int]:
    return {p: s for p, s in procs.descendants().items() if p not in before}


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ").strip()
    except OSError:
        return ""
