"""A small HTTP service that runs playbooks through runner_spawn.aio (standard library only).

Run it, with runner-spawn and ansible-core installed (``pip install -e ".[examples]"``),
on an ansible-runner private_data_dir (``project/`` with playbooks, ``inventory/``)::

    python examples/http_service.py --private-data-dir ./demo --port 8080

Try it with curl::

    # Start site.yml and follow its events (server-sent events). The first
    # message names the job; the last ("end") carries its status and rc.
    curl -N -X POST localhost:8080/jobs -d '{"playbook": "site.yml"}'

    # From another terminal: cancel it. The answer comes once the job has stopped.
    curl -X DELETE localhost:8080/jobs/<id>

    # Every job and its status.
    curl localhost:8080/jobs

``POST /jobs`` takes a JSON object: ``playbook`` (a file under ``project/``), and
optionally ``extravars`` (an object) and ``limit`` (a host pattern). Each job
writes its artifacts to ``artifacts/<id>/``. A client that disconnects from its
event stream cancels its job, as does stopping the service (Ctrl-C, SIGTERM). It speaks
one request per connection and has no authentication: keep it on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import os
import signal
import uuid
from dataclasses import dataclass, field
from typing import Any

from runner_spawn import aio

MAX_BODY = 1 << 20
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 413: "Payload Too Large"}


class HTTPError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Job:
    id: str
    events: aio.EventStream
    task: asyncio.Task[None] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        status = self.events.status
        if status is None and self.task is not None and self.task.done():
            status = "canceled"  # cancelled while still queued: never started
        return {"id": self.id, "status": status or "pending", "rc": self.events.rc, **self.info}


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


async def read_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Request:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
        raise HTTPError(400, "malformed request head") from e
    lines = head.decode("latin-1").split("\r\n")
    try:
        method, target, _version = lines[0].split(" ", 2)
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if line)}
        length = int(headers.get("content-length", "0"))
    except ValueError as e:
        raise HTTPError(400, "malformed request head") from e
    if length > MAX_BODY:
        raise HTTPError(413, "request body too large")
    if length and headers.get("expect", "").lower() == "100-continue":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    body = await reader.readexactly(length) if length else b""
    return Request(method.upper(), target.split("?", 1)[0], headers, body)


def respond(writer: asyncio.StreamWriter, code: int, payload: Any) -> None:
    body = (json.dumps(payload) + "\n").encode()
    writer.write(
        f"HTTP/1.1 {code} {REASONS.get(code, '')}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )


def sse(writer: asyncio.StreamWriter, name: str, data: Any, event_id: Any = None) -> None:
    """One server-sent event; JSON data on a single line."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    writer.write(f"{head}event: {name}\ndata: {json.dumps(data)}\n\n".encode())


