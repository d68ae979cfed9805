"""The published OpenAPI schema states every limit the server enforces.

The request models declare the shapes; the limits that depend on the app (`serve.max_k`,
`serve.max_query_chars`, `serve.max_batch_queries`, `serve.default_k`) or on the index it
serves (the embedding width E and the K+1 prototypes of a vector query) are written into
the schema here, when the app is built, so a client generated from `/openapi.json` (or a
fuzzer) sends exactly what the server accepts. The one rule JSON Schema cannot state, a
filter's `min_duration_s <= max_duration_s`, is said in the filter's description.
A fuzzing test (`tests/serve/test_openapi_fuzz.py`) keeps schema and server in step.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import FastAPI
from pydantic import BeforeValidator, StrictInt

from gpa_ray.config import ServeConfig

BLANK = " \t\n\r\f\v"
"""Characters a query may not consist of only, and that are trimmed from its ends."""
NON_BLANK = "[^ \\t\\n\\r\\f\\v]"
"""The same rule as a pattern (ECMA-262 and Python agree on it): one non-blank character."""
FLOAT32_MAX = 3.4028234663852886e38
"""Vector components beyond float32's range are not finite once stored, so refused."""


def _integral(value: object) -> object:
    """18.0 is an integer to JSON Schema (a number with no fraction), so it is one here;
    booleans and strings are not numbers and stay refused."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


WholeNumber = Annotated[StrictInt, BeforeValidator(_integral)]
"""A JSON body's integer field exactly as the schema's `"type": "integer"` means it."""


def _nullable(schema: dict[str, Any], declared: dict[str, Any]) -> dict[str, Any]:
    """`schema` or null, keeping the declared title and description."""
    kept = {key: declared[key] for key in ("title", "description") if key in declared}
    return {"anyOf": [schema, {"type": "null"}], **kept}


def _vector(width: int) -> dict[str, Any]:
    """E finite float32 values, not all zero (the server L2-normalises it)."""
    number = {"type": "number", "minimum": -FLOAT32_MAX, "maximum": FLOAT32_MAX}
    return {
        "type": "array",
        "items": number,
        "minItems": width,
        "maxItems": width,
        "contains": {"not": {"const": 0}},
    }


def document_limits(
    app: FastAPI, serve_cfg: ServeConfig, embed_dim: int, n_prototypes: int
) -> None:
    """Write the app's and the index's limits into `app`'s OpenAPI schema (FastAPI keeps
    the generated schema in `app.openapi_schema`, which `/openapi.json` serves)."""
    schema = app.openapi()
    models = schema["components"]["schemas"]
    k = {"type": "integer", "minimum": 1, "maximum": serve_cfg.max_k}
    query = {
        "type": "string",
        "minLength": 1,
        "maxLength": serve_cfg.max_query_chars,
        "pattern": NON_BLANK,
    }

    text = models["TextSearchRequest"]["properties"]
    text["query"] = {**text["query"], **query}
    text["k"] = _nullable(k, text["k"])

    batch = models["BatchTextSearchRequest"]["properties"]
    batch["queries"] = {**batch["queries"], "items": query, "maxItems": serve_cfg.max_batch_queries}
    batch["k"] = _nullable(k, batch["k"])

    vector = models["VectorSearchRequest"]
    fields = vector["properties"]
    fields["global"] = {**fields["global"], **_vector(embed_dim)}
    fields["k"] = _nullable(k, fields["k"])
    if n_prototypes:
        rows = {
            "type": "array",
            "items": _vector(embed_dim),
            "minItems": n_prototypes,
            "maxItems": n_prototypes,
        }
        kept = {key: fields["prototypes"][key] for key in ("title", "description")}
        fields["prototypes"] = {**rows, **kept}
        vector["required"] = sorted({*vector.get("required", []), "prototypes"})

    paths = schema["paths"]
    for param in paths["/v1/search/audio"]["post"]["parameters"]:
        if param["name"] == "k":  # declared None: the route falls back to serve.default_k
            kept = {key: param["schema"][key] for key in ("title", "description")}
            param["schema"] = {**k, "default": serve_cfg.default_k, **kept}
    for param in paths["/v1/similar/{clip_id}"]["get"]["parameters"]:
        if param["name"] == "k":
            param["schema"] = _nullable(k, param["schema"])
