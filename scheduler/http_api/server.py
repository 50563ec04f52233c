"""The HTTP endpoint: an aiohttp application in torpord's event loop.

Every request goes through `SchedulerService.generate`, the path of `Scheduler.Generate`:
the same controller, queues, leases and metrics. A request for a suspended model waits
while the model is restored, then is served. A client that disconnects cancels its request
(aiohttp's handler cancellation), which frees its place in the queue or its slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from torpor.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    TorporError,
    Unauthenticated,
)
from torpor.log import get_logger
from torpor.scheduler.auth import AUTH_HEADER, Tokens, bearer_token, load_tokens
from torpor.scheduler.http_api import replies, schema
from torpor.scheduler.http_api.models import model_list

if TYPE_CHECKING:
    from torpor.scheduler.api import SchedulerService
    from torpor.scheduler.controller import Controller
    from torpor.scheduler.daemon_config import DaemonSection
    from torpor.scheduler.metrics import Metrics

_log = get_logger("torpor.http")
MAX_BODY_BYTES = 8 << 20
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HttpApi:
    """The OpenAI-compatible API on one TCP address; `start` binds, `stop` closes."""

    def __init__(
        self,
        host: str,
        port: int,
        scheduler: SchedulerService,
        controller: Controller,
        *,
        keys: Tokens | None = None,
        timeout_s: float = 600.0,
        drain_timeout_s: float = 30.0,
        metrics: Metrics | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.scheduler = scheduler
        self.controller = controller
        self.keys = keys
        self.timeout_s = timeout_s
        self.drain_timeout_s = drain_timeout_s
        self.metrics = metrics
        self._runner: web.AppRunner | None = None

    @classmethod
    def from_config(
        cls,
        cfg: DaemonSection,
        scheduler: SchedulerService,
        controller: Controller,
        metrics: Metrics | None,
    ) -> HttpApi:
        host, _, port = cfg.http_listen.rpartition(":")
        keys = Tokens(load_tokens(cfg.api_keys_file)) if cfg.api_keys_file else None
        return cls(
            host.strip("[]"),
            int(port),
            scheduler,
            controller,
            keys=keys,
            timeout_s=cfg.http_timeout_s,
            drain_timeout_s=cfg.drain_timeout_s,
            metrics=metrics,
        )

    def app(self) -> web.Application:
        app = web.Application(
            middlewares=[self._observe, self._errors, self._auth], client_max_size=MAX_BODY_BYTES
        )
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        return app

    async def start(self) -> None:
        """Bind and serve; a port in use is FAILED_PRECONDITION naming the key."""
        runner = web.AppRunner(
            self.app(),
            handler_cancellation=True,
            access_log=None,
            shutdown_timeout=self.drain_timeout_s,  # on SIGTERM, requests in flight may end
        )
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise FailedPrecondition(
                f"cannot serve the HTTP API on {self.host}:{self.port}: {exc.strerror}",
                reason="LISTEN_FAILED",
                metadata={"field": "daemon.http_listen"},
            ) from None
        self._runner = runner
        _log.info("http_listening", address=self.address)

    @property
    def address(self) -> str:
        """host:port as bound (the port the OS chose, for port 0)."""
        if self._runner is None or not self._runner.addresses:
            return f"{self.host}:{self.port}"
        host, port = self._runner.addresses[0][:2]
        return f"{host}:{port}"

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    # -- middleware --------------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every error in OpenAI's JSON shape, with the status of errors.WIRE."""
        try:
            return await handler(request)
        except TorporError as err:
            return _error_response(err)
        except web.HTTPException as exc:
            mapped: TorporError = (
                NotFound(f"no route {request.path}", reason="NO_ROUTE")
                if exc.status == 404
                else InvalidArgument(exc.text or exc.reason, reason="BAD_HTTP_REQUEST")
            )
            response = _error_response(mapped)
            response.set_status(exc.status)
            return response

    @web.middleware
    async def _observe(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Metrics by endpoint and status; a log line per request."""
        start = time.perf_counter()
        status = 499  # the client went away before an answer
        try:
            response = await handler(request)
            status = response.status
            return response
        finally:
            seconds = time.perf_counter() - start
            resource = request.match_info.route.resource
            endpoint = resource.canonical if resource is not None else "other"
            if self.metrics is not None:
                self.metrics.http_request(endpoint, status, seconds)
            _log.info(
                "http_request",
                endpoint=endpoint,
                status=status,
                seconds=round(seconds, 4),
                **request.get("log", {}),
            )

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self.keys is not None:
            key = bearer_token([(AUTH_HEADER, request.headers.get(AUTH_HEADER))])
            if key is None or self.keys.check(key) is None:
                raise Unauthenticated(
                    "a valid API key is required: Authorization: Bearer <key>",
                    reason="BAD_API_KEY",
                )
        return await handler(request)

    # -- endpoints ---------------------------------------------------------------------------

    async def _models(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(model_list(self.scheduler.models, self.controller))

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        asked = schema.completion(await _body(request))
        rid = f"cmpl-{uuid.uuid4().hex}"
        request["log"] = {"model": asked.model, "user": asked.user or None, "id": rid}
        top = asked.top_logprobs if asked.logprobs else None
        if asked.stream:
            return await self._stream_completions(request, rid, asked, top)
        choices = await self._run_all(asked)
        self._log_usage(request, choices[0].usage)
        return web.json_response(replies.completion(rid, asked.model, choices, top))

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        asked, messages = schema.chat(await _body(request))
        chat = asked.requests[0].prompt_chat
        for role, content in messages:
            chat.messages.add(role=role, content=content)
        chat.add_generation_prompt = True
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        request["log"] = {"model": asked.model, "user": asked.user or None, "id": rid}
        if asked.stream:
            return await self._stream_chat(request, rid, asked)
        (choice,) = await self._run_all(asked)
        self._log_usage(request, choice.usage)
        return web.json_response(replies.chat(rid, asked.model, choice, asked.logprobs))

    # -- running -----------------------------------------------------------------------------

    def _deadline(self) -> float:
        return self.controller.clock() + self.timeout_s

    async def _run_all(self, asked: schema.Completion) -> list[replies.Choice]:
        """Every prompt of the request, at once; the first error fails the whole request
        (and cancels the others)."""

        async def one(index: int, generate: Any) -> replies.Choice:
            choice = replies.Choice(index)
            chunks = self.scheduler.generate(generate, self._deadline())
            async with contextlib.aclosing(chunks):  # type: ignore[type-var]
                async for chunk in chunks:
                    choice.add(chunk)
            return choice

        tasks = [asyncio.ensure_future(one(i, r)) for i, r in enumerate(asked.requests)]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()

    async def _stream_completions(
        self, request: web.Request, rid: str, asked: schema.Completion, top: int | None
    ) -> web.StreamResponse:
        def render(index: int, chunk: Any) -> Any:
            return replies.completion_chunk(rid, asked.model, index, chunk, top)

        return await self._stream(request, rid, asked, "text_completion", render, [])

    async def _stream_chat(
        self, request: web.Request, rid: str, asked: schema.Completion
    ) -> web.StreamResponse:
        def render(index: int, chunk: Any) -> Any:
            return replies.chat_chunk(rid, asked.model, chunk, asked.logprobs)

        role = replies.chat_chunk(rid, asked.model, None, False, first=True)
        return await self._stream(request, rid, asked, "chat.completion.chunk", render, [role])

    async def _stream(
        self,
        request: web.Request,
        rid: str,
        asked: schema.Completion,
        kind: str,
        render: Callable[[int, Any], Any],
        opening: list[Any],
    ) -> web.StreamResponse:
        """Server-sent events of every prompt's generation: `opening`, then each chunk as
        `render` shapes it, the usage if asked, and `[DONE]`. An error before the first token
        gets its HTTP status; one after the headers is an error event."""
        streams = [_Started(self.scheduler.generate(r, self._deadline())) for r in asked.requests]
        pumps: list[asyncio.Task[None]] = []
        try:
            await _first_of_each(streams)
            response = await _open_stream(request)
            for doc in opening:
                await response.write(replies.event(doc))
            choices = [replies.Choice(i) for i in range(len(streams))]
            queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
            pumps = [asyncio.create_task(_pump(i, s, queue)) for i, s in enumerate(streams)]
            ended = 0
            while ended < len(streams):
                index, item = await queue.get()
                if item is _END:
                    ended += 1
                    continue
                if isinstance(item, TorporError):
                    await response.write(replies.event(replies.error(item)[1]))
                    break
                choices[index].add(item)
                await response.write(replies.event(render(index, item)))
            else:
                if asked.include_usage:
                    usage = replies.usage_chunk(rid, asked.model, kind, choices)
                    await response.write(replies.event(usage))
                self._log_usage(request, choices[0].usage)
            await response.write(replies.DONE)
            return response
        finally:
            for pump in pumps:
                pump.cancel()
            # A generator a pump is still iterating cannot be closed from here: let the
            # pumps end (their cancellation closes it), then close what is left.
            await asyncio.gather(*pumps, return_exceptions=True)
            for s in streams:
                await s.aclose()

    def _log_usage(self, request: web.Request, usage: Any) -> None:
        ext = replies.extension(usage)
        if ext is not None:
            request["log"].update(restored_from=ext["restored_from"], **ext["timings"])


class _Started:
    """A generation whose first chunk is awaited before the response starts, so that an
    error before it (unknown model, full queue, a failed restore) gets its HTTP status."""

    def __init__(self, chunks: AsyncIterator[Any]) -> None:
        self._chunks = chunks
        self._first: list[Any] = []

    async def first(self) -> None:
        self._first.append(await anext(self._chunks))

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        while self._first:
            yield self._first.pop()
        async for chunk in self._chunks:
            yield chunk

    async def aclose(self) -> None:
        await self._chunks.aclose()  # type: ignore[attr-defined]


_END = object()


async def _first_of_each(streams: list[_Started]) -> None:
    """Wait for every stream's first chunk; on the first error, stop waiting for the rest
    (so that each can be closed) and raise it."""
    tasks = [asyncio.create_task(s.first()) for s in streams]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _pump(index: int, chunks: _Started, queue: asyncio.Queue[Any]) -> None:
    """Chunks of one prompt onto the shared queue, then the end (or the error)."""
    try:
        async for chunk in chunks:
            await queue.put((index, chunk))
    except TorporError as err:
        await queue.put((index, err))
    await queue.put((index, _END))


async def _open_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    return response


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json(loads=json.loads)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidArgument("the body is not JSON", reason="BAD_JSON") from None
    if not isinstance(body, dict):
        raise InvalidArgument("the body must be a JSON object", reason="BAD_JSON")
    return body


def _error_response(err: TorporError) -> web.Response:
    status, body = replies.error(err)
    headers = {"Retry-After": "1"} if status == 429 else None
    return web.json_response(body, status=status, headers=headers)
