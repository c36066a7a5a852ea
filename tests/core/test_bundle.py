"""Bundle round trip: what the pipeline writes, the reader loads with identical scores."""
import json
import shutil

import numpy as np
import pytest
import torch

from offline.pipeline import REFIT
from offline.split import temporal_split
from offline.synthetic import generate
from offline.train_recall import RecallConfig, chosen_epochs
from recsys.bundle import BundleError, holdout_path, read_bundle, resolve, set_current, with_insertion_beam
from recsys.scorer import load_ranker
from tests.conftest import TINY_RECALL


def user_inputs(bundle, rows):
    L = bundle.manifest["feature_spec"]["history_len"]
    a = bundle.arrays
    hist = torch.arange(1, L + 1).repeat(len(rows), 1) % (len(a["item_vectors"]) + 1)
    return (torch.as_tensor(rows) + 1, torch.from_numpy(a["user_cat"][rows]), torch.from_numpy(a["user_num"][rows]),
            hist, torch.full((len(rows), L), 4))


def test_round_trip_gives_same_scores_as_the_trained_model(bundle_root, tiny_dataset):
    from offline.two_tower import TwoTower

    bundle = read_bundle(bundle_root)
    model = TwoTower(**bundle.manifest["model_config"])
    # Rebuild eager towers from the exported programs' weights: same inputs, same outputs.
    model.load_state_dict({**{f"user_tower.{k}": v for k, v in bundle.user_tower.state_dict().items()},
                           **{f"item_tower.{k}": v for k, v in bundle.item_tower.state_dict().items()}}, strict=False)
    rows = np.array([0, 5, 7])
    with torch.no_grad():
        exported = bundle.user_tower(*user_inputs(bundle, rows))
        eager = model.eval().user_tower(*user_inputs(bundle, rows))
    assert torch.allclose(exported, eager, atol=1e-5)
    a = bundle.arrays
    with torch.no_grad():
        items = bundle.item_tower(torch.arange(1, 4), torch.from_numpy(a["item_genres"][:3]),
                                  torch.from_numpy(a["item_dense"][:3]), torch.from_numpy(a["item_cat"][:3]))
    assert np.allclose(items.numpy(), a["item_vectors"][:3], atol=1e-5)
    labels, _ = bundle.index.knn_query(a["item_vectors"][:5], k=1)
    assert labels.ravel().tolist() == [0, 1, 2, 3, 4]  # each item is its own nearest neighbour
    assert bundle.catalog["item_ids"] == tiny_dataset.item_ids
    assert {"arrays.npz", "item_index.bin", "user_tower.pt2", "item_tower.pt2"} <= set(bundle.manifest["files"])


def test_the_towers_are_served_traced_and_answer_as_their_exported_programs(bundle_root, monkeypatch):
    bundle = read_bundle(bundle_root)
    user = torch.export.load(str(bundle.path / "user_tower.pt2")).module()
    assert isinstance(bundle.user_tower, torch.jit.ScriptModule) and isinstance(bundle.item_tower, torch.jit.ScriptModule)
    with torch.inference_mode():
        for rows in ([4], [0, 5, 7, 9, 2]):  # batch sizes the trace (on the export's 2 rows) never saw
            assert torch.equal(bundle.user_tower(*user_inputs(bundle, np.array(rows))), user(*user_inputs(bundle, np.array(rows))))

    def broken(*args, **kwargs):
        raise RuntimeError("no tracing here")
    monkeypatch.setattr(torch.jit, "trace", broken)
    fallback = read_bundle(bundle_root)  # what a torch without torch.jit would load: the exported modules as they are
    assert not isinstance(fallback.user_tower, torch.jit.ScriptModule)
    with torch.inference_mode():
        assert torch.equal(fallback.user_tower(*user_inputs(bundle, np.array([3]))), user(*user_inputs(bundle, np.array([3]))))
    monkeypatch.setattr(torch.jit, "trace", lambda module, example, **kw: lambda *x: module(*x) + 1e-3)  # a wrong trace
    with torch.inference_mode():
        assert torch.equal(read_bundle(bundle_root).user_tower(*user_inputs(bundle, np.array([3]))),
                           user(*user_inputs(bundle, np.array([3]))))


def test_the_index_keeps_the_exports_insertion_beam_and_a_replica_may_set_its_own(bundle_root):
    """Built with ef_construction 50, the index inserts online items with the export's insertion beam (100 by
    default, recorded in the manifest); a replica's own beam is the same graph, answering the same."""
    bundle = read_bundle(bundle_root)
    assert bundle.manifest["index"]["ef_construction"] == 50
    assert bundle.index.ef_construction == bundle.manifest["index"]["insert_ef_construction"] == 100
    own = read_bundle(bundle_root, index_insert_ef=24, index_ef=77)
    assert (own.index.ef_construction, own.index.ef) == (24, 77)
    queries = bundle.arrays["item_vectors"][:40]
    bundle.index.set_ef(77)
    for a, b in zip(bundle.index.knn_query(queries, k=10), own.index.knn_query(queries, k=10)):
        assert np.array_equal(a, b)
    assert own.index.get_max_elements() == bundle.index.get_max_elements()


