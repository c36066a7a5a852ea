"""The artifact bundle: the one place that writes, reads and validates its file layout.

A bundle is a directory per version under a root::

    root/
      current                 # text file naming the active version (replaced atomically)
      <version>/
        manifest.json         # schema version, created-at, data fingerprint, parameters,
                              # metrics, model constructor args, feature spec, file checksums
        user_tower.pt2        # torch.export programs: the service runs them without model code
        item_tower.pt2
        item_index.bin        # hnswlib, inner product over unit vectors, labels = item rows
        arrays.npz            # feature tables, item vectors, histories, popularity, re-ranker item statistics
                              # (each array's data 64-byte aligned: the reader maps them, ``map_arrays``)
        catalog.json          # raw ids, titles, genre names, categorical vocabularies
        ranker.pt             # re-ranker state (offline/ranker.py: load_ranker), optional
        holdout/              # optional: a whole bundle of the same layout (see below)

A version is written into a temporary directory and renamed into place, so a reader never
sees half a bundle.

A bundle whose models learnt from every interaction (``python -m offline train --refit``) has seen
each user's latest window, so nothing can score it; ``holdout/`` keeps its twin, trained the same
way without that window, and ``holdout_path`` hands a promotion check the twin.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import tempfile
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hnswlib
import numpy as np
import torch
from loguru import logger

from recsys.manifest import Manifest, ManifestError

SCHEMA_VERSION = 3  # 2: the ranker's features gained from_item_item (multi-channel candidates); 3: sequence neighbours
CURRENT = "current"
HOLDOUT = "holdout"
FILES = ("user_tower.pt2", "item_tower.pt2", "item_index.bin", "arrays.npz", "catalog.json")
REQUIRED_ARRAYS = (
    "item_vectors", "user_cat", "user_num", "item_genres", "item_dense", "item_cat", "item_year",
    "history_offsets", "history_items", "history_ratings", "history_timestamps", "popularity",
    "item_avg_rating", "item_neighbours", "item_neighbour_sims", "item_seq_neighbours", "item_seq_neighbour_sims",
)
REQUIRED_MANIFEST = ("schema_version", "version", "created_at", "data_fingerprint", "params", "metrics",
                     "model_config", "feature_spec", "index", "files")


class BundleError(RuntimeError):
    """A bundle that cannot be used; the message names the file or field at fault."""


@dataclass
class Bundle:
    """Everything the service needs. When writing, the towers are ``nn.Module``s; when read,
    they are the exported programs' modules (same call signature)."""

    manifest: dict[str, Any]
    catalog: dict[str, Any]  # user_ids, item_ids, titles, genre_names, user_vocab
    arrays: dict[str, np.ndarray]
    user_tower: Any
    item_tower: Any
    index: hnswlib.Index
    ranker: dict[str, Any] | None = None
    path: Path | None = field(default=None)
    holdout: "Bundle | None" = None  # written only: the twin a refit bundle keeps in holdout/ (``holdout_path``)

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def meta(self) -> Manifest:
        """The manifest, typed: parsed on each call, so it follows ``manifest`` (``read_bundle`` parses it once
        to refuse a malformed field with its name; callers on a hot path keep the result)."""
        return Manifest.parse(self.manifest)


