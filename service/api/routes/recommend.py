"""Recommendations: ``/recommend`` (GET and POST), ``/recommend/batch``, ``/similar-items``, ``/info``."""
from __future__ import annotations

from typing import Annotated, get_args, get_origin

from fastapi import APIRouter, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from recsys import metrics as core_metrics
from recsys.engine.engine import BatchAnswer
from recsys.errors import RecsysError
from service import metrics
from service.api.deps import EngineDep, LiveDep, PathId
from service.api.errors import ApiError, status_of
from service.api.openapi import query_parameters
from service.config import Settings, get_settings
from service.http import FastJSONResponse, errors
from service.schemas import (BatchRecommendRequest, BatchRecommendResponse, BundleInfo, RecommendOptions, RecommendQuery,
                             RecommendRequest, RecommendResponse, SimilarItemsResponse)

router = APIRouter(tags=["recommend"])


def recommend_query(request: Request) -> RecommendRequest:
    """GET ``/recommend``'s query read and validated in one pass, as the POST body it stands for. FastAPI's own
    solving of the same model looks at each field's annotation and multidict on every request: 8% of a saturated
    worker's GIL-holding samples. A repeated parameter's last value counts, a list's every value (as FastAPI does);
    unknown parameters are ignored. Every problem is named by its query parameter, the body's checks too."""
    values: dict[str, str | list[str]] = {}
    for key, value in request.query_params.multi_items():
        if key in QUERY_LISTS:
            values.setdefault(key, []).append(value)  # type: ignore[union-attr]
        else:
            values[key] = value
    try:
        return RecommendQuery.model_validate(values).to_request()
    except ValidationError as err:
        nested = err.title == "Filters"  # (a filter built on its own: its fields' places are relative to it)
        raise RequestValidationError([{**e, "loc": query_loc(("filters", *e["loc"]) if nested else e["loc"])}
                                      for e in err.errors(include_url=False)]) from None


def query_loc(loc: tuple) -> tuple:
    """A problem's place as the query names it: a filter's field is a parameter of its own, and the year range's
    own check (on the filters as a whole) is a problem with ``year_max``."""
    if loc[:1] == ("filters",):
        loc = loc[1:] or ("year_max",)
    return ("query", *loc)


QUERY_LISTS = {name for name, field in RecommendQuery.model_fields.items()  # parameters that repeat
               if list in (get_origin(field.annotation), *map(get_origin, get_args(field.annotation)))}


@router.get("/recommend", response_model=RecommendResponse, responses=errors(404, 422, 503),
            openapi_extra={"parameters": query_parameters(RecommendQuery)})
async def recommend_get(request: Request):
    """The POST pipeline for a known user; filters as repeated query parameters (``genres_any=a&genres_any=b``).
    Takes the bare request (its query read by ``recommend_query``, the engine from the app's state): FastAPI's
    solving of two dependencies was 6% of a saturated worker's samples."""
    return await recommend_post(recommend_query(request), request.app.state.service)


@router.post("/recommend", response_model=RecommendResponse, responses=errors(400, 404, 408, 413, 422, 503))
async def recommend_post(body: RecommendRequest, live: LiveDep):
    """The answer carries a ``request_id`` (send it back with feedback) and the user's experiment ``assignments``.
    Answered on the event loop (the history read awaited, then under a millisecond of CPU): see
    ``LiveEngine.recommend``."""
    settings = get_settings()
    check_options(body, settings)
    if body.recent_items is not None and len(body.recent_items) > settings.max_recent_items:
        raise ApiError(422, f"recent_items may hold at most {settings.max_recent_items} ids")
    return FastJSONResponse(await live.recommend(body.to_core(), settings.default_candidates))


@router.post("/recommend/batch", response_model=BatchRecommendResponse, responses=errors(400, 408, 413, 422))
def recommend_batch(body: BatchRecommendRequest, live: LiveDep):
    """Known users by id, answered together: one tower call, one batched ANN query, one ranker pass. Each result
    is what ``/recommend`` would answer for that user with these options; a user it would refuse (an unknown
    id: 404) gets that error and status in its place, and the rest of the batch is still answered."""
    settings = get_settings()
    check_options(body, settings)
    if len(body.user_ids) > settings.max_batch_users:
        raise ApiError(422, f"user_ids may hold at most {settings.max_batch_users} ids (RECSYS_MAX_BATCH_USERS)")
    answer = batch_body(live.recommend_batch(body.user_ids, body.to_core(), settings.default_candidates,
                                             core_metrics.BATCH_STAGE))
    failed = sum(result["error"] is not None for result in answer["results"])
    metrics.BATCH_USERS.labels("answered").inc(len(answer["results"]) - failed)
    metrics.BATCH_USERS.labels("error").inc(failed)
    return FastJSONResponse(answer)


def batch_body(batch: BatchAnswer) -> dict:
    """The batch response: each user's answer, or its error and the status a single request would have got."""
    results = [{"user_id": str(user), "request_id": None, "assignments": {}, "bundle_version": None, "items": None,
                "error": a.message, "status": status_of(a)} if isinstance(a, RecsysError)
               else {**a, "error": None, "status": None} for user, a in zip(batch.user_ids, batch.answers)]
    return {"results": results, "bundle_version": batch.bundle_version, "timings_ms": batch.timings_ms}


def check_options(body: RecommendOptions, settings: Settings) -> None:
    if body.k > settings.max_k:
        raise ApiError(422, f"k must be <= {settings.max_k}")
    if body.candidates is not None and body.candidates > settings.max_candidates:
        raise ApiError(422, f"candidates must be <= {settings.max_candidates}")


@router.get("/similar-items/{item_id:path}", response_model=SimilarItemsResponse, responses=errors(404, 422))
def similar_items(item_id: PathId, engine: EngineDep, k: Annotated[int, Query(ge=1, le=10_000)] = 10):
    """Item ids may contain ``/`` (the path takes the rest of the URL), as the catalogue accepts them."""
    if k > get_settings().max_k:
        raise ApiError(422, f"k must be <= {get_settings().max_k}")
    return FastJSONResponse(engine.similar_items(item_id, k))


@router.get("/info", response_model=BundleInfo)
def info(engine: EngineDep):
    """What this replica serves: the bundle, its catalogue's genres and years, a few known users (the web page's
    form is built from it)."""
    return FastJSONResponse(engine.info())