def test_a_graph_with_another_insertion_beam_keeps_its_marks_and_takes_new_items(bundle_root):
    index = read_bundle(bundle_root).index
    n = index.get_current_count()
    vectors = np.asarray(index.get_items(range(n)), np.float32)
    index.mark_deleted(3)
    assert with_insertion_beam(index, None) is index and with_insertion_beam(index, index.ef_construction) is index
    copy = with_insertion_beam(index, 16)
    assert copy is not index and (copy.ef_construction, index.ef_construction) == (16, 100)
    assert 3 not in copy.knn_query(vectors[3], k=5)[0].ravel()  # still marked deleted
    copy.add_items(-vectors[3][None], np.array([n]), replace_deleted=True)  # into the marked element's place
    assert copy.get_current_count() == n and copy.knn_query(-vectors[3], k=1)[0].ravel().tolist() == [n]
    assert 3 in index.get_ids_list() and n not in index.get_ids_list()  # the original is untouched


def test_manifest_records_what_the_spec_asks(bundle_root):
    m = read_bundle(bundle_root).manifest
    for key in ("schema_version", "created_at", "data_fingerprint", "params", "metrics", "model_config", "feature_spec", "files"):
        assert key in m
    assert m["index"]["space"] == "ip" and m["metrics"]["index_recall@50"] >= 0.9


def test_a_refit_bundle_serves_every_interaction_and_keeps_a_scoreable_twin(bundle_root, tiny_dataset):
    served = read_bundle(bundle_root)
    twin = read_bundle(holdout_path(bundle_root))
    assert twin.path == served.path / "holdout" and twin.version == f"{served.version}.holdout"
    epochs = chosen_epochs(served.manifest["metrics"]["recall_history"], RecallConfig(**TINY_RECALL))
    assert served.manifest["refit"] == {"epochs": epochs, "trained_on": "every interaction"}
    assert twin.manifest["refit"] == {"epochs": epochs, "trained_on": "train + valid"}
    ds = tiny_dataset
    split = temporal_split(ds.interactions, ds.n_users, ds.n_items)
    assert served.arrays["popularity"].tolist() == np.bincount(ds.interactions.item, minlength=ds.n_items).tolist()
    before_test = np.concatenate([split.train.item, split.valid.item])
    assert twin.arrays["popularity"].tolist() == np.bincount(before_test, minlength=ds.n_items).tolist()
    assert not np.allclose(served.arrays["item_vectors"], twin.arrays["item_vectors"])  # two refits, two models
    features = np.random.default_rng(0).normal(size=(7, len(served.ranker["feature_names"]))).astype(np.float32)
    assert np.array_equal(load_ranker(served.ranker).score(features), load_ranker(twin.ranker).score(features))  # one ranker
    metrics = served.manifest["metrics"]
    default = f"two-tower + {metrics['ranker']['default']}"
    assert {f"two-tower (hnsw, {REFIT})", f"{default} ({REFIT})"} <= set(metrics["test"])
    # the served pipeline, one window earlier, is compared with the train-window one user by user
    assert set(metrics["ranker"]["test_ndcg@10_minus"][f"{default} ({REFIT})"]) == {"two-tower (hnsw)", default}


def test_holdout_path_is_the_bundle_itself_without_a_twin_and_a_missing_twin_is_named(bundle_root, tmp_path):
    root, vdir = copy_version(bundle_root, tmp_path)
    shutil.rmtree(vdir / "holdout")
    with pytest.raises(BundleError, match="holdout: missing"):
        holdout_path(root)
    manifest = json.loads((vdir / "manifest.json").read_text())
    del manifest["holdout"]  # a bundle trained with --no-refit held the window out itself
    (vdir / "manifest.json").write_text(json.dumps(manifest))
    assert holdout_path(root) == vdir


def test_no_refit_serves_the_train_window_model_which_is_its_own_holdout(tmp_path):
    from offline.__main__ import main as offline_main
    from tests.offline.test_events import TINY

    assert offline_main(["train", *TINY, "--no-refit", "--out", str(tmp_path)]) == 0
    vdir = resolve(tmp_path)
    bundle = read_bundle(vdir)
    assert holdout_path(tmp_path) == vdir and not (vdir / "holdout").exists() and "refit" not in bundle.manifest
    assert not any(REFIT in name for name in bundle.manifest["metrics"]["test"])
    ds = generate(n_users=120, n_items=150, seed=3)
    split = temporal_split(ds.interactions, ds.n_users, ds.n_items)
    assert bundle.arrays["popularity"].tolist() == np.bincount(split.train.item, minlength=ds.n_items).tolist()


