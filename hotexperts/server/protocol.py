"""Request parsing: JSON bodies of /v1/chat/completions and /v1/completions -> validated pydantic models.

    req = parse_request("chat" | "completion", raw_bytes)        # APIError(400) on any bad input
    messages = chat_messages(req)                                  # list[dict] for the chat template
    check_supported(req)                                           # APIError(400) for rejected parameters
    params = sampling_params(req, n_prompt, max_context, defaults) # SamplingParams, context checked

Types are strict (no "1" for 1, no true for 1). Unknown fields are ignored. `model` may be any name or
left out (llama-server's rule: one model is served; the response names it). Implemented: temperature,
top_p, top_k, min_p, seed, stop, stop_token_ids, presence/frequency_penalty ([-2, 2]),
repetition_penalty (> 0), logprobs (chat: logprobs true + top_logprobs 0..20; completions: logprobs
0..20). Rejected (400) when set to anything but their neutral value: n > 1, best_of > 1, logit_bias,
tools / functions / tool_choice other than "none", response_format other than text, echo, suffix,
non-text content parts, batched prompts.
Ignored: user, metadata, store, service_tier, parallel_tool_calls, stream_options when not streaming, and
other unknown keys (message fields such as name or tool_calls go to the chat template as they are).
The role "developer" is rendered as "system". A negative seed is passed to torch as is (deterministic).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from hotexperts.engine.sampling import SamplingParams
from hotexperts.errors import HotExpertsError, loads_json
from hotexperts.server.errors import APIError, bad_request, unsupported

Kind = Literal["chat", "completion"]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Strict):
    include_usage: bool | None = None


class ContentPart(_Strict):
    type: str
    text: str | None = None


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class _Common(_Strict):
    model: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    user: str | None = None


class ChatRequest(_Common):
    messages: list[Message]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None


MODELS: dict[str, type[_Common]] = {"chat": ChatRequest, "completion": CompletionRequest}


def parse_request(kind: Kind, raw: bytes) -> ChatRequest | CompletionRequest:
    try:
        body = loads_json(raw, "the request body")
    except HotExpertsError as e:
        raise bad_request(str(e), code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", code="invalid_json")
    try:
        req = MODELS[kind].model_validate(body)
    except ValidationError as e:
        raise _validation_error(e) from None
    check_supported(req)
    return req


def _validation_error(e: ValidationError) -> APIError:
    err = e.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in err["loc"] if not _is_type_tag(p))
    msg = "is required" if err["type"] == "missing" else f"is invalid: {err['msg']}"
    return bad_request(f"{loc or 'body'} {msg}", param=loc or None,
                       code="missing_parameter" if err["type"] == "missing" else "invalid_type")


def _is_type_tag(p) -> bool:
    """pydantic puts union member names ("str", "list[str]") in error locations; drop them."""
    return isinstance(p, str) and (p in {"str", "int", "float", "bool"} or "[" in p)


def check_supported(req: ChatRequest | CompletionRequest) -> None:
    rules = [
        ("n", req.n not in (None, 1), "n > 1 (one choice per request)"),
        ("logit_bias", bool(req.logit_bias), "logit_bias"),
    ]
    if isinstance(req, ChatRequest):
        fmt = (req.response_format or {}).get("type", "text")
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
        rules += [("tools", bool(req.tools), "tool calling"), ("functions", bool(req.functions), "functions"),
                  ("tool_choice", req.tool_choice not in (None, "none", "auto") or
                   (req.tool_choice == "auto" and bool(req.tools)), "tool_choice"),
                  ("response_format", fmt != "text", f"response_format {fmt!r}")]
    else:
        rules += [("echo", bool(req.echo), "echo"), ("suffix", bool(req.suffix), "suffix"),
                  ("best_of", req.best_of not in (None, 1), "best_of > 1")]
    for param, bad, what in rules:
        if bad:
            raise unsupported(param, what)


def chat_messages(req: ChatRequest) -> list[dict]:
    """Messages as plain dicts for the chat template; text parts joined, other parts rejected."""
    if not req.messages:
        raise bad_request("messages must not be empty", param="messages", code="empty_messages")
    out = []
    for i, m in enumerate(req.messages):
        d = m.model_dump(exclude_none=True)
        d["content"] = _text(m.content, f"messages.{i}.content")
        if d["role"] == "developer":           # OpenAI's newer name for the system role
            d["role"] = "system"
        out.append(d)
    return out


def _text(content, param: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise unsupported(param, f"content part of type {part.type!r}")
        parts.append(part.text)
    return "".join(parts)


def completion_prompt(req: CompletionRequest) -> str | list[int]:
    """The one prompt as text or token ids (lists of several prompts are rejected)."""
    p = req.prompt
    if isinstance(p, list) and p and isinstance(p[0], str | list):
        if len(p) != 1:
            raise unsupported("prompt", "a batch of several prompts")
        p = p[0]
    if isinstance(p, list) and not p or p == "":
        raise bad_request("prompt must not be empty", param="prompt", code="empty_prompt")
    return p


def requested_logprobs(req: ChatRequest | CompletionRequest) -> int | None:
    """SamplingParams.logprobs: None = off, else the number of alternatives per token."""
    if isinstance(req, ChatRequest):
        return (req.top_logprobs or 0) if req.logprobs else None
    return req.logprobs


def requested_max_tokens(req: ChatRequest | CompletionRequest) -> tuple[int | None, str]:
    mct = getattr(req, "max_completion_tokens", None)
    return (mct, "max_completion_tokens") if mct is not None else (req.max_tokens, "max_tokens")


def sampling_params(req: ChatRequest | CompletionRequest, n_prompt: int, max_context: int,
                    defaults: dict | None = None) -> SamplingParams:
    """SamplingParams from the request; `defaults` (sampling.generation_defaults of the model's
    generation_config) fill unset sampling values, then OpenAI's (temperature 1, no filters).
    max_tokens unset = whatever the context leaves; prompt + max_tokens beyond the context -> 400."""
    defaults = defaults or {}
    max_tokens, mt_param = requested_max_tokens(req)
    if max_tokens is not None and max_tokens < 1:
        raise bad_request(f"{mt_param} must be >= 1, got {max_tokens}", param=mt_param, code="invalid_value")
    room = max_context - n_prompt
    if room < 1 or (max_tokens is not None and max_tokens > room):
        raise _context_error(n_prompt, max_tokens, max_context, mt_param)
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    values = dict(temperature=_pick(req.temperature, defaults.get("temperature"), 1.0),
                  top_p=_pick(req.top_p, defaults.get("top_p"), 1.0),
                  top_k=_pick(req.top_k, defaults.get("top_k"), 0),
                  min_p=_pick(req.min_p, defaults.get("min_p"), 0.0),
                  repetition_penalty=_pick(req.repetition_penalty, defaults.get("repetition_penalty"), 1.0),
                  presence_penalty=_pick(req.presence_penalty, None, 0.0),
                  frequency_penalty=_pick(req.frequency_penalty, None, 0.0),
                  logprobs=requested_logprobs(req))
    if values["temperature"] > 2:
        raise bad_request("temperature must be in [0, 2]", param="temperature", code="invalid_value")
    if req.seed is not None and not -2**63 <= req.seed < 2**64:
        raise bad_request("seed must fit in 64 bits", param="seed", code="invalid_value")
    try:
        return SamplingParams(**values, seed=req.seed, max_tokens=max_tokens or room, stop=tuple(stop),
                              stop_token_ids=tuple(req.stop_token_ids or ()))
    except HotExpertsError as e:
        raise bad_request(str(e), param=str(e).split(" ")[0], code="invalid_value") from None


def _pick(value, default, fallback):
    return value if value is not None else (default if default is not None else fallback)


def _context_error(n_prompt: int, max_tokens: int | None, max_context: int, param: str) -> APIError:
    asked = f" + {param} ({max_tokens})" if max_tokens is not None else ""
    return bad_request(
        f"this model's context is {max_context} tokens; the prompt has {n_prompt} tokens{asked}. "
        f"Shorten the prompt or lower {param}.",
        param="messages" if max_tokens is None or n_prompt >= max_context else param,
        code="context_length_exceeded")
