"""The ceiling a Python recommendation endpoint can reach on these cores: FastAPI + uvicorn, one sync
endpoint, one hnswlib ``knn_query`` (k=10) and orjson; no features, no ranker, no state.
bench/serving.py runs it beside the service."""
from __future__ import annotations

import os

import orjson
from fastapi import FastAPI
from fastapi.responses import Response

from recsys.bundle import read_bundle

bundle = read_bundle(os.environ.get("RECSYS_BUNDLE_DIR", "artifacts"),
                     index_ef=int(os.environ.get("RECSYS_INDEX_EF") or 0) or None)  # the service's beam, if set
vectors, item_ids = bundle.arrays["item_vectors"], bundle.catalog["item_ids"]
app = FastAPI()


@app.get("/ready")
def ready() -> Response:
    return Response(b'{"status":"ready"}', media_type="application/json")


@app.get("/recommend")
def recommend(user_id: str, k: int = 10) -> Response:
    query = vectors[hash(user_id) % len(vectors)]
    labels, dists = bundle.index.knn_query(query[None], k=k)
    items = [{"item_id": item_ids[i], "score": float(1 - d)} for i, d in zip(labels[0], dists[0])]
    return Response(orjson.dumps({"user_id": user_id, "items": items}), media_type="application/json")
