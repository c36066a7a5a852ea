"""A typed Python client for the recommender's HTTP API: ``RecsysClient`` (blocking) and ``AsyncRecsysClient``.

It imports only the standard library, httpx and anyio (an httpx dependency), so that a caller (a load generator,
a batch job, another service) stays light: no FastAPI, torch or numpy come with it.

Every call is first described without I/O (a ``Call``: method, path, body, how to read the answer, whether it
may be retried); both clients send that description through one retry policy (``Attempts``), so the API is
written once and each client only adds its own send loop. Reads are retried on connection errors, timeouts
and 502/503/504/429; a write only when it carries an idempotency key, the same on every attempt, which the
client makes for every write the service deduplicates. A 4xx other than 429 is never retried.
"""
from __future__ import annotations

import email.utils
import functools
import inspect
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Generic, Literal, ParamSpec, Self, TypeVar, overload
from urllib.parse import quote

import anyio
import httpx

T = TypeVar("T")
P = ParamSpec("P")
D = TypeVar("D")

IDEMPOTENCY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"


# ----------------------------------------------------------------------------- errors
class ClientError(Exception):
    """Anything a call of this client raises: the service's refusal, or no answer at all."""


class ConnectionFailed(ClientError):
    """No answer: the connection failed or timed out on the last attempt (the httpx error is the cause)."""


class UnexpectedAnswer(ClientError):
    """A success whose body this client cannot read: not JSON, or without a field it needs."""


class ApiError(ClientError):
    """The service answered an error status; ``message`` is its ``{"error": ...}`` text, ``details`` its
    per-field problems (422), ``request_id`` the id its logs carry for this request."""

    def __init__(self, status: int, message: str, details: list[dict] | None = None, request_id: str | None = None):
        super().__init__(f"{status}: {message}")
        self.status, self.message, self.details, self.request_id = status, message, details, request_id


class RequestRejected(ApiError):
    """A 4xx: the request itself must change (never retried, 429 aside)."""


class Unauthorized(RequestRejected):
    """401 (missing or wrong admin token) or 403 (admin endpoints disabled)."""


class NotFound(RequestRejected):
    """404: an unknown user, item or experiment."""


class Conflict(RequestRejected):
    """409: a failed reload (the old bundle keeps serving) or a clashing experiment."""


class InvalidRequest(RequestRejected):
    """400, 413 or 422: malformed, oversized or invalid fields (``details`` names them on 422)."""


class ServerError(ApiError):
    """A 5xx, after whatever retries the call allowed."""


class Unavailable(ServerError):
    """502, 503 or 504: not ready, the state store unreachable (a write retried with its idempotency key is then
    recorded once), or a proxy without a replica."""


_ERRORS: dict[int, type[ApiError]] = {400: InvalidRequest, 401: Unauthorized, 403: Unauthorized, 404: NotFound,
                                       409: Conflict, 413: InvalidRequest, 422: InvalidRequest, 502: Unavailable,
                                       503: Unavailable, 504: Unavailable}


