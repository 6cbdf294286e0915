"""The HTTP ingress deployment: validates, identifies and routes requests to the models.

A plain class; `serve_app.app` wraps it with `serve.ingress` and `serve.deployment`.
Serve calls `__serve_build_asgi_app__` in each replica after `__init__`, so the FastAPI
app is built per replica around that replica's handles.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.metadata
import logging
import time
from collections.abc import Mapping, Sequence

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.serve.schema import DeploymentStatus, ReplicaState

from deployments.protocol import SequenceDelta
from deployments.settings import get_settings
from serve_app import streaming
from serve_app.access import AccessControl, AccessMiddleware, build_access_control
from serve_app.args import AuthArgs, IngressArgs, RateLimitArgs
from serve_app.errors import ModelNotFoundError, ServiceError, install_error_handlers
from serve_app.guards import RequestGuardMiddleware, request_deadline_s
from serve_app.openai_api import add_openai_routes
from serve_app.tokenizer_api import add_tokenizer_routes
from serve_app.request_context import RequestContextMiddleware
from serve_app.schemas import ErrorResponse, GeneratedTokenLogprob, GenerateRequest, GenerateResponse, Usage

logger = logging.getLogger("ray.serve")

try:
    SERVICE_VERSION = importlib.metadata.version("ray-textgen")
except importlib.metadata.PackageNotFoundError:  # run from a tree that was not installed
    SERVICE_VERSION = "unknown"
READINESS_TIMEOUT_S = 2.0
# How long a readiness answer is reused: probes from every kubelet and load balancer
# then cost one look at the models per second per ingress replica, whatever their rate.
READINESS_CACHE_S = 1.0
# Every status a route can answer besides 200, so the OpenAPI schema (and the fuzzing
# test that checks responses against it) is complete.
ERROR_RESPONSES = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 408, 413, 415, 422, 429, 500, 503, 504)
}


class Ingress:
    """Routes requests to model deployments by name, after identifying the client and
    applying its quota.

    Args:
        models: model name to the handle of its deployment; the first is the default.
        rate_limits: rate limits and token quotas.
        auth: API keys.
        limits: the ingress's own limits and deadlines.
        scale_to_zero: models whose deployments may scale to zero replicas.
        adapters: each model's LoRA adapter names; a request names one as its model,
            ``<model>:<adapter>`` (or the adapter's name alone, if no other model has
            one of that name), and goes to the model's deployment with the adapter as
            Serve's multiplexed model id (replicas that hold it are preferred).
    """

    def __init__(
        self,
        models: Mapping[str, DeploymentHandle],
        rate_limits: RateLimitArgs,
        auth: AuthArgs,
        limits: IngressArgs | None = None,
        scale_to_zero: frozenset[str] = frozenset(),
        adapters: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self._models = dict(models)
        self._adapters = {model: tuple(names) for model, names in (adapters or {}).items()}
        self._default_model = next(iter(self._models))
        self._rate_limits = rate_limits
        self._auth = auth
        self.limits = limits or IngressArgs()
        self._scale_to_zero = scale_to_zero
        self._app_name: str | None = None
        self._model_details: dict[str, dict] = {}  # each model's status, once it answered
        self._readiness: dict[str, dict | None] | None = None
        self._readiness_at = 0.0
        self._readiness_check: asyncio.Future | None = None

    async def __serve_build_asgi_app__(self) -> FastAPI:
        # Built in the replica: the environment (keys, TEXTGEN_RATE_LIMIT) is the replica's,
        # and the limiter's store is named after the application.
        app_name = self._app_name = serve.get_replica_context().app_name
        access = build_access_control(self._rate_limits, self._auth, get_settings(), app_name)
        if access.limiter is not None:
            await access.limiter.connect()
        return create_api(self, access)

    @property
    def model_names(self) -> list[str]:
        return list(self._models)

    @property
    def adapter_names(self) -> list[tuple[str, str]]:
        """Every served adapter as (its name as a model, its base model)."""
        return [(f"{model}:{adapter}", model) for model, names in self._adapters.items() for adapter in names]

    def _base_and_adapter(self, name: str) -> tuple[str, str | None]:
        """A model's name, ``<model>:<adapter>`` (a model's name may hold colons itself,
        `llama3:8b`; an adapter's may not), or an adapter's name alone."""
        if name in self._models:
            return name, None
        base, _, adapter = name.rpartition(":")
        if base in self._models:
            return base, adapter
        owners = [model for model, names in self._adapters.items() if name in names]
        if len(owners) == 1:
            return owners[0], name
        return name, None

    def begin(self, request: Request, model: str | None, prompt_chars: int, prompt_param: str) -> DeploymentHandle:
        """Starts a generation request: its deadline (X-Request-Timeout or the default),
        the prompt's length in characters, and the model's handle.

        Raises:
            ServiceError: 422 for a bad X-Request-Timeout or a prompt over the limit.
            ModelNotFoundError: no model of that name is served.
        """
        timeout_s = request_deadline_s(
            request.headers, self.limits.request_timeout_s, self.limits.max_request_timeout_s
        )
        streaming.start_clock(request, timeout_s)
        if prompt_chars > self.limits.max_prompt_chars:
            raise ServiceError(
                422,
                f"{prompt_param} has {prompt_chars} characters; the limit is {self.limits.max_prompt_chars}",
                param=prompt_param,
            )
        return self.model_handle(request, model)

    def model_handle(self, request: Request, name: str | None) -> DeploymentHandle:
        """The handle for ``name`` (the default model when None); notes the model on the
        request for its metrics and log line.

        Raises:
            ModelNotFoundError: no model of that name is served.
        """
        name = name or self._default_model
        base, adapter = self._base_and_adapter(name)
        handle = self._models.get(base)
        if handle is None or (adapter is not None and adapter not in self._adapters.get(base, ())):
            raise ModelNotFoundError(name, [*self._models, *(served for served, _ in self.adapter_names)])
        request.state.model = name if adapter is None else f"{base}:{adapter}"
        return handle if adapter is None else handle.options(multiplexed_model_id=adapter)

    async def readiness(self) -> dict[str, dict | None]:
        """`model_readiness`, reused for READINESS_CACHE_S; concurrent probes share the
        one check in flight."""
        loop = asyncio.get_running_loop()
        if self._readiness is not None and loop.time() - self._readiness_at < READINESS_CACHE_S:
            return self._readiness
        if self._readiness_check is None:
            self._readiness_check = asyncio.ensure_future(self.model_readiness(READINESS_TIMEOUT_S))

            def remember(check: asyncio.Future) -> None:
                self._readiness_check = None
                if not check.cancelled() and check.exception() is None:
                    self._readiness, self._readiness_at = check.result(), loop.time()

            self._readiness_check.add_done_callback(remember)
        return await asyncio.shield(self._readiness_check)

    async def model_readiness(self, timeout_s: float) -> dict[str, dict | None]:
        """Each model's readiness: its status (name, context, device, dtype), or None
        while it is not ready.

        In a Serve replica, Serve's controller says which deployments are healthy with
        a replica running; a model's own status is asked through its handle only until
        it first answers. A probe must not wait behind generations in a busy model's
        queue (nor be refused by it): under load that would report a serving model as
        not ready. A model that may scale to zero is ready with no replica (a request
        then waits for one to start), and is never asked: the call would wake it up.
        Outside Serve (in-process tests) every model is asked through its handle."""
        deployments = None
        if self._app_name is not None:
            try:
                deployments = await asyncio.wait_for(asyncio.to_thread(self._deployments), timeout_s)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - the controller did not answer
                return dict.fromkeys(self._models)

        async def asked(handle: DeploymentHandle) -> dict | None:
            try:
                return dataclasses.asdict(await asyncio.wait_for(handle.status.remote(), timeout_s))
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - no answer, whatever the cause
                return None

        async def status_of(name: str, handle: DeploymentHandle) -> dict | None:
            if deployments is None:
                return await asked(handle)
            deployment = deployments.get(handle.deployment_name)
            if deployment is None or deployment.status in (DeploymentStatus.UNHEALTHY, DeploymentStatus.DEPLOY_FAILED):
                return None
            running = deployment.replica_states.get(ReplicaState.RUNNING, 0)
            summary = {"deployment_status": str(deployment.status.value), "running_replicas": running}
            if name in self._scale_to_zero:
                return {"scales_to_zero": True, **summary}
            if running == 0:
                return None
            # A running replica has loaded its model (ModelServer loads in __init__);
            # its details are asked once, and are a nicety: a busy model stays ready.
            if name not in self._model_details:
                details = await asked(handle)
                if details is not None:
                    self._model_details[name] = details
            return {**self._model_details.get(name, {}), **summary}

        statuses = await asyncio.gather(*(status_of(*item) for item in self._models.items()))
        return dict(zip(self._models, statuses, strict=True))

    def _deployments(self) -> dict:
        """This application's deployments as Serve's controller sees them (blocking)."""
        return serve.status().applications[self._app_name].deployments


def create_api(ingress: Ingress, access: AccessControl) -> FastAPI:
    """The FastAPI app of one ingress replica."""
    app = FastAPI(
        title="ray-textgen",
        summary="Text generation on Ray Serve with HuggingFace transformers.",
        version="0.1.0",
    )
    # Starlette runs the last-added middleware first: request context (id, log line,
    # metrics) wraps access (key, rate-limit headers), which wraps the guard (load,
    # body size, content type), so every refusal still carries the id and the headers.
    app.add_middleware(
        RequestGuardMiddleware,
        max_concurrent=ingress.limits.max_ongoing_requests,
        max_body_bytes=ingress.limits.max_request_bytes,
        body_read_timeout_s=ingress.limits.body_read_timeout_s,
    )
    app.add_middleware(AccessMiddleware, access=access)
    app.add_middleware(RequestContextMiddleware)
    install_error_handlers(app)

    @app.get("/healthz", summary="Liveness: the ingress answers.", responses={500: {"model": ErrorResponse}})
    async def healthz() -> dict:
        return {"status": "ok"}

    # vLLM's probes, which serving benchmarks and gateways check: an empty 200 (and so
    # documented: no JSON body).
    empty_200 = {200: {"description": "An empty body.", "content": None}, 500: {"model": ErrorResponse}}

    @app.get("/health", summary="Liveness, as vLLM answers it (empty 200).", response_class=Response,
             responses=empty_200)
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/ping", summary="Liveness (vLLM's, for SageMaker).", response_class=Response,
             responses=empty_200, operation_id="ping_get")
    @app.post("/ping", summary="Liveness (vLLM's, for SageMaker).", response_class=Response,
              responses=empty_200, operation_id="ping_post")
    async def ping() -> Response:
        return Response(status_code=200)

    @app.get("/version", summary="This service's version.", responses=ERROR_RESPONSES)
    async def version() -> dict:
        return {"version": SERVICE_VERSION}

    @app.get(
        "/readyz",
        summary="Readiness: 200 once every model deployment has loaded, else 503.",
        responses={
            503: {"description": "A model is still loading (or broken)."},
            500: {"model": ErrorResponse},
        },
    )
    async def readyz() -> JSONResponse:
        statuses = await ingress.readiness()
        ready = all(status is not None for status in statuses.values())
        body = {"status": "ready" if ready else "loading", "models": statuses}
        return JSONResponse(
            body, status_code=200 if ready else 503, headers=None if ready else {"Retry-After": "5"}
        )

    @app.post(
        "/generate",
        response_model=GenerateResponse,
        responses={
            **ERROR_RESPONSES,
            200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when stream is true."},
        },
        summary="Generate text from a prompt.",
        response_model_exclude_none=True,  # `logprobs` only when asked for
    )
    async def generate(body: GenerateRequest, request: Request):
        handle = ingress.begin(request, body.model, body.prompt_length, "prompt")
        params = body.to_generation_params(request.state.request_id)
        started = time.perf_counter()
        if body.stream:
            stream, start = await streaming.open_stream(request, access, handle, params)
            response_id = request.state.request_id  # one id: the body's is X-Request-ID

            def on_delta(delta: SequenceDelta, usage: Usage | None) -> list[dict]:
                event = {"id": response_id, "model": start.model, "index": delta.index, "text": delta.text}
                if body.logprobs is not None:
                    event["logprobs"] = [GeneratedTokenLogprob.of(scored).model_dump() for scored in delta.logprobs]
                if delta.finish_reason is not None:
                    event["finish_reason"] = delta.finish_reason
                if usage is not None:
                    event["usage"] = usage.model_dump()
                return [event]

            return streaming.event_stream_response(
                streaming.relay(
                    request, access, stream, start, params.num_return_sequences,
                    on_delta, on_end=lambda usage: [], openai=False,
                )
            )
        [result] = await streaming.generate(request, access, handle, params)
        return GenerateResponse.from_result(
            request.state.request_id, result, (time.perf_counter() - started) * 1000, logprobs=body.logprobs is not None
        )

    add_openai_routes(app, ingress, access)
    add_tokenizer_routes(app, ingress, access, ERROR_RESPONSES)
    return app

