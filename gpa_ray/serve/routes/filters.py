"""Metadata filters of a search: in a JSON body (`filter`) or as query parameters.

Filters act inside stage 1 (`gpa_ray.index.search.ClipFilter`): only clips, or captions
of clips, that pass are ranked, and k is still met whenever k items pass.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Query
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, ValidationError, model_validator

from gpa_ray.index.search import ClipFilter
from gpa_ray.serve.errors import ApiError


class SearchFilter(BaseModel):
    """Which clips a search may return (every field optional; lists match any value;
    `min_duration_s` may not exceed `max_duration_s`)."""

    model_config = ConfigDict(extra="forbid")
    corpus: list[str] = Field(default_factory=list, description="corpus names, e.g. esc50")
    split: list[str] = Field(default_factory=list, description="splits, e.g. test")
    labels: list[str] = Field(default_factory=list, description="clips with any of these labels")
    min_duration_s: StrictFloat | None = Field(None, ge=0, description="shortest clip, seconds")
    max_duration_s: StrictFloat | None = Field(None, ge=0, description="longest clip, seconds")

    @model_validator(mode="after")
    def _ordered(self) -> SearchFilter:
        low, high = self.min_duration_s, self.max_duration_s
        if low is not None and high is not None and low > high:
            raise ValueError(f"min_duration_s ({low}) is above max_duration_s ({high})")
        return self

    def clip_filter(self) -> ClipFilter | None:
        where = ClipFilter(
            corpus=tuple(self.corpus),
            split=tuple(self.split),
            labels=tuple(self.labels),
            min_duration_s=self.min_duration_s,
            max_duration_s=self.max_duration_s,
        )
        return None if where.empty else where


def filter_from_query(
    corpus: Annotated[list[str] | None, Query(description="corpus names (repeatable)")] = None,
    split: Annotated[list[str] | None, Query(description="splits (repeatable)")] = None,
    label: Annotated[list[str] | None, Query(description="any of these labels")] = None,
    min_duration_s: float | None = Query(None, ge=0, description="shortest clip, seconds"),
    max_duration_s: float | None = Query(None, ge=0, description="longest clip, seconds"),
) -> ClipFilter | None:
    """The same filter from query parameters (audio search, more-like-this)."""
    try:
        given = SearchFilter(
            corpus=corpus or [],
            split=split or [],
            labels=label or [],
            min_duration_s=min_duration_s,
            max_duration_s=max_duration_s,
        )
    except ValidationError as exc:
        raise ApiError(422, "invalid_filter", exc.errors()[0]["msg"]) from exc
    return given.clip_filter()


FilterQueryDep = Annotated[ClipFilter | None, Depends(filter_from_query)]
