"""The OpenAPI document, with this deployment's limits (``max_k``...) in place of the schemas' hard ceilings,
so that a client, and the fuzz test in CI, knows what the service really accepts."""
from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

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


def query_parameters(model: type[BaseModel]) -> list[dict]:
    """The OpenAPI parameters of a query-parameter model, as FastAPI writes them for ``Annotated[model, Query()]``
    (a route that parses its query itself declares them with ``openapi_extra``; a test holds the two equal)."""
    schema = model.model_json_schema()
    params = []
    for name, prop in schema["properties"].items():
        prop = {k: v for k, v in prop.items() if not (k == "default" and v is None)}
        param = {"name": name, "in": "query", "required": name in schema.get("required", []), "schema": prop}
        if "description" in prop:
            param["description"] = prop["description"]
        params.append(param)
    return params
