"""Request and response bodies: the HTTP contract, and the OpenAPI document generated from it.

Every field is strict and bounded here, at the edge, so that nothing past validation can overflow
a 64-bit integer, a float or a JSON writer: FastAPI parses bodies with the standard library, which
happily yields integers of any size, ``inf`` for ``1e400`` and lone UTF-16 surrogates. Ids are the
user's raw ids (strings or integers, compared as strings) at this edge only.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator

from recsys import query
from recsys.experiments.definition import Experiment, Variant

INT64 = query.INT64  # what orjson and numpy hold
MAX_ID_CHARS = query.MAX_ID_CHARS
MAX_TIMESTAMP = 4_102_444_800  # 2100-01-01 in epoch seconds: larger values are milliseconds sent by mistake
YEAR_RANGE = query.YEAR_RANGE
MAX_LIST = 1000  # items in any list field; the settings bound the ones that matter tighter


def _text(value: str) -> str:
    """Lone surrogates (``"\\ud800"``) are valid JSON escapes but not text: nothing can write them."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (lone surrogate code points are not)") from None
    return value


def _id_text(value: str) -> str:
    """An id of only whitespace names nothing; say so instead of answering 'unknown id'."""
    if not _text(value).strip():
        raise ValueError("must not be empty")
    return value


Text = Annotated[StrictStr, Field(max_length=MAX_ID_CHARS), AfterValidator(_text)]
Int64 = Annotated[StrictInt, Field(ge=INT64[0], le=INT64[1])]
FiniteFloat = Annotated[StrictFloat, Field(allow_inf_nan=False)]
RawId = Annotated[StrictStr, Field(max_length=MAX_ID_CHARS, pattern=r"\S"), AfterValidator(_id_text)] | Int64
Year = Annotated[StrictInt, Field(ge=YEAR_RANGE[0], le=YEAR_RANGE[1])]
FeatureValue = Text | Int64 | FiniteFloat | None
Features = Annotated[dict[Text, FeatureValue], Field(max_length=100)]


class Strict(BaseModel):
    """Unknown fields are errors, not silently ignored; ``"k": "10"`` and ``"k": true`` are not numbers."""

    model_config = ConfigDict(extra="forbid", strict=True)


class Filters(Strict):
    genres_any: Annotated[list[Text], Field(max_length=MAX_LIST)] | None = Field(
        None, description="keep items with at least one of these genres")
    genres_none: Annotated[list[Text], Field(max_length=MAX_LIST)] | None = Field(
        None, description="drop items with any of these genres")
    year_min: Year | None = None
    year_max: Year | None = None

    @model_validator(mode="after")
    def _range(self) -> "Filters":
        if self.year_min is not None and self.year_max is not None and self.year_min > self.year_max:
            raise ValueError("year_min must be <= year_max")
        return self

    def to_core(self) -> query.Filters:
        return query.Filters(self.genres_any, self.genres_none, self.year_min, self.year_max)


class RecommendOptions(Strict):
    """What a recommendation request asks for, for one user or for a batch of users alike."""

    k: Annotated[StrictInt, Field(ge=1, le=10_000)] = Field(10, description="items to return (at most the max_k setting)")
    candidates: Annotated[StrictInt, Field(ge=1, le=100_000)] | None = Field(
        None, description="ANN recall depth (default from settings; at most the max_candidates setting)")
    exclude_seen: StrictBool = True
    filters: Filters | None = None
    explain: StrictBool = False
    trace: StrictBool = Field(False, description="also return the user's recent history and every candidate the "
                              "re-ranker scored, in recall order (what the web page shows)")

    def options(self) -> dict:
        """The options as the core's fields."""
        return dict(k=self.k, candidates=self.candidates, exclude_seen=self.exclude_seen,
                    filters=None if self.filters is None else self.filters.to_core(), explain=self.explain, trace=self.trace)

    def to_core(self) -> query.RecommendOptions:
        return query.RecommendOptions(**self.options())


class RecommendRequest(RecommendOptions):
    """A known user by id, or a user the model never saw by features and recent item ids."""

    user_id: RawId | None = None
    features: Features | None = Field(
        None, description="for a new user: feature name -> value; numbers outside the training range are clipped to it")
    recent_items: Annotated[list[RawId], Field(max_length=MAX_LIST)] | None = Field(
        None, description="oldest first; the last one is the most recent")

    def to_core(self) -> query.RecommendRequest:
        return query.RecommendRequest(**self.options(), user_id=self.user_id, features=self.features,
                                      recent_items=self.recent_items)


