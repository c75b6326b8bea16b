"""Request and response bodies of the OpenAI embeddings API (plus two extension fields), as pydantic models.

The request model is what FastAPI validates and documents; responses are built as plain JSON for speed
and the response models only document them on the OpenAPI page.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

DEFAULT_MODEL_NAME = "BAAI/bge-small-en-v1.5"
MAX_INPUTS = 2048  # OpenAI's limit on the number of inputs in one request


class EmbeddingRequest(BaseModel):
    # Unknown fields are ignored, as OpenAI-compatible clients send vendor extras.
    model_config = ConfigDict(extra="ignore")

    input: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]] = Field(
        description="Text to embed: a string, an array of strings, an array of token ids, or an array of "
        "token-id arrays (at most 2048 inputs; no empty strings). Token ids are this model's WordPiece vocabulary "
        "ids without [CLS]/[SEP], which the server adds.",
        examples=["The food was delicious and the waiter was friendly."],
    )
    model: str | None = Field(None, description="The served model name (see GET /v1/models). Default: it.")
    encoding_format: Literal["float", "base64"] | None = Field(
        "float", description="'float' (JSON numbers) or 'base64' (little-endian float32 bytes, base64-encoded).")
    dimensions: StrictInt | None = Field(
        None, description="Accepted only when equal to the model's width: this model has fixed-width output.")
    user: str | None = Field(None, description="Accepted and ignored.")
    input_type: Literal["query", "document"] | None = Field(
        None, description="Extension. 'query' prepends the BGE retrieval instruction to every input; "
        "'document' (the default) embeds the inputs as they are.")
    truncate: StrictBool = Field(
        True, description="Extension. When false, an input over the model's token limit is an error (400) "
        "instead of being truncated.")


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    precision: Literal["fp32", "bf16"] = Field(
        description="Extension. The numeric tier that runs: 'fp32' (exact) or 'bf16' (linear layers in bfloat16).")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
