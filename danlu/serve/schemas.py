"""Request and response bodies: danlu's /v1/predict, and the subset of OpenAI's schema danlu answers.

Types are strict: `"max_tokens": "5"` or `"stream": "yes"` is refused with 400 and the field's name,
never read as 5 or True (an integer is accepted where a number is expected). OpenAI's fields that
would change the output and that danlu does not implement (`logit_bias`, `tools`, `response_format`
other than text, `suffix`, `best_of`, nonzero penalties, ...) are accepted only with their neutral value
(absent, null, false, empty, 1 or 0) and otherwise refused with 400 `unsupported_parameter`
(UNSUPPORTED); `user` and unknown fields are ignored. `logprobs` (completions: up to 5 alternatives;
chat: `logprobs` with `top_logprobs` up to 20) are answered in OpenAI's shapes.

Text is repaired, not refused, in one case: a lone UTF-16 surrogate (half of an emoji cut by a
browser or a client, which JSON's `\\ud83d` escape can carry) becomes U+FFFD, the replacement
character, as a UTF-8 decoder does with a broken byte sequence; the rest of the text is kept. The sampling
defaults are danlu.sampling.SAMPLING's (OpenAI's own: temperature 1, top_p 1, all tokens).
"""
from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

_SURROGATE = re.compile("[\ud800-\udfff]")


def repair_text(text: str) -> str:
    """`text` with every lone surrogate replaced by U+FFFD (a str from JSON holds no paired ones)."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)


Text = Annotated[str, AfterValidator(repair_text)]
STRICT = ConfigDict(strict=True)

UNSUPPORTED = {
    "logit_bias": "logit_bias is not supported by this server",
    "tools": "tool calling is not supported by this server",
    "tool_choice": "tool calling is not supported by this server",
    "functions": "function calling is not supported by this server",
    "function_call": "function calling is not supported by this server",
    "response_format": "only the text response format is supported by this server",
    "suffix": "suffix (insertion) is not supported by this server",
    "best_of": "best_of is not supported by this server; use n",
    "presence_penalty": "presence_penalty is not supported by this server; see repetition_penalty",
    "frequency_penalty": "frequency_penalty is not supported by this server; see repetition_penalty",
}
"""Fields accepted only with a neutral value; anything else answers 400 `unsupported_parameter`."""

from danlu.sampling import SAMPLING

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
    model_config = ConfigDict(extra="forbid", strict=True)

    texts: Text | list[Text] = Field(description="One text, or a list of texts to classify.")
    images: str | list[str] | None = Field(default=None, description="Image runs only (this one is refused).")
    model: str | None = Field(default=None, description="The served model's id (optional).")
    top_k: int | None = Field(default=None, ge=1, description="List only the k most probable labels.")
    explain: bool = Field(default=False, description="Add each text's token attributions (`explanation`): which "
                                                     "tokens pushed the decision, with their character spans.")


class ImagePredictRequest(BaseModel):
    """/v1/predict of an image run (danlu.serve.images)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    images: str | list[str] = Field(description="One image, or a list, each the file's bytes (PNG, JPEG, BMP, "
                                                "GIF ...) base64-encoded or a data: URL.")
    texts: str | list[str] | None = Field(default=None, description="Text runs only (this one is refused).")
    model: str | None = Field(default=None, description="The served model's id (optional).")
    top_k: int | None = Field(default=None, ge=1, description="List only the k most probable labels.")


class TokenScore(BaseModel):
    text: str = Field(description="The token as it appears in the input text.")
    start: int = Field(description="Its first character's offset in the input text, counted in Unicode code points "
                                   "(Python's str index; in JavaScript, index Array.from(text)).")
    end: int = Field(description="The offset just past its last character, in code points.")
    score: float = Field(description="How much it pushed towards the predicted label (negative: against it), in "
                                     "units of the label's probability (regression: of the value).")


class Explanation(BaseModel):
    method: Literal["integrated_gradients", "occlusion"]
    tokens: list[TokenScore]