class RecommendQuery(BaseModel):
    """``GET /recommend``'s query parameters (lax: a query string is text), validated in one pass by the route's own
    reader (``recommend_query``) and documented from this model."""

    user_id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    k: int = Field(10, ge=1, le=10_000, description="items to return (at most the max_k setting)")
    candidates: int | None = Field(None, ge=1, le=100_000, description="ANN recall depth (default from settings)")
    exclude_seen: bool = True
    explain: bool = False
    genres_any: list[str] | None = Field(None, max_length=MAX_LIST, description="repeat the parameter for several genres")
    genres_none: list[str] | None = Field(None, max_length=MAX_LIST)
    year_min: int | None = Field(None, ge=YEAR_RANGE[0], le=YEAR_RANGE[1])
    year_max: int | None = Field(None, ge=YEAR_RANGE[0], le=YEAR_RANGE[1])

    def to_request(self) -> RecommendRequest:
        """The POST body this asks for (its checks too: a year range the wrong way round, a blank id)."""
        filters = None
        if self.genres_any or self.genres_none or self.year_min is not None or self.year_max is not None:
            filters = Filters(genres_any=self.genres_any, genres_none=self.genres_none, year_min=self.year_min,
                              year_max=self.year_max)
        return RecommendRequest(user_id=self.user_id, k=self.k, candidates=self.candidates, exclude_seen=self.exclude_seen,
                                filters=filters, explain=self.explain)


class BatchRecommendRequest(RecommendOptions):
    """Known users by id, each answered as a single ``/recommend`` would be (same options for all)."""

    user_ids: Annotated[list[RawId], Field(min_length=1, max_length=100_000)] = Field(
        description="at most the max_batch_users setting; an id may repeat")


RequestId = Annotated[StrictStr, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_\-]+$")]
IDEMPOTENCY_KEY = dict(min_length=1, max_length=255, pattern=r"^[!-~]+$")  # visible ASCII, as HTTP header values allow


class EventRequest(Strict):
    user_id: RawId
    item_id: RawId
    rating: FiniteFloat | Int64 | None = Field(None, description="within the bundle's rating scale (GET /ready)")
    timestamp: Annotated[StrictInt, Field(ge=0, le=MAX_TIMESTAMP)] | None = Field(
        None, description="epoch seconds; default: now")
    type: Annotated[StrictStr, Field(max_length=32)] | None = Field(
        None, description="click, view, add_to_cart, purchase, rating... (the feedback_types setting); which count as "
                          "clicks is the positive_types setting")
    request_id: RequestId | None = Field(None, description="the answer this feedback is about: it is joined to that "
                                         "answer's impression (within the feedback_window_s setting)")
    position: Annotated[StrictInt, Field(ge=1, le=10_000)] | None = Field(
        None, description="1-based position the item was shown at; default: found in the impression")
    event_id: Annotated[StrictStr, Field(**IDEMPOTENCY_KEY)] | None = Field(
        None, description="the client's id for this event (or the Idempotency-Key header): a retry with the same id "
                          "and body within the idempotency window is recorded once")


