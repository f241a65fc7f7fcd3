"""The OpenAPI of a route that reads its body itself: the model it names, documented by hand.

FastAPI documents a body from a route's signature; POST /batch and POST /jobs read
theirs as bytes (strictly, whatever its Content-Type: fanout.strict_json), so each
names its model here: the route's `openapi_extra`, and the model with the models it
uses among the document's components.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

_REF = "#/components/schemas/{model}"


def body_of(model: type[BaseModel]) -> dict[str, Any]:
    """A route's `openapi_extra`: a required JSON body, `model`."""
    schema = {"$ref": _REF.format(model=model.__name__)}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def add_components(app: FastAPI, model: type[BaseModel]) -> None:
    """Add `model` and the models it uses to the app's OpenAPI components, built when first asked for."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            found = model.model_json_schema(ref_template=_REF, by_alias=True)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update({**found.pop("$defs", {}), model.__name__: found})
        return app.openapi_schema or {}

    app.openapi = openapi  # type: ignore[method-assign]