def api_error(response: httpx.Response) -> ApiError:
    """The exception for an error response, with the service's message (or the body's start, from a proxy)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    known = isinstance(body, dict) and isinstance(body.get("error"), str)
    message = body["error"] if known else (response.text[:200] or response.reason_phrase)
    kind = _ERRORS.get(response.status_code, RequestRejected if response.status_code < 500 else ServerError)
    return kind(response.status_code, message, body.get("details") if known else None, response.headers.get("x-request-id"))


# ----------------------------------------------------------------------------- retries
@dataclass(frozen=True)
class Retry:
    """When a failed attempt is tried again: at most ``attempts`` attempts (the first included), each wait
    ``backoff_s * 2**n`` capped at ``max_backoff_s`` and scaled down by up to ``jitter`` (so that many clients
    failing together do not come back together), or what the service's ``Retry-After`` asks; never past
    ``deadline_s`` from the call's start, which also bounds each attempt's timeouts."""

    attempts: int = 4
    backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    jitter: float = 0.5
    deadline_s: float = 30.0
    statuses: frozenset[int] = frozenset({429, 502, 503, 504})

    def backoff(self, failures: int) -> float:
        """The wait after the ``failures``-th failed attempt."""
        return min(self.max_backoff_s, self.backoff_s * 2 ** (failures - 1)) * (1 - self.jitter * random.random())


NO_RETRY = Retry(attempts=1)


def retry_after(response: httpx.Response) -> float | None:
    """``Retry-After`` in seconds, given as seconds or as an HTTP date; None when absent or unreadable."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class Attempts:
    """One logical call's attempts under a ``Retry``: what each attempt may take, and after a failure whether
    and how long to wait before the next one. The same for both clients; it does no I/O."""

    def __init__(self, call: Call, retry: Retry, timeout: httpx.Timeout):
        self.call, self.retry, self.timeout = call, retry, timeout
        self.started, self.failures = time.monotonic(), 0

    def remaining(self) -> float:
        return self.retry.deadline_s - (time.monotonic() - self.started)

    def attempt_timeout(self) -> httpx.Timeout:
        """The configured timeouts, none beyond the call's deadline."""
        left = max(self.remaining(), 0.001)
        return httpx.Timeout(connect=min(self.timeout.connect or left, left), read=min(self.timeout.read or left, left),
                             write=min(self.timeout.write or left, left), pool=min(self.timeout.pool or left, left))

    def wait_after(self, outcome: httpx.Response | httpx.TransportError) -> float | None:
        """None when ``outcome`` succeeded; else the seconds to wait before trying again, or raises the call's
        error when it may not be retried, the attempts are spent, or the wait would cross the deadline."""
        if isinstance(outcome, httpx.Response) and outcome.is_success:
            return None
        self.failures += 1
        wait = self._wait(outcome)
        if wait is None or self.failures >= self.retry.attempts or wait > self.remaining():
            if isinstance(outcome, httpx.Response):
                raise api_error(outcome)
            raise ConnectionFailed(f"{self.call.method} {self.call.path}: {type(outcome).__name__}: {outcome}") from outcome
        return wait

    def _wait(self, outcome: httpx.Response | httpx.TransportError) -> float | None:
        """The wait a retriable failure asks for (``Retry-After`` first), None for one that is final."""
        if not self.call.retriable:
            return None
        if isinstance(outcome, httpx.TransportError):
            return self.retry.backoff(self.failures)
        if outcome.status_code not in self.retry.statuses:
            return None
        asked = retry_after(outcome)
        return self.retry.backoff(self.failures) if asked is None else asked


# ----------------------------------------------------------------------------- typed results
def _known(cls: type[D], data: Mapping[str, Any], **values: Any) -> D:
    """``cls`` from a JSON object: the fields it knows (a newer service may send more, which are kept in ``raw``
    where the class has one), then ``values`` (nested results, already built) over them."""
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    own = {k: v for k, v in data.items() if k in names}
    if "raw" in names:
        own["raw"] = data
    return cls(**{**own, **values})


@dataclass(frozen=True)
class Item:
    """A recommended or similar item. ``score`` is what the list is ordered by."""

    item_id: str
    title: str = ""
    genres: tuple[str, ...] = ()
    year: int | None = None
    recall_score: float | None = None
    recall_rank: int | None = None
    ranking_score: float | None = None
    popularity: float | None = None
    source: str | None = None
    features: Mapping[str, Any] | None = None

    @property
    def score(self) -> float | None:
        """The re-ranker's score, else the recall score, else the popularity (a fallback list)."""
        return next((s for s in (self.ranking_score, self.recall_score, self.popularity) if s is not None), None)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Item:
        return _known(cls, data, genres=tuple(data.get("genres") or ()))


class _ItemList:
    """An answer with a list of ``items``."""

    items: tuple[Item, ...]

    @property
    def item_ids(self) -> list[str]:
        return [i.item_id for i in self.items]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        """Its items null for a user a batch could not answer."""
        return _known(cls, data, items=tuple(Item.from_json(i) for i in data["items"] or ()))


@dataclass(frozen=True)
class Recommendations(_ItemList):
    """One user's answer. ``request_id`` names it: send it back with feedback (``record_event``)."""

    user_id: str | None
    items: tuple[Item, ...] = ()
    bundle_version: str | None = None
    request_id: str | None = None
    fallback: str | None = None
    assignments: Mapping[str, str] = field(default_factory=dict)
    timings_ms: Mapping[str, float] = field(default_factory=dict)
    trace: Mapping[str, Any] | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class UserResult(Recommendations):
    """One user's answer in a batch: the items, or the ``error`` and ``status`` a single request would have got."""

    error: str | None = None
    status: int | None = None


