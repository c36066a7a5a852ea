"""The OpenAPI document, with this deployment's limits (``max_k``...) in place of the schemas' hard ceilings,
so that a client, and the fuzz test in CI, knows what the service really accepts."""
from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from service.config import Settings, get_settings


def install(app: FastAPI) -> None:
    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            apply_limits(schema, get_settings())
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def apply_limits(schema: dict, settings: Settings) -> None:
    def limit(node: dict, key: str, value: int) -> None:
        for branch in node.get("anyOf", [node]):  # ``int | None`` is an anyOf with a null branch
            if branch.get("type") in ("integer", "array"):
                branch[key] = value

    for name in ("RecommendRequest", "BatchRecommendRequest"):
        body = schema["components"]["schemas"][name]["properties"]
        limit(body["k"], "maximum", settings.max_k)
        limit(body["candidates"], "maximum", settings.max_candidates)
    limit(schema["components"]["schemas"]["RecommendRequest"]["properties"]["recent_items"], "maxItems",
          settings.max_recent_items)
    limit(schema["components"]["schemas"]["BatchRecommendRequest"]["properties"]["user_ids"], "maxItems",
          settings.max_batch_users)
    for path in ("/recommend", "/similar-items/{item_id}"):
        for param in schema["paths"][path]["get"]["parameters"]:
            if param["name"] in ("k", "candidates"):
                limit(param["schema"], "maximum", settings.max_k if param["name"] == "k" else settings.max_candidates)
