"""Experiments: defined and deleted through the admin API, listed and reported to anyone who may read
recommendations. Definitions live in the state store, so every replica and worker runs the same ones."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response

from service.api.deps import ADMIN, LiveDep, ServedSettings
from service.api.errors import ApiError
from service.http import FastJSONResponse, errors
from service.schemas import ExperimentBody, ExperimentDefinition, ExperimentDeleted, ExperimentList, ExperimentReport

router = APIRouter(tags=["experiments"])
admin = APIRouter(**ADMIN)
Name = Annotated[str, Path(pattern=r"^[a-z0-9][a-z0-9_-]{0,39}$", description="lowercase letters, digits, '-' and '_'")]


@admin.put("/admin/experiments/{name}", response_model=ExperimentDefinition, status_code=200,
           responses={201: {"model": ExperimentDefinition, "description": "created"}, **errors(400, 401, 403, 408, 409, 413, 422, 503)})
def define_experiment(name: Name, body: ExperimentBody, live: LiveDep, settings: ServedSettings, response: Response):
    """Create or replace an experiment. Refused: shares that do not sum to 1, an unknown or unloadable bundle
    (422), an option another running experiment already sets, a second interleaving, too many experiments (409).
    A changed definition restarts the experiment's report; the same definition again changes nothing."""
    for v in body.variants:
        if v.candidates is not None and v.candidates > settings.max_candidates:
            raise ApiError(422, f"variant {v.name}: candidates must be <= {settings.max_candidates}")
    exp, created = live.define_experiment(body.to_core(name))
    response.status_code = 201 if created else 200
    return FastJSONResponse(exp.to_record(), status_code=response.status_code)


@admin.delete("/admin/experiments/{name}", response_model=ExperimentDeleted, responses=errors(401, 403, 404, 422, 503))
def delete_experiment(name: Name, live: LiveDep):
    """Stop it: every replica serves without it within a second; its impressions stay in the log."""
    live.delete_experiment(name)
    return FastJSONResponse({"name": name, "status": "deleted"})


@router.get("/experiments", response_model=ExperimentList)
def list_experiments(live: LiveDep):
    return FastJSONResponse({"experiments": [e.to_record() for _, e in sorted(live.experiments.running.items())]})


@router.get("/experiments/{name}", response_model=ExperimentReport, responses=errors(404, 422, 503))
def experiment_report(name: Name, live: LiveDep):
    """Each variant's online metrics with intervals, the difference to the control with an always-valid test,
    and the sample-ratio check (a split) or the wins (an interleaving); recomputed at most every 5 s."""
    return FastJSONResponse(live.experiment_report(name))
