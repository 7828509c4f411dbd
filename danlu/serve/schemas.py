"""Request and response bodies: danlu's /v1/predict, and the subset of OpenAI's schema danlu answers.

Fields OpenAI defines but danlu does not use (user, logit_bias, presence_penalty, ...) are accepted
and ignored, as OpenAI-compatible servers do, so that existing clients work unchanged; unknown
fields are ignored too. Values out of range are refused with 400 and the name of the field.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# -------------------------------------------------------------------------------------- errors


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape: `{"error": {"message", "type", "param", "code"}}`."""

    error: ErrorBody


# ----------------------------------------------------------------------------------- predictions


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    texts: str | list[str] = Field(description="One text, or a list of texts to classify.")
    images: str | list[str] | None = Field(default=None, description="Image runs only (this one is refused).")
    model: str | None = Field(default=None, description="The served model's id (optional).")
    top_k: int | None = Field(default=None, ge=1, description="List only the k most probable labels.")


class ImagePredictRequest(BaseModel):
    """/v1/predict of an image run (danlu.serve.images)."""

    model_config = ConfigDict(extra="forbid")

    images: str | list[str] = Field(description="One image, or a list, each the file's bytes (PNG, JPEG, BMP, "
                                                "GIF ...) base64-encoded or a data: URL.")
    texts: str | list[str] | None = Field(default=None, description="Text runs only (this one is refused).")
    model: str | None = Field(default=None, description="The served model's id (optional).")
    top_k: int | None = Field(default=None, ge=1, description="List only the k most probable labels.")


class Prediction(BaseModel):
    index: int
    label: str | None = None
    score: float | None = None
    probabilities: dict[str, float] | None = None
    value: float | None = Field(default=None, description="Regression runs: the predicted value.")


class PredictResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    data: list[Prediction]


# ---------------------------------------------------------------------------------------- models


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "danlu"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: str
    kind: str
    queue_depth: int


# ----------------------------------------------------------------------------------- completions


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    """The sampling fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, description="danlu extension: sample among the k most likely tokens (0: all).")
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0, description="danlu extension (CTRL, Keskar et al. 2019).")
    n: int = Field(default=1, ge=1, le=8)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(default=None, description="Up to 4 sequences where generation stops.")
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0, description="Accepted and ignored.")
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0, description="Accepted and ignored.")
    user: str | None = None


class CompletionRequest(Sampling):
    prompt: str | list[str]
    echo: bool = False


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatCompletionRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