class Service:
    """Starts, streams and cancels jobs in one private_data_dir."""

    def __init__(self, private_data_dir: str, executor: concurrent.futures.Executor | None = None) -> None:
        self.private_data_dir = os.path.abspath(private_data_dir)
        self.executor = executor
        self.jobs: dict[str, Job] = {}
        self.handlers: set[asyncio.Task[Any]] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self.handlers.add(task)
            task.add_done_callback(self.handlers.discard)
        try:
            req = await read_request(reader, writer)
            parts = [p for p in req.path.split("/") if p]
            if parts == ["jobs"] and req.method == "POST":
                await self.start_job(req, reader, writer)
            elif parts == ["jobs"] and req.method == "GET":
                respond(writer, 200, [job.summary() for job in self.jobs.values()])
            elif len(parts) == 2 and parts[0] == "jobs":
                job = self.jobs.get(parts[1])
                if job is None:
                    raise HTTPError(404, f"no job {parts[1]}")
                if req.method == "DELETE":
                    await self.cancel_job(job)
                elif req.method != "GET":
                    raise HTTPError(405, "use GET or DELETE")
                respond(writer, 200, job.summary())
            else:
                raise HTTPError(404, "try POST /jobs, GET /jobs, GET or DELETE /jobs/<id>")
        except HTTPError as e:
            respond(writer, e.code, {"error": str(e)})
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away
        finally:
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def job_arguments(self, body: bytes) -> dict[str, Any]:
        """ansible_runner.run() arguments from a POST body; only a few, checked."""
        try:
            spec = json.loads(body or b"{}")
        except ValueError as e:
            raise HTTPError(400, f"body is not JSON: {e}") from e
        playbook = spec.get("playbook") if isinstance(spec, dict) else None
        if not isinstance(playbook, str) or os.path.isabs(playbook) or ".." in playbook.split("/"):
            raise HTTPError(400, 'give "playbook": a file name under project/')
        if not os.path.isfile(os.path.join(self.private_data_dir, "project", playbook)):
            raise HTTPError(404, f"no playbook project/{playbook}")
        kwargs: dict[str, Any] = {"playbook": playbook}
        if isinstance(spec.get("extravars"), dict):
            kwargs["extravars"] = spec["extravars"]
        if isinstance(spec.get("limit"), str):
            kwargs["limit"] = spec["limit"]
        return kwargs

    async def start_job(self, req: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        kwargs = self.job_arguments(req.body)
        job_id = uuid.uuid4().hex[:12]
        events = aio.stream(
            private_data_dir=self.private_data_dir,
            ident=job_id,
            quiet=True,
            suppress_env_files=True,  # jobs share the directory: keep their extravars off disk
            executor=self.executor,
            **kwargs,
        )
        job = Job(job_id, events, info={"playbook": kwargs["playbook"]})
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Cache-Control: no-cache\r\nConnection: close\r\n\r\n"
        )
        sse(writer, "job", {"id": job_id})
        job.task = asyncio.create_task(self.forward_events(job, writer))
        self.jobs[job_id] = job
        hangup = asyncio.create_task(_until_hangup(reader))
        try:
            await asyncio.wait({job.task, hangup}, return_when=asyncio.FIRST_COMPLETED)
            if not job.task.done():
                job.task.cancel()  # the client is gone: nobody wants this job any more
            await asyncio.wait({job.task})
        finally:
            hangup.cancel()
            if not job.task.done():  # this handler was cancelled (the service is stopping)
                job.task.cancel()
                await asyncio.wait({job.task})
        if not job.task.cancelled() and job.task.exception() is not None:
            sse(writer, "error", {"id": job_id, "error": repr(job.task.exception())})
        sse(writer, "end", job.summary())

    async def forward_events(self, job: Job, writer: asyncio.StreamWriter) -> None:
        async with job.events as events:
            async for event in events:
                sse(writer, event["event"], event, event.get("counter"))
                await writer.drain()  # a slow client slows the job; nothing is dropped

    async def cancel_job(self, job: Job) -> None:
        """Cancel the task that streams the job, and wait until the job has stopped."""
        if job.task is not None and not job.task.done():
            job.task.cancel()
            await asyncio.wait({job.task})

    async def close(self) -> None:
        """Cancel every running job, wait until they have stopped and their clients are told."""
        running = {job.task for job in self.jobs.values() if job.task is not None and not job.task.done()}
        for task in running:
            task.cancel()
        if running:
            await asyncio.wait(running)
        if self.handlers:
            await asyncio.wait(set(self.handlers), timeout=5)


def _set_once(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def _until_hangup(reader: asyncio.StreamReader) -> None:
    with contextlib.suppress(ConnectionError):
        while await reader.read(1024):
            pass


async def start_server(
    private_data_dir: str,
    host: str = "127.0.0.1",
    port: int = 8080,
    executor: concurrent.futures.Executor | None = None,
) -> tuple[asyncio.AbstractServer, Service]:
    """Listen on ``host``:``port`` (0: any free port) and serve jobs in ``private_data_dir``."""
    service = Service(private_data_dir, executor)
    server = await asyncio.start_server(service.handle, host, port)
    return server, service


async def serve(private_data_dir: str, host: str, port: int, max_jobs: int) -> None:
    with concurrent.futures.ThreadPoolExecutor(max_jobs, thread_name_prefix="job") as executor:
        server, service = await start_server(private_data_dir, host, port, executor)
        for sock in getattr(server, "sockets", ()):
            print(f"listening on http://{sock.getsockname()[0]}:{sock.getsockname()[1]}/jobs", flush=True)
        loop = asyncio.get_running_loop()
        stop = loop.create_future()
        for sig in (signal.SIGINT, signal.SIGTERM):  # stop cleanly: cancel the jobs, then exit
            loop.add_signal_handler(sig, _set_once, stop)
        try:
            await stop
        finally:
            # Jobs first: on 3.12+ wait_closed() waits for every open connection.
            server.close()
            await service.close()
            await server.wait_closed()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--private-data-dir", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--max-jobs", type=int, default=16, help="jobs running at once; more wait in line")
    args = parser.parse_args()
    asyncio.run(serve(args.private_data_dir, args.host, args.port, args.max_jobs))


if __name__ == "__main__":
    main()