def write_bundle(root: Path, bundle: Bundle, promote: bool = True) -> Path:
    """Write ``bundle`` (and its holdout twin) as a new version under ``root`` and point ``current`` at it
    (unless ``promote`` is False: ``retrain`` moves ``current`` only after the candidate passed its comparison)."""
    root.mkdir(parents=True, exist_ok=True)
    version = bundle.manifest.get("version") or f"{time.strftime('%Y%m%d-%H%M%S')}-{bundle.manifest['data_fingerprint'][:8]}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=root))
    try:
        if bundle.holdout is not None:
            (tmp / HOLDOUT).mkdir()
            _write_files(tmp / HOLDOUT, bundle.holdout, f"{version}.{HOLDOUT}", {})
        _write_files(tmp, bundle, version, {HOLDOUT: HOLDOUT} if bundle.holdout is not None else {})
        tmp.chmod(0o755)  # mkdtemp makes it private; the service may run as another user
        final = root / version
        if final.exists():
            raise BundleError(f"{final}: version already exists")
        tmp.rename(final)
        _fsync_entries(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if promote:
        set_current(root, version)
    return final


def _write_files(vdir: Path, bundle: Bundle, version: str, extra: dict[str, str]) -> None:
    """The files of one version into ``vdir``, the manifest (with their checksums) last, all fsynced."""
    _export_tower(bundle.user_tower, _user_example(bundle), vdir / "user_tower.pt2")
    _export_tower(bundle.item_tower, _item_example(bundle), vdir / "item_tower.pt2")
    insert_ef = bundle.manifest["index"].get("insert_ef_construction")  # (the graph keeps it: ``with_insertion_beam``)
    with_insertion_beam(bundle.index, insert_ef).save_index(str(vdir / "item_index.bin"))
    save_arrays(vdir / "arrays.npz", bundle.arrays)
    (vdir / "catalog.json").write_text(json.dumps(bundle.catalog))
    files = list(FILES)
    if bundle.ranker is not None:
        torch.save(bundle.ranker, vdir / "ranker.pt")
        files.append("ranker.pt")
    manifest = {**bundle.manifest, **extra, "schema_version": SCHEMA_VERSION, "version": version,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "files": {name: _sha256(vdir / name) for name in files}}
    (vdir / "manifest.json").write_text(json.dumps(manifest, indent=2, default=_json_default))
    _fsync_dir(vdir)
    vdir.chmod(0o755)


def holdout_path(path: Path) -> Path:
    """The version directory a comparison on each user's latest window must score: the bundle's holdout
    twin when it has one (the bundle itself learnt from that window), else the bundle (which held it out)."""
    vdir = resolve(path)
    name = _read_manifest(vdir).get(HOLDOUT)
    if name is None:
        return vdir
    if not (vdir / name / "manifest.json").exists():
        raise BundleError(f"{vdir / name}: missing (manifest.json names it as the bundle's holdout twin)")
    return vdir / name


def set_current(root: Path, version: str) -> None:
    """Point ``root/current`` at ``version`` atomically."""
    if not (root / version / "manifest.json").exists():
        raise BundleError(f"{root / version}: no such bundle version")
    tmp = root / f".{CURRENT}.{os.getpid()}.tmp"  # two trainers promoting at once must not share a temp file
    with open(tmp, "w") as f:
        f.write(version + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / CURRENT)
    _fsync_entries(root)


def resolve(path: Path) -> Path:
    """A version directory from either a version directory or a root with a ``current`` pointer."""
    path = Path(path)
    if (path / "manifest.json").exists():
        return path
    pointer = path / CURRENT
    if not pointer.exists():
        raise BundleError(f"{path}: no bundle here (neither manifest.json nor a '{CURRENT}' pointer); "
                          f"run `python -m offline train --out {path}` first")
    try:
        version = pointer.read_text().strip()
    except UnicodeDecodeError as err:
        raise BundleError(f"{pointer}: not a version name ({err})") from err
    if not version or "/" in version or version.startswith(".") or not (path / version / "manifest.json").exists():
        raise BundleError(f"{pointer}: points at '{version}', which has no manifest.json")
    return path / version


def read_bundle(path: Path, index_threads: int = 1, index_ef: int | None = None, index_insert_ef: int | None = None) -> Bundle:
    """Load and validate a bundle; every failure names the file or field. ``index_ef``: the HNSW search beam, if
    not the one the bundle was evaluated with (a query-time setting of hnswlib, so a replica may tune it);
    ``index_insert_ef``: the insertion beam for items changed online, if not the bundle's (``with_insertion_beam``)."""
    vdir = resolve(path)
    manifest = _read_manifest(vdir)
    for name, digest in manifest["files"].items():
        if not (vdir / name).exists():
            raise BundleError(f"{vdir / name}: missing (listed in manifest.json)")
        if _sha256(vdir / name) != digest:
            raise BundleError(f"{vdir / name}: checksum mismatch (corrupt or modified)")
    try:
        arrays = map_arrays(vdir / "arrays.npz")
        catalog = json.loads((vdir / "catalog.json").read_text())
        user_tower, item_tower = _load_tower(vdir / "user_tower.pt2"), _load_tower(vdir / "item_tower.pt2")
        # weights only: a pickle that could run code is refused (and the checksums above were verified first)
        ranker = torch.load(vdir / "ranker.pt", map_location="cpu", weights_only=True) if "ranker.pt" in manifest["files"] else None
    except (BundleError, OSError, MemoryError):  # (the last two: the machine, not the bundle; a reload retries it)
        raise
    except Exception as err:  # a corrupt file of any kind: say which bundle and why
        raise BundleError(f"{vdir}: cannot load ({type(err).__name__}: {err})") from err
    missing = [a for a in REQUIRED_ARRAYS if a not in arrays]
    if missing:
        raise BundleError(f"{vdir / 'arrays.npz'}: missing arrays {missing}")
    dim = manifest["index"].get("dim") if isinstance(manifest["index"], dict) else None
    if dim != arrays["item_vectors"].shape[-1]:
        raise BundleError(f"{vdir / 'manifest.json'}: field 'index.dim' is {dim!r}, "
                          f"item_vectors have {arrays['item_vectors'].shape[-1]} dimensions")
    try:
        index = _load_index(vdir / "item_index.bin", manifest["index"], len(arrays["item_vectors"]), index_threads, index_ef,
                            index_insert_ef)
    except (BundleError, OSError, MemoryError):
        raise
    except Exception as err:  # hnswlib raises RuntimeError on a truncated file, the manifest may lack a field
        raise BundleError(f"{vdir / 'item_index.bin'}: cannot load ({type(err).__name__}: {err})") from err
    bundle = Bundle(manifest, catalog, arrays, user_tower, item_tower, index, ranker, vdir)
    try:
        bundle.meta  # noqa: B018  (parsed here: a malformed field refuses the bundle with its name)
    except ManifestError as err:
        raise BundleError(f"{vdir / 'manifest.json'}: {err}") from err
    return bundle


ALIGN = 64  # each array's data starts at a multiple of this in arrays.npz, so that it can be mapped as it lies
_PADDING_FIELD = 0xD935  # a zip "extra" field id readers skip (zipalign's): the padding that aligns the data


def save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """An ``.npz`` (a stored, uncompressed zip of ``.npy`` files, as ``np.savez`` writes and ``np.load`` reads) whose
    array data start at multiples of ``ALIGN`` bytes, so that ``map_arrays`` can map them instead of reading them."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, array in arrays.items():
            array = np.asarray(array)
            if array.dtype.hasobject:  # its bytes would be pointers: written, promoted, then refused by every reader
                raise BundleError(f"{path}: array {name!r} holds Python objects ({array.dtype}), which a bundle cannot store")
            array = array if array.flags.c_contiguous else array.copy(order="C")  # (ascontiguousarray makes 0-d 1-d)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            header = _npy_header(array)
            # local header: 30 bytes, the name, our padding field (4 + pad), zipfile's zip64 field (20: forced below)
            start = zf.fp.tell() + 30 + len(info.filename.encode()) + 4 + 20 + len(header)
            info.extra = struct.pack("<HH", _PADDING_FIELD, -start % ALIGN) + b"\0" * (-start % ALIGN)
            with zf.open(info, "w", force_zip64=True) as f:
                f.write(header)
                f.write(array.data if array.size else b"")


def map_arrays(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz``, read-only: each mapped from the file where its data lies stored and aligned (pages the
    processes of one host share, and nothing read until used), else read (compressed or unaligned members, e.g.
    bundles written by ``np.savez``)."""
    out = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as raw:
        for info in zf.infolist():
            name = info.filename.removesuffix(".npy")
            raw.seek(info.header_offset)
            local = raw.read(30)
            raw.seek(info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little"))
            read_header = {(1, 0): np.lib.format.read_array_header_1_0}.get(np.lib.format.read_magic(raw),
                                                                             np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(raw)
            offset = raw.tell()
            if info.compress_type != zipfile.ZIP_STORED or dtype.hasobject or offset % max(dtype.alignment, 1) \
                    or not shape or not np.prod(shape, dtype=np.int64):
                with zf.open(info) as f:
                    out[name] = np.lib.format.read_array(f, allow_pickle=False)
            else:
                out[name] = np.memmap(path, dtype, "r", offset, shape, "F" if fortran else "C").view(np.ndarray)
    return out


def _npy_header(array: np.ndarray) -> bytes:
    """The ``.npy`` magic and header of a C-contiguous ``array``, as ``np.save`` writes them."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, np.lib.format.header_data_from_array_1_0(array))
    return buffer.getvalue()


def _read_manifest(vdir: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((vdir / "manifest.json").read_text())
    except (ValueError, RecursionError) as err:  # not JSON, not UTF-8 (UnicodeDecodeError), nested past reason
        raise BundleError(f"{vdir / 'manifest.json'}: unreadable ({type(err).__name__}: {err})") from err
    if not isinstance(manifest, dict):
        raise BundleError(f"{vdir / 'manifest.json'}: not a JSON object")
    for key in REQUIRED_MANIFEST:
        if key not in manifest:
            raise BundleError(f"{vdir / 'manifest.json'}: missing field '{key}'")
    if manifest["schema_version"] != SCHEMA_VERSION:
        raise BundleError(f"{vdir / 'manifest.json'}: field 'schema_version' is {manifest['schema_version']}, "
                          f"this code reads {SCHEMA_VERSION}")
    files = manifest["files"]
    if not isinstance(files, dict) or not set(FILES) <= set(files) or not set(files) <= {*FILES, "ranker.pt"}:
        raise BundleError(f"{vdir / 'manifest.json'}: field 'files' must list the checksums of {list(FILES)} "
                          "(and ranker.pt), nothing else")
    return manifest


def _load_index(path: Path, params: dict, n_items: int, threads: int, ef: int | None = None,
                insert_ef: int | None = None) -> hnswlib.Index:
    for key in ("dim", "ef"):
        if not isinstance(params, dict) or not isinstance(params.get(key), int) or params[key] < 1:
            raise BundleError(f"{path.parent / 'manifest.json'}: field 'index.{key}' must be a positive integer")
    index = hnswlib.Index(space="ip", dim=int(params["dim"]))
    room = n_items + max(1024, n_items // 8)  # items added online go here before a resize (a copy of the graph)
    index.load_index(str(path), max_elements=max(int(params.get("max_elements", n_items)), room), allow_replace_deleted=True)
    index = with_insertion_beam(index, insert_ef)
    index.set_ef(ef or int(params["ef"]))
    index.set_num_threads(threads)
    if index.get_current_count() != n_items:
        raise BundleError(f"{path}: index holds {index.get_current_count()} items, item_vectors has {n_items}")
    return index


def with_insertion_beam(index: hnswlib.Index, ef_construction: int | None) -> hnswlib.Index:
    """The same graph, items added to it from now on inserted with beam ``ef_construction`` (None: as it is).

    After the build, hnswlib's ``ef_construction`` steers only insertions, i.e. a live catalogue's changes, whose
    cost it sets: at 1M items 0.50 ms a replacement at 200, 0.29 at 100, 0.19 at 64, for a recall of the changed
    items at depth 200 of 0.942, 0.933, 0.923 (docs/benchmarks.md, "Tenth round"). hnswlib has no setter, so the
    graph is copied through its pickling state, with the beam changed: at 1M items 0.8 s and, for that moment,
    two more copies of the graph in memory. The bundle's index is saved with the beam the export chose
    (``--index-insert-ef-construction``), so a replica pays the copy only when it sets another one."""
    if ef_construction is None or ef_construction == index.ef_construction:
        return index
    (state,) = index.__getstate__()
    state["ef_construction"] = int(ef_construction)
    copy = hnswlib.Index.__new__(hnswlib.Index)  # (pybind11's __setstate__ constructs: never on a made index)
    copy.__setstate__((state,))
    return copy


def _load_tower(path: Path) -> torch.nn.Module:
    """An exported tower, run as TorchScript where that answers the same. A request's tower call is some forty aten
    ops on a few rows, and the exported module dispatches each one from Python: 0.55 ms per user against 0.18 ms
    traced (docs/benchmarks.md, "Ninth round"), the cost of every user whose history changed. Traced on the
    export's own example batch, then checked against the exported module on batches of other sizes; the exported
    module itself where tracing fails or answers differently (a future torch without ``torch.jit``, say)."""
    program = torch.export.load(str(path))
    module = program.module()
    example = program.example_inputs[0] if program.example_inputs else ()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit is deprecated for capturing models; here it only runs one
            traced = torch.jit.trace(module, tuple(example), check_trace=False)
            with torch.inference_mode():
                same = all(torch.equal(traced(*x), module(*x))
                           for x in (tuple(t[:1] for t in example), tuple(t[[0, 1, 0]] for t in example)))
    except Exception as err:  # noqa: BLE001 (any failure leaves the exported module, which is correct, only slower)
        logger.warning("{}: serving the exported module as it is (tracing failed: {}: {})", path, type(err).__name__, err)
        return module
    if not same:
        logger.warning("{}: serving the exported module as it is (traced, it answered differently)", path)
        return module
    return traced


def _export_tower(module: torch.nn.Module, example: tuple, path: Path) -> None:
    """torch.export with a dynamic batch dimension (the example batch has 2 rows: 0/1 would specialise)."""
    module = module.eval().to("cpu")
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    shapes = tuple({0: batch} for _ in example)
    with torch.no_grad():
        program = torch.export.export(module, example, dynamic_shapes=shapes)
    torch.export.save(program, str(path))


def _user_example(bundle: Bundle) -> tuple:
    a, L = bundle.arrays, bundle.manifest["feature_spec"]["history_len"]
    return (torch.tensor([1, 2]), torch.from_numpy(a["user_cat"][:2].copy()), torch.from_numpy(a["user_num"][:2].copy()),
            torch.ones(2, L, dtype=torch.long), torch.ones(2, L, dtype=torch.long))


def _item_example(bundle: Bundle) -> tuple:
    a = bundle.arrays
    example = (torch.tensor([1, 2]), torch.from_numpy(a["item_genres"][:2].copy()),
               torch.from_numpy(a["item_dense"][:2].copy()), torch.from_numpy(a["item_cat"][:2].copy()))
    return example if "item_text" not in a else (*example, torch.from_numpy(a["item_text"][:2].astype(np.float32)))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    """Every file of ``path`` (a subdirectory was synced when it was written), then its entries."""
    for p in path.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_entries(path)


def _fsync_entries(directory: Path) -> None:
    """The directory's entries (a file created, renamed or replaced in it) on disk: without this a promotion the
    trainer reported could be lost, or half there, after a power loss."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