@dataclass(frozen=True)
class BatchRecommendations:
    """One result per requested user id, in request order."""

    results: tuple[UserResult, ...]
    bundle_version: str
    timings_ms: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BatchRecommendations:
        return _known(cls, data, results=tuple(UserResult.from_json(r) for r in data["results"]))


@dataclass(frozen=True)
class SimilarItems(_ItemList):
    """``source``: 'two-tower' (learnt from interactions) or 'content' (an item nobody has interacted with yet)."""

    item_id: str
    items: tuple[Item, ...]
    bundle_version: str | None = None
    source: str | None = None


@dataclass(frozen=True)
class EventRecorded:
    """A recorded event. ``replayed``: the service had already recorded this idempotency key (a retry), and
    answered what it answered then. ``joined``/``position``/``reason``: feedback joined to its impression."""

    user_id: str
    history_length: int
    joined: bool | None = None
    position: int | None = None
    reason: str | None = None
    replayed: bool = False


@dataclass(frozen=True)
class ItemChange:
    """``status``: 'added', 'replaced' or 'removed'."""

    item_id: str
    status: str
    replayed: bool = False


@dataclass(frozen=True)
class ItemChanges:
    items: tuple[ItemChange, ...]
    replayed: bool = False


@dataclass(frozen=True)
class Reloaded:
    previous_version: str
    bundle_version: str


@dataclass(frozen=True)
class Ready:
    """``status`` 'degraded' (with ``state_store`` saying why) still serves reads; writes then get 503."""

    status: str
    bundle_version: str
    items: int
    state_store: str = "ok"
    rating_scale: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class BundleInfo:
    bundle_version: str
    items: int
    users: int
    genres: tuple[str, ...] = ()
    years: Mapping[str, int | None] = field(default_factory=dict)
    rating_scale: Mapping[str, float] = field(default_factory=dict)
    example_users: tuple[str, ...] = ()
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BundleInfo:
        return _known(cls, data, genres=tuple(data.get("genres", ())), example_users=tuple(data.get("example_users", ())))


@dataclass(frozen=True)
class Variant:
    """A served configuration of an experiment; unset options are the live service's own."""

    name: str
    share: float | None = None
    bundle: str | None = None
    ranker: bool | None = None
    candidates: int | None = None
    item_item: bool | None = None
    explore: float | None = None
    popularity: bool | None = None
    shadow: bool = False

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None and not (k == "shadow" and not v)}


@dataclass(frozen=True)
class ExperimentDefinition:
    """``created``: this call created the experiment (201), rather than replaced or confirmed it (200)."""

    name: str
    mode: str
    alpha: float
    started_ms: int
    variants: tuple[Variant, ...]
    created: bool = False

    @classmethod
    def from_json(cls, data: Mapping[str, Any], created: bool = False) -> ExperimentDefinition:
        return _known(cls, data, variants=tuple(_known(Variant, v) for v in data["variants"]), created=created)


@dataclass(frozen=True)
class ExperimentReport:
    """Per served variant (``variants``): users, impressions, clicks, ctr with its interval, and ``vs_control``
    with the always-valid test; ``sample_ratio`` for a split, ``interleave`` for an interleaving."""

    name: str
    mode: str
    variants: tuple[Mapping[str, Any], ...]
    started_ms: int | None = None
    shadows: tuple[Mapping[str, Any], ...] = ()
    sample_ratio: Mapping[str, Any] | None = None
    interleave: Mapping[str, Any] | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def variant(self, name: str) -> Mapping[str, Any]:
        """One variant's numbers by name (KeyError naming it when the report has none)."""
        found = next((v for v in self.variants if v.get("name") == name), None)
        if found is None:
            raise KeyError(f"experiment {self.name!r} reports no variant {name!r}")
        return found

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ExperimentReport:
        return _known(cls, data, variants=tuple(data["variants"]), shadows=tuple(data.get("shadows", ())))


