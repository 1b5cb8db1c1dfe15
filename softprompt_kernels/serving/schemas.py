"""Request bodies of the OpenAI-style API (pydantic): every field typed and bounded where it is parsed.

Fields OpenAI defines that this server does not implement are accepted only at their neutral value
(``frequency_penalty: 0``, ``logit_bias: {}``, ...); anything else, and any unknown field, is a 400
naming the field.
"""
from __future__ import annotations

from typing import Annotated, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator

MAX_SEED = 2 ** 63 - 1
Number = Union[StrictInt, StrictFloat]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: StrictStr = "base"
    temperature: Annotated[Number, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[Number, Field(gt=0, le=1)] = 1.0
    n: Annotated[StrictInt, Field(ge=1, le=16)] = 1
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    stop: Union[None, StrictStr, Annotated[List[Annotated[StrictStr, Field(min_length=1)]], Field(max_length=4)]] = None
    seed: Optional[Annotated[StrictInt, Field(ge=0, le=MAX_SEED)]] = None
    frequency_penalty: Optional[Number] = 0
    presence_penalty: Optional[Number] = 0
    logit_bias: Optional[Dict[str, Number]] = None
    user: Optional[StrictStr] = None

    @model_validator(mode="after")
    def _neutral_only(self):
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name) not in (None, 0):
                raise _unsupported(name, "is not supported by this server (only 0)")
        if self.logit_bias:
            raise _unsupported("logit_bias", "is not supported by this server (only {} or null)")
        if isinstance(self.stop, str) and not self.stop:
            raise _unsupported("stop", "must not be empty")
        if self.stream_options is not None and not self.stream:
            raise _unsupported("stream_options", "needs 'stream': true")
        return self

    @property
    def stop_list(self) -> List[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Common):
    prompt: Union[StrictStr, Annotated[List[StrictInt], Field(min_length=1)]]
    max_tokens: Annotated[StrictInt, Field(ge=1)] = 16
    logprobs: Optional[Annotated[StrictInt, Field(ge=0, le=20)]] = None
    echo: StrictBool = False
    best_of: Optional[Annotated[StrictInt, Field(ge=1)]] = None
    suffix: Optional[StrictStr] = None

    @model_validator(mode="after")
    def _completion_only(self):
        if self.best_of is not None and self.best_of != self.n:
            raise _unsupported("best_of", "is not supported by this server (only equal to n, or null)")
        if self.suffix:
            raise _unsupported("suffix", "is not supported by this server")
        if self.echo and self.logprobs is not None:
            raise _unsupported("echo", "with 'logprobs' is not supported (prompt logprobs): ask for one of them")
        if isinstance(self.prompt, str) and not self.prompt:
            raise _unsupported("prompt", "must not be empty")
        return self


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[StrictStr, List[TextPart]]
    name: Optional[StrictStr] = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatRequest(_Common):
    messages: Annotated[List[ChatMessage], Field(min_length=1)]
    max_tokens: Optional[Annotated[StrictInt, Field(ge=1)]] = None
    max_completion_tokens: Optional[Annotated[StrictInt, Field(ge=1)]] = None
    logprobs: StrictBool = False
    top_logprobs: Optional[Annotated[StrictInt, Field(ge=0, le=20)]] = None

    @model_validator(mode="after")
    def _chat_only(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise _unsupported("top_logprobs", "needs 'logprobs': true")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise _unsupported("max_tokens", "and 'max_completion_tokens' both given: give one")
        return self

    @property
    def new_tokens(self) -> int:
        return self.max_completion_tokens or self.max_tokens or 16


class FieldError(ValueError):
    """A value the schema accepts in type but this server does not; carries the field's name."""

    def __init__(self, field: str, message: str):
        super().__init__(f"'{field}' {message}")
        self.field = field


def _unsupported(field: str, message: str) -> FieldError:
    return FieldError(field, message)


def describe_validation_error(error) -> tuple:
    """(message, field) of a pydantic ValidationError: the first problem, named by its field path."""
    first = error.errors()[0]
    tags = {"str", "int", "float", "bool", "list", "dict", "none", "StrictStr", "StrictInt"}
    location = [str(part) for part in first.get("loc", ())
                if isinstance(part, int) or not ("[" in str(part) or "-" in str(part) or str(part) in tags)]
    context = first.get("ctx", {}).get("error")
    if isinstance(context, FieldError):
        return str(context), context.field
    field = ".".join(location) if location else None
    if first.get("type") == "extra_forbidden":
        return f"'{field}' is not a field this server knows (unsupported)", field
    if first.get("type") == "missing":
        return f"'{field}' is required", field
    # a union (prompt: string or token ids; stop: string or list) fails once per branch: say all of them
    same = [e for e in error.errors() if e.get("loc", ())[:1] == first.get("loc", ())[:1]]
    messages = list(dict.fromkeys(e.get("msg") for e in same))
    return (f"'{field}': {' or '.join(messages)}" if field else first.get("msg")), field