class Prediction(BaseModel):
    index: int
    label: str | None = None
    score: float | None = None
    probabilities: dict[str, float] | None = None
    value: float | None = Field(default=None, description="Regression runs: the predicted value.")
    text: str | None = Field(default=None, description="Seq2seq runs: the generated text.")
    explanation: Explanation | None = Field(default=None, description='With "explain": true, the tokens that pushed '
                                                                       "the decision.")


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
    model_config = STRICT

    include_usage: bool = False


class TextFormat(BaseModel):
    model_config = STRICT

    type: Literal["text"]


_NEUTRAL_ZERO = {"ge": 0.0, "le": 0.0}


class Sampling(BaseModel):
    """The sampling fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=SAMPLING.temperature, ge=0.0, le=2.0)
    top_p: float = Field(default=SAMPLING.top_p, gt=0.0, le=1.0)
    top_k: int = Field(default=SAMPLING.top_k, ge=0, description="danlu extension: sample among the k most likely tokens (0: all).")
    repetition_penalty: float = Field(default=SAMPLING.repetition_penalty, gt=0.0, le=10.0, description="danlu extension (CTRL, Keskar et al. 2019).")
    n: int = Field(default=1, ge=1, le=8)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Text | list[Text] | None = Field(default=None, description="Up to 4 sequences where generation stops.")
    seed: int | None = Field(default=SAMPLING.seed, ge=0, le=2**63 - 1)
    presence_penalty: float | None = Field(default=None, **_NEUTRAL_ZERO, description="Not supported: 0 or absent.")
    frequency_penalty: float | None = Field(default=None, **_NEUTRAL_ZERO, description="Not supported: 0 or absent.")
    logit_bias: dict[str, float] | None = Field(default=None, max_length=0, description="Not supported: empty or absent.")
    user: str | None = None


class CompletionRequest(Sampling):
    prompt: Text | list[Text]
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=5, description="Log probabilities of each generated "
                                 "token and of the `logprobs` most likely ones (0: the chosen token's only).")
    suffix: Literal[""] | None = Field(default=None, description="Not supported: empty or absent.")
    best_of: Literal[1] | None = Field(default=None, description="Not supported: 1 or absent (use n).")


class TextPart(BaseModel):
    model_config = STRICT

    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: str | None = None


class ChatCompletionRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = Field(default=None, description="Return the log probability of each generated token.")
    top_logprobs: int | None = Field(default=None, ge=0, le=20,
                                     description="With logprobs: also the this many most likely tokens at each step.")
    response_format: TextFormat | None = Field(default=None, description='Only {"type": "text"}.')
    tools: list[dict] | None = Field(default=None, max_length=0, description="Not supported: empty or absent.")
    tool_choice: Literal["none"] | None = Field(default=None, description='Not supported: "none" or absent.')
    functions: list[dict] | None = Field(default=None, max_length=0, description="Not supported: empty or absent.")
    function_call: Literal["none"] | None = Field(default=None, description='Not supported: "none" or absent.')
    parallel_tool_calls: bool | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """The legacy completion shape: one entry per generated token; text_offset counts characters from the
    start of the prompt, as if the completion followed it."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None = None
    text_offset: list[int]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: CompletionLogprobs | None = None


class _Response(BaseModel):
    id: str
    created: int
    model: str
    usage: Usage


class CompletionResponse(_Response):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


def completion_logprobs(entries, start=0) -> CompletionLogprobs:
    """The legacy shape of the engine's Logprob entries; `start`: characters before the completion (the prompt)."""
    return CompletionLogprobs(tokens=[e.token for e in entries], token_logprobs=[e.logprob for e in entries],
                              top_logprobs=[{t: v for t, v, _ in e.top} for e in entries],
                              text_offset=[start + e.offset for e in entries])


def chat_logprobs(entries) -> ChatLogprobs:
    """The chat shape of the engine's Logprob entries."""
    return ChatLogprobs(content=[TokenLogprob(token=e.token, logprob=e.logprob, bytes=e.bytes,
                                              top_logprobs=[TopLogprob(token=t, logprob=v, bytes=b) for t, v, b in e.top])
                                 for e in entries])
