"""HTTP routes: parse -> engine -> wrap. The work lives in server.chat and server.completions."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from server.chat import complete_chat, start_chat, stream_chat
from server.completions import complete_text, start_completion, stream_text
from server.engine import Engine
from server.errors import LOADING_RETRY_AFTER, ModelNotReady, NotFound
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.responses import ChatCompletion, Completion, Health, ModelCard, ModelList, dump
from server.responses_api import ResponsesRequest, start_response
from server.responses_output import ResponseObject, complete_response, stream_response
from server.state import ServerState
from server.streaming import sse_response, unless_disconnected

router = APIRouter()
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"description": text}
    for code, text in {
        400: "Invalid request",
        401: "Missing or wrong API key",
        403: "Host not allowed",
        413: "Request body too large",
        429: "Queue full; see Retry-After",
        503: "Model loading",
    }.items()
}


def _state(request: Request) -> ServerState:
    return request.app.state.server


def _engine(request: Request) -> Engine:
    engine = _state(request).engine
    if engine is None:
        raise ModelNotReady("The model is loading; retry shortly", retry_after=LOADING_RETRY_AFTER)
    return engine


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses=ERRORS)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    state = _state(request)
    engine = _engine(request)
    job, turn = await start_chat(body, engine, state.template(), state.settings, state.model_id)
    if body.stream:
        return sse_response(stream_chat(job, turn), job)
    result = await unless_disconnected(request, complete_chat(job, turn))
    return result if isinstance(result, Response) else JSONResponse(result)


@router.post("/v1/completions", response_model=Completion, responses=ERRORS)
async def completions(body: CompletionRequest, request: Request) -> Response:
    state = _state(request)
    job, turn = await start_completion(body, _engine(request), state.settings, state.model_id)
    if body.stream:
        return sse_response(stream_text(job, turn), job)
    result = await unless_disconnected(request, complete_text(job, turn))
    return result if isinstance(result, Response) else JSONResponse(result)


@router.post("/v1/responses", response_model=ResponseObject, responses=ERRORS)
async def responses(body: ResponsesRequest, request: Request) -> Response:
    state = _state(request)
    job, turn = await start_response(body, _engine(request), state.template(), state.settings, state.model_id)
    if body.stream:
        return sse_response(stream_response(job, turn), job)
    result = await unless_disconnected(request, complete_response(job, turn))
    return result if isinstance(result, Response) else JSONResponse(result)


@router.get("/v1/models", response_model=ModelList, responses=ERRORS)
async def models(request: Request) -> JSONResponse:
    return JSONResponse(dump(ModelList(data=[_state(request).model_card()])))


@router.get("/v1/models/{model:path}", response_model=ModelCard, responses=ERRORS | {404: {"description": "No such model"}})
async def model(request: Request, model: str) -> JSONResponse:
    card = _state(request).model_card()
    if model != card.id:  # as OpenAI's "retrieve model": only the served model exists here
        raise NotFound(f"The model '{model}' does not exist; this server serves '{card.id}'", param="model",
                       code="model_not_found")
    return JSONResponse(dump(card))


@router.get("/health", response_model=Health, responses={503: {"description": "Model loading"}})
async def health(request: Request) -> JSONResponse:
    state = _state(request)
    info = _engine(request).info  # ModelNotReady (503) until loaded
    body = Health(
        status="ok", model=state.model_id, demo=state.demo, context_size=info.n_ctx, placement=info.placement
    )
    return JSONResponse(dump(body))


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics(request: Request) -> Response:
    text = await run_in_threadpool(_state(request).metrics.render)
    return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

