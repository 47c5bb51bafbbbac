"""The OpenAPI 3.1 document, generated from the route table and the msgspec models."""

from __future__ import annotations

import re
from typing import Any

import msgspec

from tidings import __version__
from tidings.api import models as m
from tidings.api.http import Route
from tidings.protocol.errors import KINDS

_PARAM = re.compile(r"{(\w+)}")


def _ref(t: type) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{t.__name__}"}


def build_openapi(routes: list[Route]) -> dict[str, Any]:
    types: list[type] = [m.ErrorResponse]
    for r in routes:
        types.extend(t for t in (r.body, r.response) if t is not None)
    _, components = msgspec.json.schema_components(
        list(dict.fromkeys(types)), ref_template="#/components/schemas/{name}"
    )
    paths: dict[str, dict[str, Any]] = {}
    codes = ", ".join(f"`{k}`" for k in KINDS)
    for r in routes:
        op: dict[str, Any] = {
            "summary": r.summary,
            "operationId": f"{r.method.lower()}_{r.handler.__name__}",
            "responses": {
                str(r.status): (
                    {
                        "description": "OK",
                        "content": {"application/json": {"schema": _ref(r.response)}},
                    }
                    if r.response is not None
                    else {"description": "Done"}
                ),
                "default": {
                    "description": f"Error; `error.code` is one of {codes}",
                    "content": {"application/json": {"schema": _ref(m.ErrorResponse)}},
                },
            },
        }
        params = [
            {"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
            for p in _PARAM.findall(r.path)
        ]
        params += [
            {
                "name": q,
                "in": "query",
                "required": False,
                "description": d,
                "schema": {"type": "integer"},
            }
            for q, d in r.query
        ]
        if params:
            op["parameters"] = params
        if r.body is not None:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": _ref(r.body)}},
            }
        if r.auth == "admin":
            op["security"] = [{"adminKey": []}]
        elif r.auth == "client":
            op["security"] = [{"deviceToken": []}]
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "Tidings server API", "version": __version__},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "adminKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The server's admin key",
                },
                "deviceToken": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
            },
        },
    }
