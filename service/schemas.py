"""Request and response bodies. Ids are the user's raw ids (strings) at this edge only."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, field_validator, model_validator

RawId = StrictStr | StrictInt  # ids may be sent as strings or integers; compared as strings


def _non_empty(v, info):
    """An id of only whitespace names nothing; say so instead of answering 'unknown id'."""
    if v is not None and str(v).strip() == "":
        raise ValueError(f"{info.field_name} must not be empty")
    return v


class Filters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    genres_any: list[str] | None = Field(None, description="keep items with at least one of these genres")
    genres_none: list[str] | None = Field(None, description="drop items with any of these genres")
    year_min: int | None = None
    year_max: int | None = None

    @model_validator(mode="after")
    def _range(self) -> "Filters":
        if self.year_min is not None and self.year_max is not None and self.year_min > self.year_max:
            raise ValueError("year_min must be <= year_max")
        return self


class RecommendRequest(BaseModel):
    """A known user by id, or a user the model never saw by features and recent item ids."""

    model_config = ConfigDict(extra="forbid")
    user_id: RawId | None = None
    features: dict[str, StrictStr | StrictInt | StrictFloat | None] | None = None
    recent_items: list[RawId] | None = Field(None, description="oldest first; the last one is the most recent")
    k: int = Field(10, ge=1)
    candidates: int | None = Field(None, ge=1, description="ANN recall depth (default from settings)")
    exclude_seen: bool = True
    filters: Filters | None = None
    explain: bool = False

    _user_id = field_validator("user_id", mode="after")(_non_empty)


class EventRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: RawId
    item_id: RawId
    rating: float | None = Field(None, ge=0, le=5, allow_inf_nan=False)
    timestamp: int | None = Field(None, ge=0)

    _ids = field_validator("user_id", "item_id", mode="after")(_non_empty)


class ItemUpsert(BaseModel):
    model_config = ConfigDict(extra="forbid")
    item_id: RawId
    title: str = ""
    genres: list[str] = Field(default_factory=list)
    year: int | None = None
    features: dict[str, StrictStr | StrictInt | StrictFloat | None] = Field(default_factory=dict)

    _item_id = field_validator("item_id", mode="after")(_non_empty)


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str | None = Field(None, description="a version under the bundle root; default: what 'current' names")