# ----------------------------------------------------------------------------- request arguments
@dataclass(frozen=True)
class Filters:
    """Keep items with any of ``genres_any``, drop those with any of ``genres_none``, years within bounds."""

    genres_any: Sequence[str] | None = None
    genres_none: Sequence[str] | None = None
    year_min: int | None = None
    year_max: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class CatalogItem:
    """An item to add or replace; ``description`` is the text the item encoder reads."""

    item_id: str
    title: str = ""
    genres: Sequence[str] = ()
    year: int | None = None
    features: Mapping[str, str | int | float | None] = field(default_factory=dict)
    description: str = ""

    def to_json(self) -> dict[str, Any]:
        """The fields set (the service's defaults are the same), so that a service older than a field still
        accepts an item that leaves it unset."""
        body = {"title": self.title, "genres": list(self.genres), "features": dict(self.features), "description": self.description}
        fields = {name: value for name, value in body.items() if value}
        if self.year is not None:  # (a year 0 is a year)
            fields["year"] = self.year
        return {"item_id": self.item_id, **fields}


def _idempotency_key(given: str | None) -> str:
    """``given`` once checked (1-255 visible ASCII characters, as the service requires), else a new uuid4."""
    if given is None:
        return uuid.uuid4().hex
    if not 1 <= len(given) <= 255 or not all("!" <= c <= "~" for c in given):
        raise ValueError(f"an idempotency key is 1-255 visible ASCII characters, not {given!r}")
    return given


def _options(k: int, candidates: int | None, exclude_seen: bool, filters: Filters | None, explain: bool,
             trace: bool) -> dict[str, Any]:
    """The recommendation options of a body, those left at the service's defaults omitted."""
    given = {"k": k, "candidates": candidates, "exclude_seen": None if exclude_seen else False,
             "filters": filters.to_json() if filters else None, "explain": explain or None, "trace": trace or None}
    return {name: value for name, value in given.items() if value is not None}


# ----------------------------------------------------------------------------- calls, described once
@dataclass(frozen=True)
class Call(Generic[T]):
    """One API call without I/O: what to send and how to read a success. ``safe``: a read, retried on any
    retriable failure; a write is retried only with its ``idempotency_key``, sent on every attempt."""

    method: str
    path: str
    read: Callable[[httpx.Response], T]
    params: Mapping[str, Any] | None = None
    body: Any = None
    safe: bool = False
    admin: bool = False
    idempotency_key: str | None = None

    @property
    def retriable(self) -> bool:
        return self.safe or self.idempotency_key is not None

    def result(self, response: httpx.Response) -> T:
        """The typed result of a success."""
        try:
            return self.read(response)
        except (KeyError, TypeError, ValueError) as err:  # ValueError: not JSON
            raise UnexpectedAnswer(f"{self.method} {self.path}: cannot read the answer ({type(err).__name__}: {err}): "
                                   f"{response.text[:200]!r}") from err

    def headers(self, admin_token: str | None) -> dict[str, str]:
        headers = {IDEMPOTENCY_HEADER: self.idempotency_key} if self.idempotency_key else {}
        if self.admin and admin_token:
            headers["Authorization"] = f"Bearer {admin_token}"
        return headers


def _replayed(response: httpx.Response) -> bool:
    return response.headers.get(REPLAYED_HEADER, "").lower() == "true"


def _reader(build: Callable[[Any], T]) -> Callable[[httpx.Response], T]:
    """Read a success's JSON body with ``build``."""
    return lambda response: build(response.json())


def _item_change(response: httpx.Response) -> ItemChange:
    return _known(ItemChange, response.json(), replayed=_replayed(response))


def _item_changes(response: httpx.Response) -> ItemChanges:
    replayed = _replayed(response)
    changes = tuple(_known(ItemChange, c, replayed=replayed) for c in response.json()["items"])
    return ItemChanges(changes, replayed)


def _event(response: httpx.Response) -> EventRecorded:
    return _known(EventRecorded, response.json(), replayed=_replayed(response))


def _definition(response: httpx.Response) -> ExperimentDefinition:
    return ExperimentDefinition.from_json(response.json(), created=response.status_code == 201)


def _path(template: str, value: str | int) -> str:
    """``template`` with an id in it as one path segment, percent-encoded whole (a ``/`` in it too: the server
    decodes the path and its routes take ids with ``/``). Left as ``/``, an id's ``.`` and ``..`` segments were
    resolved away by httpx before sending: ``remove_item("a/../b")`` removed item ``b``."""
    segment = quote(str(value), safe="")
    return template.format("%2E" * len(segment) if segment in (".", "..") else segment)


