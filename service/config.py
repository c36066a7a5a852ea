"""Service settings: one class, read once from the environment (prefix ``RECSYS_``)."""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from recsys.engine.allowed import FILTER_CACHE_MB
from recsys.engine.filters import EXACT_LIMIT
from recsys.impressions import ImpressionConfig
from recsys.live import LiveConfig
from recsys.state.open import StoreConfig


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RECSYS_", extra="ignore")

    bundle_dir: Path = Field(Path("artifacts"), description="bundle root (with a 'current' pointer) or a version directory")
    bundle_poll_s: float = Field(0.0, ge=0, description="seconds between checks of the bundle root's 'current' pointer; "
                                 "a new version is loaded and swapped in by itself (0: only POST /admin/reload)")
    state_backend: Literal["file", "redis"] = Field("file", description="where online state lives: 'file' (fsynced logs "
                                                    "in state_dir, one process) or 'redis' (shared by replicas and workers)")
    state_dir: Path | None = Field(None, description="file backend: event / catalogue logs; default <bundle_dir>/state")
    redis_url: SecretStr = Field(SecretStr("redis://127.0.0.1:6379/0"), description="redis backend: server URL "
                                 "(a secret: it may carry a password); redis+cluster://host:port for a Redis Cluster "
                                 "(any node; the others are discovered)")
    redis_prefix: str = Field("recsys", min_length=1, description="redis backend: key prefix (one per deployment)")
    redis_events_maxlen: int = Field(10_000_000, ge=1000, description="redis backend: events kept in the events stream")
    redis_catalog_maxlen: int = Field(100_000, ge=100, description="redis backend: catalogue changes kept in the stream "
                                      "(a replica further behind re-reads the catalogue fold)")
    redis_shards: int = Field(16, ge=1, le=1024, description="redis cluster: streams the events and impressions are "
                              "split over (spread over the masters); fixed by the first replica that writes")
    redis_wait_replicas: int | None = Field(None, ge=0, description="redis backend: replicas that must confirm a write "
                                            "(WAIT) before it is acknowledged; unset: 1 on a cluster (an acknowledged "
                                            "write survives a master's failover), 0 on a single Redis")
    redis_history_cache_mb: int = Field(64, ge=0, description="single Redis: users' histories each worker keeps until "
                                        "Redis invalidates them (client tracking), so a returning user's request skips "
                                        "the read; 0: every request reads Redis")
    idempotency_window_s: int = Field(86_400, ge=60, description="how long a write's idempotency key (Idempotency-Key "
                                      "header, or an event's event_id) is remembered: a retry within it is recorded once")
    idempotency_keys: int = Field(200_000, ge=1000, description="file backend: the most idempotency keys remembered (the "
                                  "oldest forgotten first, so memory stays bounded); on Redis keys expire by the window")
    admin_token: SecretStr | None = Field(None, description="bearer token for /admin/*; admin endpoints are off when unset "
                                          "(held as a secret: its repr and any log of these settings show '**********')")
    log_level: str = "INFO"
    access_log: bool = Field(False, description="uvicorn's plain-text line per request on stdout: "
                             "off by default, since the Prometheus metrics count every request by endpoint and status, "
                             "and the line costs about 7% of a worker's CPU at saturation")
    log_diagnose: bool = Field(False, description="tracebacks show local variable values: for debugging only, since "
                               "locals can hold request bodies and secrets")
    max_k: int = Field(100, ge=1, description="largest k a client may ask for")
    default_candidates: int | None = Field(None, ge=1, description="ANN recall depth handed to the re-ranker; unset: the "
                                           "depth the bundle was trained and evaluated with (its index.candidates)")
    max_candidates: int = Field(1000, ge=1, description="largest candidate depth a client may ask for")
    max_body_bytes: int = Field(64 * 1024, ge=1024, description="requests with larger bodies get 413")
    max_batch_users: int = Field(1000, ge=1, le=100_000, description="most user_ids one /recommend/batch call may send "
                                 "(a batch holds a worker thread for its whole run: about 1 ms per user)")
    max_recent_items: int = Field(200, ge=1, description="most recent_items a cold-start request may send")
    worker_threads: int = Field(2, ge=1, description="threads running the handlers of batches, similar items and admin "
                                "writes (/recommend answers on the event loop); CPU-bound work gains nothing "
                                "from more threads than cores, and a GIL convoy of many threads costs throughput")
    io_threads: int = Field(16, ge=1, description="threads recording events: they wait on fsync or Redis, not the CPU, "
                            "and more of them in flight lets Redis commit them together")
    torch_threads: int = Field(1, ge=1, description="intra-op threads per tower call (requests already run in parallel)")
    index_threads: int = Field(1, ge=1, description="hnswlib threads per query")
    index_ef: int | None = Field(None, ge=1, le=100_000, description="HNSW search beam (hnswlib's ef) on this replica; "
                                 "unset: the bundle's (--index-ef). A query's beam is max(ef, its fetch): lower trades "
                                 "recall for search time, higher the reverse, with no new bundle")
    index_insert_ef: int | None = Field(None, ge=1, le=100_000, description="HNSW insertion beam (hnswlib's "
                                        "ef_construction after the build) for items added or changed on this replica; "
                                        "unset: the bundle's (--index-insert-ef-construction). Lower makes each "
                                        "change cheaper and the changed items' recall a little lower; another value "
                                        "than the bundle's copies the graph once at load")
    filter_exact_limit: int = Field(EXACT_LIMIT, ge=0, description="a filtered request whose year slices (per genre, binary "
                                    "searched) hold at most this many items scores them all exactly; a broader one "
                                    "searches HNSW and over-fetches (docs/benchmarks.md, 'Catalogue scale')")
    filter_cache_mb: float = Field(FILTER_CACHE_MB, ge=0, description="memory per served bundle for the rows of filters "
                                   "scored exactly, and a copy of their vectors, kept between requests (least recently "
                                   "used dropped first); 0: read each request's rows anew")
    user_vector_cache: int = Field(100_000, ge=0, description="known users' vectors kept until their history changes")
    history_cap: int = Field(1000, ge=1, description="online events kept per user for serving (the tower window and "
                             "the seen set for exclusion); the event log keeps every event")
    compact_after: int = Field(10_000, ge=1, description="state log records after which a snapshot is written, so "
                               "start-up and reload read the snapshot plus at most about this many records")
    impressions: bool = Field(True, description="log an impression of every answer (sampled by impression_sample) "
                              "through the state store")
    impression_sample: float = Field(1.0, gt=0, le=1, description="share of answers whose impression is logged")
    impression_queue: int = Field(10_000, ge=1, description="impressions waiting for the writer thread; when full, "
                                  "impressions are dropped and counted (recsys_impressions_dropped_total), never waited for")
    impression_linger_s: float = Field(0.25, gt=0, le=60, description="the impression writer gathers this long before "
                                       "each store write (one fsync per batch); feedback for an impression still "
                                       "gathering joins on the replica that served it, and in reports everywhere")
    impression_retention: int = Field(1_000_000, ge=100, description="impressions kept in the store (the Redis stream's "
                                      "length, or the file backend's log segments); experiment reports cover at most these")
    feedback_window_s: int = Field(1800, ge=1, description="feedback naming a request joins its impression at most this "
                                   "long after it was shown")
    feedback_types: str = Field("click,view,add_to_cart,purchase,rating", description="the event types /events accepts "
                                "(comma-separated; each is a Prometheus label value)")
    positive_types: str = Field("click,add_to_cart,purchase", description="the event types counted as clicks in "
                                "experiment metrics (comma-separated)")
    max_experiments: int = Field(20, ge=1, le=200, description="experiments that may run at once (each is a "
                                 "Prometheus label value)")
    body_timeout_s: float = Field(10.0, gt=0, description="a request body that stalls this long between chunks gets 408")
    header_timeout_s: float = Field(10.0, gt=0, description="a request head not complete this long after the connection "
                                    "opened gets 408 (with --http service.protocol:HeadDeadline)")
    # OpenTelemetry (service/tracing.py): the endpoint, headers, service name and sampler also follow the standard OTEL_*
    tracing: Literal["off", "otlp", "console"] = Field("off", description="spans of each request and engine stage: off, "
                                                       "exported by OTLP over HTTP (OTEL_EXPORTER_OTLP_ENDPOINT, default "
                                                       "http://localhost:4318), or printed on stdout")
    tracing_sample_ratio: float = Field(1.0, ge=0, le=1, description="share of the traces begun here that are recorded; "
                                        "a caller's traceparent decides for its own (OTEL_TRACES_SAMPLER overrides both)")

    @model_validator(mode="after")
    def _check(self) -> "Settings":
        if self.default_candidates is not None and self.default_candidates > self.max_candidates:
            raise ValueError("default_candidates must be <= max_candidates")
        if self.admin_token is not None and len(self.admin_token.get_secret_value()) < 8:
            raise ValueError("admin_token must be at least 8 characters")
        if not self.positive_set <= set(self.type_list):
            raise ValueError("positive_types must be a subset of feedback_types")
        if not all(re.fullmatch(r"[a-z][a-z0-9_]{0,31}", t) for t in self.type_list):
            raise ValueError("feedback_types are lowercase names ([a-z][a-z0-9_]*, at most 32 characters)")
        return self

    @property
    def type_list(self) -> list[str]:
        return [t.strip() for t in self.feedback_types.split(",") if t.strip()]

    @property
    def positive_set(self) -> frozenset[str]:
        return frozenset(t.strip() for t in self.positive_types.split(",") if t.strip())

    @property
    def resolved_state_dir(self) -> Path:
        return self.state_dir or (self.bundle_dir / "state")

    def live_config(self) -> LiveConfig:
        """What the core's live engine needs of these settings."""
        redis = self.state_backend == "redis"
        store = StoreConfig(self.state_backend, self.redis_url.get_secret_value() if redis else self.resolved_state_dir, self.history_cap,
                            self.compact_after, self.redis_prefix, self.redis_events_maxlen, self.redis_catalog_maxlen,
                            self.impression_retention, self.feedback_window_s, self.redis_shards, self.redis_wait_replicas,
                            self.idempotency_window_s, self.idempotency_keys, self.redis_history_cache_mb)
        impressions = ImpressionConfig(self.impression_sample, self.impression_queue, linger_s=self.impression_linger_s,
                                       feedback_window_s=self.feedback_window_s) if self.impressions else None
        return LiveConfig(self.bundle_dir, store, self.index_threads, self.index_ef, self.index_insert_ef,
                          self.user_vector_cache, self.filter_exact_limit, self.filter_cache_mb, self.bundle_poll_s, follow=redis,
                          impressions=impressions, positive_types=self.positive_set, max_experiments=self.max_experiments)


@lru_cache
def get_settings() -> Settings:
    return Settings()
