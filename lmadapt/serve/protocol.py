"""The HTTP protocol: pydantic request and response models, apart from the routes (server.py),
as vLLM keeps them. Field names and shapes follow OpenAI's API, so its clients work unchanged.
Unknown fields are ignored (clients send many optional ones); the ones we do not implement are
refused with a 400 that names them rather than silently dropped."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Sampling(_Request):
    model: str = Field(description="a user's model (named after the user) or the base model")
    max_tokens: int | None = Field(None, ge=1, description="new tokens at most (default 16)")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0: greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, description="only 1 is supported")
    stream: bool = False
    stop: str | list[str] | None = Field(None, description="up to 4 strings that end the answer")
    seed: int | None = Field(None, description="the sampler's seed: the same seed, the same answer")
    logprobs: int | bool | None = Field(None, description="not supported")
    echo: bool = Field(False, description="not supported")
    best_of: int | None = Field(None, description="not supported")
    user: str | None = None


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] = Field(description="a string (or a list of one), or token ids")


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]


class StreamOptions(_Request):
    include_usage: bool = False


class ChatCompletionRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stream_options: StreamOptions | None = None


class ClassifyRequest(_Request):
    model: str
    input: str | list[str] = Field(description="a text or a list of texts")
    input_pair: str | list[str] | None = Field(None, description="second texts of pairs (NLI), same length")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Classification(BaseModel):
    index: int
    label: str
    probs: dict[str, float]


class ClassifyResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    data: list[Classification]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class UserInfo(BaseModel):
    name: str
    method: str
    kind: Literal["lm", "classify"]
    token: str | None = Field(None, description="shown once, when the user is created")


class Deleted(BaseModel):
    name: str
    deleted: bool = True


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    users: int
    resident: int
    running: int
    waiting: int


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape: every 4xx/5xx answer is one of these."""
    error: ErrorBody
