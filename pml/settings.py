"""Settings, read once from the environment (``PML_*``) into one object that is passed down.

With no variables set, everything is embedded under ``PML_HOME``: a SQLite file, dramatiq's
in-memory broker, a local Ray and the process runtime.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob of a pml process; each field maps to ``PML_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="PML_", extra="ignore")

    home: Path = Field(default_factory=lambda: Path.home() / ".pml")
    """Folder for all embedded state: SQLite file, blobs, trial folders, Ray results."""

    database_url: str | None = None
    """SQLAlchemy URL; default ``sqlite:///<home>/pml.db``."""

    redis_url: str | None = None
    """Redis for the dramatiq broker (and event streams); default: in-memory broker."""

    redis_namespace: str = "pml"
    """Key prefix for the broker's queues, so several deployments can share one Redis."""

    ray_address: str | None = None
    """Address of a Ray cluster to join; default: a local Ray started on first use."""

    ray_num_cpus: int | None = None
    """CPUs a local Ray may use (default: all)."""

    ray_num_gpus: int | None = None
    """GPUs a local Ray hands to trials (default: those it detects). Joining a cluster
    (``ray_address``), the cluster's nodes say what they have."""

    admin_key: str | None = None
    """Bearer key for the admin calls (accounts, API keys) over gRPC; unset = admin calls refused."""

    worker_threads: int = 2
    """Threads per worker process (embedded: per in-process worker)."""

    max_image_bytes: int = 20 * 1024 * 1024
    """Largest image or mask a FHIR record may carry."""

    max_image_pixels: int = 50_000_000
    """Largest pixel count accepted when decoding (guards against decompression bombs)."""

    event_stream_maxlen: int = 100_000
    """Entries the Redis event stream keeps (``XADD MAXLEN ~``); SQL keeps the whole history."""

    event_recheck_s: float = 1.0
    """How often a waiting event stream reads SQL even without a wake-up (a lost XADD only delays)."""

    webhook_max_attempts: int = 8
    """Attempts per webhook delivery before it stays FAILED (visible with ListDeliveries)."""

    webhook_backoff_s: float = 2.0
    """Wait before the second attempt; doubled after each further failure."""

    webhook_timeout_s: float = 10.0
    """Time limit of one webhook POST (connect and answer)."""

    @property
    def sqlalchemy_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.home / 'pml.db'}"

    @property
    def embedded_broker(self) -> bool:
        return not self.redis_url