class VariantBody(Strict):
    name: Annotated[StrictStr, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,39}$")]
    share: Annotated[float, Field(gt=0, le=1, strict=False, allow_inf_nan=False)] | None = Field(
        None, description="a split's share of users (served variants' shares sum to 1); a shadow variant's: of the users "
                          "it is also computed for (default all); none in interleave mode")
    bundle: Annotated[StrictStr, Field(max_length=200, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")] | None = Field(
        None, description="a version directory under the bundle root, or 'current' (default: the live bundle)")
    ranker: StrictBool | None = Field(None, description="false: serve the recall order without the re-ranker")
    candidates: Annotated[StrictInt, Field(ge=1, le=100_000)] | None = Field(None, description="ANN recall depth")
    item_item: StrictBool | None = Field(None, description="false: no item-item candidates")
    explore: Annotated[float, Field(ge=0, le=1, strict=False, allow_inf_nan=False)] | None = Field(
        None, description="probability that an answer gets one random swap of adjacent positions (propensities logged)")
    popularity: StrictBool | None = Field(None, description="true: the most popular allowed items for everyone (the "
                                          "baseline a model must beat)")
    shadow: StrictBool = Field(False, description="computed and logged beside the served answer, never served")


class ExperimentBody(Strict):
    variants: Annotated[list[VariantBody], Field(min_length=1, max_length=8)] = Field(
        description="the first served variant is the control")
    mode: Literal["split", "interleave"] = Field("split", description="split: each user sees one variant; interleave: "
                                                 "two variants' lists merged by team draft for every user")
    alpha: Annotated[float, Field(gt=0, lt=0.5, strict=False)] = Field(0.05, description="error rate of the sequential test")

    def to_core(self, name: str) -> Experiment:
        return Experiment(name, tuple(Variant(**v.model_dump()) for v in self.variants), self.mode, float(self.alpha))


class ItemUpsert(Strict):
    item_id: RawId
    title: Annotated[StrictStr, Field(max_length=1000), AfterValidator(_text)] = ""
    genres: Annotated[list[Text], Field(max_length=MAX_LIST)] = Field(default_factory=list)
    year: Year | None = None
    features: Features = Field(default_factory=dict, description="numbers outside the training range are clipped to it")
    description: Annotated[StrictStr, Field(max_length=query.MAX_DESCRIPTION_CHARS), AfterValidator(_text)] = Field(
        "", description="free text; with the title (and any text features), what the sentence encoder reads when "
        "the bundle uses item text, so an item nobody has interacted with is placed by what it is about")

    def to_core(self) -> query.Item:
        return query.Item(self.item_id, self.title, list(self.genres), self.year, dict(self.features), self.description)


class ItemBatch(Strict):
    items: Annotated[list[ItemUpsert], Field(min_length=1, max_length=MAX_LIST)]


class ReloadRequest(Strict):
    version: Annotated[StrictStr, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")] | None = Field(
        None, description="a version directory under the bundle root; default: what 'current' names")


# ----------------------------------------------------------------------------- responses
class ErrorBody(BaseModel):
    """The one error shape of every 4xx and 5xx."""

    error: str
    details: list[dict[str, Any]] | None = Field(None, description="per-field problems, on 422 only")


class RecommendedItem(BaseModel):
    item_id: str
    title: str
    genres: list[str]
    year: int | None
    recall_score: float | None = Field(description="inner product of user and item vectors; null for a fallback")
    recall_rank: int | None = Field(description="0-based position in the recall order; null for a fallback")
    ranking_score: float | None = Field(description="re-ranker score; null without a re-ranker or for a fallback")
    popularity: float | None = Field(None, description="interaction count; set only by the popularity fallback")
    source: str | None = Field(None, description="candidate source: 'two-tower' (ANN over the user vector) or "
                               "'item-item' (neighbours of the recent items, added where the two-tower missed them); "
                               "null for a fallback")
    features: dict[str, float | str | int | None] | None = Field(None, description="with explain=true: why this item")


class HistoryItem(BaseModel):
    item_id: str
    title: str
    rating: float | None = Field(description="null for an event without a rating or an item sent in recent_items")
    timestamp: int | None = Field(description="epoch seconds; null for an item sent in recent_items")


class Candidate(BaseModel):
    item_id: str
    title: str
    recall_score: float
    recall_rank: int = Field(description="0-based position in the recall order (the two-tower's, then the item-item channel's)")
    source: str
    ranking_score: float | None = Field(description="re-ranker score; null without a re-ranker")
    rank: int | None = Field(description="0-based position in the returned items; null when not returned")


class Trace(BaseModel):
    history: list[HistoryItem] = Field(description="the most recent interactions, most recent first (at most 50)")
    history_length: int
    candidates: list[Candidate]


Assignments = Field(default_factory=dict, description="experiment -> variant this answer was served in (an "
                    "interleaving: 'a+b'); empty when no experiment applies (or the request had no user id)")


class RecommendResponse(BaseModel):
    user_id: str | None
    request_id: str = Field(description="names this answer: send it with feedback (POST /events) to join the impression")
    assignments: dict[str, str] = Assignments
    items: list[RecommendedItem]
    bundle_version: str
    fallback: Literal["popularity"] | None
    timings_ms: dict[str, float]
    trace: Trace | None = Field(None, description="with trace=true")


class UserResult(BaseModel):
    """One user's answer in a batch: items as for /recommend, or the error a single request would get."""

    user_id: str
    request_id: str | None = Field(None, description="names this user's answer (null with an error)")
    assignments: dict[str, str] = Assignments
    bundle_version: str | None = Field(None, description="the bundle that answered (an experiment may serve another)")
    items: list[RecommendedItem] | None = None
    fallback: Literal["popularity"] | None = None
    trace: Trace | None = None
    error: str | None = Field(None, description="why this user has no items (the batch still succeeds)")
    status: int | None = Field(None, description="the HTTP status a single /recommend would have answered")


class BatchRecommendResponse(BaseModel):
    results: list[UserResult] = Field(description="one per requested user id, in request order")
    bundle_version: str
    timings_ms: dict[str, float] = Field(description="per stage, for the whole batch")


class SimilarItemsResponse(BaseModel):
    item_id: str
    bundle_version: str
    source: Literal["two-tower", "content"] = Field(description="'two-tower': nearest by the item vectors the two-tower "
                                                    "learnt from interactions; 'content': the item has no interactions "
                                                    "yet, nearest by its text and metadata")
    items: list[RecommendedItem]


class EventResponse(BaseModel):
    status: Literal["recorded"]
    user_id: str
    history_length: int
    joined: bool | None = Field(None, description="whether the feedback joined its request's impression (null "
                                "without a request_id)")
    position: int | None = Field(None, description="the 1-based position it joined at")
    reason: str | None = Field(None, description="why it did not join")


class ExperimentDefinition(BaseModel):
    name: str
    mode: Literal["split", "interleave"]
    alpha: float
    started_ms: int = Field(description="when this definition started (epoch ms): its report counts impressions since")
    variants: list[dict[str, Any]]


class ExperimentDeleted(BaseModel):
    name: str
    status: Literal["deleted"]


class ExperimentList(BaseModel):
    experiments: list[ExperimentDefinition]


class ExperimentReport(BaseModel):
    """The online metrics of an experiment's variants, from the retained impressions and their joined feedback."""

    name: str
    mode: Literal["split", "interleave"]
    started_ms: int
    alpha: float
    positive_types: list[str]
    definition: ExperimentDefinition
    test: str
    intervals: str = Field(description="which intervals are fixed-horizon summaries and which are always valid")
    variants: list[dict[str, Any]] = Field(description="per served variant: users, impressions, clicks, ctr (value, "
                                           "interval), feedback_per_impression, ctr_at (positions 1..10), mrr, "
                                           "latency_ms, and vs_control (difference, always-valid interval, p_value, "
                                           "significant, detectable)")
    shadows: list[dict[str, Any]]
    sample_ratio: dict[str, Any] | None = Field(None, description="a split: users per variant against the shares")
    interleave: dict[str, Any] | None = Field(None, description="an interleaving: wins, ties, and B's preference test")


class ItemChangeResponse(BaseModel):
    item_id: str
    status: Literal["added", "replaced", "removed"]


class ItemBatchResponse(BaseModel):
    items: list[ItemChangeResponse] = Field(description="one per item sent, in order")


class ReloadResponse(BaseModel):
    status: Literal["reloaded"]
    previous_version: str
    bundle_version: str


class HealthResponse(BaseModel):
    status: Literal["alive"]


class RatingScale(BaseModel):
    min: float
    max: float


class ReadyResponse(BaseModel):
    status: Literal["ready", "degraded"]
    state_store: str = Field(description="'ok', or why the state store cannot be reached (writes then get 503)")
    bundle_version: str
    items: int
    rating_scale: RatingScale = Field(description="the ratings /events accepts: the range the model was trained on")


class BundleInfo(BaseModel):
    bundle_version: str
    items: int
    users: int
    genres: list[str]
    years: dict[str, int | None]
    rating_scale: RatingScale
    candidates: int = Field(description="the two-tower depth the bundle's re-ranker was evaluated on")
    item_item_candidates: int
    index_ef: int = Field(description="the HNSW search beam in effect (hnswlib's ef: the bundle's, or RECSYS_INDEX_EF)")
    index_insert_ef: int = Field(description="the HNSW beam that items changed online are inserted with (hnswlib's "
                                 "ef_construction: the bundle's, or RECSYS_INDEX_INSERT_EF)")
    ranker: str | None
    example_users: list[str] = Field(description="a few known user ids (the bundle's first ones)")