class endpoint(Generic[P, T]):
    """An API method, written once: it describes its ``Call`` (a static function: it needs no client), and the
    client it is read from sends it, so it returns the result on ``RecsysClient`` and an awaitable of it on
    ``AsyncRecsysClient``."""

    def __init__(self, describe: Callable[P, Call[T]]):
        self.describe = describe
        self.__doc__, self.__name__ = describe.__doc__, describe.__name__
        self.signature = inspect.signature(describe)
        self.result = str(self.signature.return_annotation).removeprefix("Call[").removesuffix("]")

    @overload
    def __get__(self, client: None, owner: type) -> endpoint[P, T]: ...
    @overload
    def __get__(self, client: RecsysClient, owner: type) -> Callable[P, T]: ...
    @overload
    def __get__(self, client: AsyncRecsysClient, owner: type) -> Callable[P, Awaitable[T]]: ...

    def __get__(self, client, owner):
        if client is None:
            return self
        describe = self.describe

        def method(*args, **kwargs):
            return client.send(describe(*args, **kwargs))

        functools.update_wrapper(method, describe)
        method.__signature__ = self.signature.replace(return_annotation=client.returns.format(self.result))  # for help()
        return method


class _Api:
    """The service's API. Each method is one ``endpoint``; the clients below only send."""

    @endpoint
    @staticmethod
    def health() -> Call[str]:
        """``/health``: 'alive' while the process serves HTTP."""
        return Call("GET", "/health", _reader(lambda b: b["status"]), safe=True)

    @endpoint
    @staticmethod
    def ready() -> Call[Ready]:
        """``/ready``: the bundle served and the state store's health (Unavailable until a bundle is loaded)."""
        return Call("GET", "/ready", _reader(lambda b: _known(Ready, b)), safe=True)

    @endpoint
    @staticmethod
    def info() -> Call[BundleInfo]:
        """``/info``: the bundle, its genres, years and rating scale, a few known user ids."""
        return Call("GET", "/info", _reader(BundleInfo.from_json), safe=True)

    @endpoint
    @staticmethod
    def metrics() -> Call[str]:
        """``/metrics``: the Prometheus text of the process that answered."""
        return Call("GET", "/metrics", lambda response: response.text, safe=True)

    @endpoint
    @staticmethod
    def recommend(user_id: str | int | None = None, *, k: int = 10, candidates: int | None = None,
                  exclude_seen: bool = True, filters: Filters | None = None, explain: bool = False, trace: bool = False,
                  features: Mapping[str, str | int | float | None] | None = None,
                  recent_items: Sequence[str | int] | None = None) -> Call[Recommendations]:
        """Top ``k`` for a known ``user_id``, or for a user the model never saw from ``features`` and
        ``recent_items`` (oldest first). A plain known-user request is a ``GET /recommend`` (cacheable, readable
        in logs); anything with a body (filters, features, recent items, trace) a ``POST``."""
        options = _options(k, candidates, exclude_seen, filters, explain, trace)
        read = _reader(Recommendations.from_json)
        needs_body = features is not None or recent_items is not None or filters is not None or trace
        if user_id is not None and not needs_body:
            params = {"user_id": str(user_id), **{n: str(v).lower() if isinstance(v, bool) else v for n, v in options.items()}}
            return Call("GET", "/recommend", read, params=params, safe=True)
        body = {"user_id": user_id, "features": features, "recent_items": None if recent_items is None else list(recent_items)}
        return Call("POST", "/recommend", read, body={**{n: v for n, v in body.items() if v is not None}, **options}, safe=True)

    @endpoint
    @staticmethod
    def recommend_batch(user_ids: Iterable[str | int], *, k: int = 10, candidates: int | None = None,
                        exclude_seen: bool = True, filters: Filters | None = None, explain: bool = False,
                        trace: bool = False) -> Call[BatchRecommendations]:
        """Known users in one call, each answered as ``recommend`` would; an unknown one gets its error in place."""
        body = {"user_ids": list(user_ids), **_options(k, candidates, exclude_seen, filters, explain, trace)}
        return Call("POST", "/recommend/batch", _reader(BatchRecommendations.from_json), body=body, safe=True)

    @endpoint
    @staticmethod
    def similar_items(item_id: str | int, *, k: int = 10) -> Call[SimilarItems]:
        """Items nearest ``item_id`` (by content for an item nobody has interacted with yet)."""
        return Call("GET", _path("/similar-items/{}", item_id), _reader(SimilarItems.from_json), params={"k": k}, safe=True)

    @endpoint
    @staticmethod
    def record_event(user_id: str | int, item_id: str | int, *, rating: float | None = None, timestamp: int | None = None,
                     type: str | None = None, request_id: str | None = None, position: int | None = None,
                     event_id: str | None = None) -> Call[EventRecorded]:
        """An interaction or feedback (``type``, the answer's ``request_id``, its 1-based ``position``); recorded
        once whatever the retries: ``event_id`` (yours, sent in the body too) or a new key is its idempotency key."""
        body = {"user_id": user_id, "item_id": item_id, "rating": rating, "timestamp": timestamp, "type": type,
                "request_id": request_id, "position": position, "event_id": event_id}
        return Call("POST", "/events", _event, body={n: v for n, v in body.items() if v is not None},
                    idempotency_key=_idempotency_key(event_id))

    @endpoint
    @staticmethod
    def upsert_item(item: CatalogItem, *, idempotency_key: str | None = None) -> Call[ItemChange]:
        """Add an item, or replace the one with its id; live (and durable) once answered."""
        return Call("POST", "/admin/items", _item_change, body=item.to_json(), admin=True,
                    idempotency_key=_idempotency_key(idempotency_key))

    @endpoint
    @staticmethod
    def upsert_items(items: Iterable[CatalogItem], *, idempotency_key: str | None = None) -> Call[ItemChanges]:
        """Up to 1,000 items in one call: all checked before any is recorded, made live together. The body must fit
        the service's RECSYS_MAX_BODY_BYTES (64 KiB by default, a few hundred items without text; nginx's
        client_max_body_size in compose): a larger one is refused whole (InvalidRequest, status 413). Split larger sets
        yourself; each call is atomic on its own, so only you know which items must go live together."""
        return Call("POST", "/admin/items:batch", _item_changes, body={"items": [i.to_json() for i in items]},
                    admin=True, idempotency_key=_idempotency_key(idempotency_key))

    @endpoint
    @staticmethod
    def remove_item(item_id: str | int, *, idempotency_key: str | None = None) -> Call[ItemChange]:
        """Take an item out of the live catalogue (NotFound for an id it does not hold)."""
        return Call("DELETE", _path("/admin/items/{}", item_id), _item_change, admin=True,
                    idempotency_key=_idempotency_key(idempotency_key))

    @endpoint
    @staticmethod
    def reload(version: str | None = None) -> Call[Reloaded]:
        """Load the current bundle (or the ``version`` directory) and swap it in; Conflict when it fails, the old
        bundle still serving. Not retried: a reload is no idempotent write."""
        return Call("POST", "/admin/reload", _reader(lambda b: _known(Reloaded, b)),
                    body=None if version is None else {"version": version}, admin=True)

    @endpoint
    @staticmethod
    def define_experiment(name: str, variants: Sequence[Variant], *, mode: Literal["split", "interleave"] = "split",
                          alpha: float = 0.05) -> Call[ExperimentDefinition]:
        """Create or replace an experiment (the first served variant is the control). A PUT: the same definition
        again changes nothing, so it is retried as a read is."""
        body = {"variants": [v.to_json() for v in variants], "mode": mode, "alpha": alpha}
        return Call("PUT", _path("/admin/experiments/{}", name), _definition, body=body, safe=True, admin=True)

    @endpoint
    @staticmethod
    def experiments() -> Call[tuple[ExperimentDefinition, ...]]:
        """The running experiments."""
        return Call("GET", "/experiments", _reader(lambda b: tuple(ExperimentDefinition.from_json(e) for e in b["experiments"])),
                    safe=True)

    @endpoint
    @staticmethod
    def experiment_report(name: str) -> Call[ExperimentReport]:
        """An experiment's online metrics per variant (cached by the service for 5 s)."""
        return Call("GET", _path("/experiments/{}", name), _reader(ExperimentReport.from_json), safe=True)

    @endpoint
    @staticmethod
    def delete_experiment(name: str) -> Call[None]:
        """Stop an experiment (its impressions stay logged). Not retried: once done, a second delete is a 404."""
        return Call("DELETE", _path("/admin/experiments/{}", name), lambda response: None, admin=True)