def copy_version(bundle_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(bundle_root, root)
    return root, resolve(root)


def test_corrupt_file_is_named(bundle_root, tmp_path):
    root, vdir = copy_version(bundle_root, tmp_path)
    with open(vdir / "item_index.bin", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\xff\x00\xff")
    with pytest.raises(BundleError, match="item_index.bin: checksum mismatch"):
        read_bundle(root)


def test_missing_manifest_field_is_named(bundle_root, tmp_path):
    root, vdir = copy_version(bundle_root, tmp_path)
    manifest = json.loads((vdir / "manifest.json").read_text())
    del manifest["feature_spec"]
    (vdir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="missing field 'feature_spec'"):
        read_bundle(root)


def test_wrong_schema_version_is_refused(bundle_root, tmp_path):
    root, vdir = copy_version(bundle_root, tmp_path)
    manifest = json.loads((vdir / "manifest.json").read_text())
    manifest["schema_version"] = 999
    (vdir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="schema_version"):
        read_bundle(root)


def test_empty_directory_explains_how_to_make_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="python -m offline train"):
        read_bundle(tmp_path)


def test_current_pointer_to_missing_version_is_refused(bundle_root, tmp_path):
    root, _ = copy_version(bundle_root, tmp_path)
    (root / "current").write_text("nope\n")
    with pytest.raises(BundleError, match="points at 'nope'"):
        read_bundle(root)
    with pytest.raises(BundleError, match="no such bundle version"):
        set_current(root, "nope")


def test_an_array_of_python_objects_is_refused_when_written_not_when_read(tmp_path):
    from recsys.bundle import save_arrays

    with pytest.raises(BundleError, match="'names' holds Python objects"):
        save_arrays(tmp_path / "arrays.npz", {"ok": np.arange(3), "names": np.array(["a", None], dtype=object)})


def test_a_promotion_syncs_the_directories_it_changes(bundle_root, tmp_path, monkeypatch):
    """The version directory renamed into the root and ``current`` replaced there are directory entries: synced,
    or a promotion the trainer reported could be lost after a power loss."""
    import recsys.bundle as bundle_module

    root = tmp_path / "root"
    shutil.copytree(bundle_root, root, ignore=shutil.ignore_patterns("runs", "reports", "state"))
    synced = []
    monkeypatch.setattr(bundle_module, "_fsync_entries", lambda directory: synced.append(directory))
    set_current(root, resolve(bundle_root).name)
    assert synced == [root]


def test_arrays_are_mapped_from_the_file_where_they_lie(bundle_root, tmp_path):
    """The reader maps each array of arrays.npz (read-only pages that the worker processes of one host share) and
    reads what it cannot map; the file stays an ``.npz`` that ``np.load`` reads, and one written by ``np.savez``
    (every bundle before alignment) loads to the same values."""
    from recsys.bundle import ALIGN, map_arrays, save_arrays

    bundle = read_bundle(bundle_root)
    vectors = bundle.arrays["item_vectors"]
    assert not vectors.flags.writeable and isinstance(vectors.base, np.memmap)
    with pytest.raises(ValueError, match="read-only"):
        vectors[0, 0] = 1.0
    with np.load(resolve(bundle_root) / "arrays.npz") as npz:
        assert sorted(npz.files) == sorted(bundle.arrays)
        assert all(np.array_equal(npz[k], bundle.arrays[k]) for k in npz.files)
    odd = {"a": np.arange(7, dtype=np.float32), "b" * 13: np.arange(12).reshape(3, 4).T, "empty": np.zeros((0, 3), np.int64),
           "scalar": np.array(2.5), "text": np.array(["x", "yy"]), "half": np.ones((5, 3), np.float16)}
    save_arrays(tmp_path / "aligned.npz", odd)
    np.savez(tmp_path / "savez.npz", **odd)
    for path in (tmp_path / "aligned.npz", tmp_path / "savez.npz"):
        loaded = map_arrays(path)
        assert {k: (v.dtype, v.shape) for k, v in loaded.items()} == {k: (v.dtype, v.shape) for k, v in odd.items()}
        assert all(np.array_equal(loaded[k], v) for k, v in odd.items())
    aligned = map_arrays(tmp_path / "aligned.npz")
    mapped = [k for k, v in aligned.items() if isinstance(v.base, np.memmap)]
    assert sorted(mapped) == sorted(["a", "b" * 13, "text", "half"])  # not the empty or 0-d ones
    assert all(aligned[k].ctypes.data % ALIGN == 0 for k in mapped)