# ----------------------------------------------------------------------------- the two clients
DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_READ_TIMEOUT_S = 30.0


class _Client(_Api):
    """What both clients hold: where the service is, the admin token, timeouts and the retry policy."""

    returns = "{}"  # how ``help()`` shows what a call gives back

    def __init__(self, base_url: str, admin_token: str | None, connect_timeout: float, read_timeout: float, retry: Retry):
        self.base_url, self._admin_token, self.retry = base_url.rstrip("/"), admin_token, retry
        self.timeout = httpx.Timeout(read_timeout, connect=connect_timeout)

    def _request(self, call: Call, attempts: Attempts) -> dict[str, Any]:
        """``httpx`` request arguments for one attempt of ``call``."""
        return dict(method=call.method, url=call.path, params=call.params, json=call.body,
                    headers=call.headers(self._admin_token), timeout=attempts.attempt_timeout())

    def __repr__(self) -> str:  # the token stays out of logs and tracebacks
        return f"{type(self).__name__}({self.base_url!r}, retry={self.retry})"


class RecsysClient(_Client):
    """The blocking client over one ``httpx.Client`` (a pool of keep-alive connections, safe to share between
    threads); use it as a context manager or ``close()`` it. ``http_options`` go to ``httpx.Client``
    (``transport``, ``event_hooks``, ``limits``...); ``sleep`` waits between attempts (tests pass one that records
    instead)."""

    def __init__(self, base_url: str, *, admin_token: str | None = None, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
                 read_timeout: float = DEFAULT_READ_TIMEOUT_S, retry: Retry = Retry(),
                 sleep: Callable[[float], None] = time.sleep, **http_options: Any):
        super().__init__(base_url, admin_token, connect_timeout, read_timeout, retry)
        self._http, self._sleep = httpx.Client(base_url=self.base_url, timeout=self.timeout, **http_options), sleep

    def send(self, call: Call[T]) -> T:
        """``call``'s result, after the retries its policy allows."""
        attempts = Attempts(call, self.retry, self.timeout)
        while True:
            try:
                outcome: httpx.Response | httpx.TransportError = self._http.request(**self._request(call, attempts))
            except httpx.TransportError as err:
                outcome = err
            except httpx.DecodingError as err:  # an answer came, in an encoding it lies about (a proxy's broken gzip)
                raise UnexpectedAnswer(f"{call.method} {call.path}: cannot decode the answer ({err})") from err
            wait = attempts.wait_after(outcome)
            if wait is None:
                return call.result(outcome)  # type: ignore[arg-type]
            self._sleep(wait)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RecsysClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncRecsysClient(_Client):
    """The same API over ``httpx.AsyncClient``: every call is awaited (asyncio or trio). ``sleep`` is awaited
    between attempts."""

    returns = "Awaitable[{}]"

    def __init__(self, base_url: str, *, admin_token: str | None = None, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
                 read_timeout: float = DEFAULT_READ_TIMEOUT_S, retry: Retry = Retry(),
                 sleep: Callable[[float], Awaitable[None]] = anyio.sleep, **http_options: Any):
        super().__init__(base_url, admin_token, connect_timeout, read_timeout, retry)
        self._http, self._sleep = httpx.AsyncClient(base_url=self.base_url, timeout=self.timeout, **http_options), sleep

    async def send(self, call: Call[T]) -> T:
        """``call``'s result, after the retries its policy allows."""
        attempts = Attempts(call, self.retry, self.timeout)
        while True:
            try:
                outcome: httpx.Response | httpx.TransportError = await self._http.request(**self._request(call, attempts))
            except httpx.TransportError as err:
                outcome = err
            except httpx.DecodingError as err:  # an answer came, in an encoding it lies about (a proxy's broken gzip)
                raise UnexpectedAnswer(f"{call.method} {call.path}: cannot decode the answer ({err})") from err
            wait = attempts.wait_after(outcome)
            if wait is None:
                return call.result(outcome)  # type: ignore[arg-type]
            await self._sleep(wait)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncRecsysClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
