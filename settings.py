"""All runtime settings in one typed place, read from the environment (and an optional `.env`)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

ROOT = Path(__file__).resolve().parent


class Settings(BaseSettings):
    """Environment variables, upper-cased field names (e.g. `DATABASE_URL`, `UI_PORT`)."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    # PostgreSQL. Unset: an embedded server is started with its data under `data_dir/postgres`.
    database_url: str | None = None
    db_pool_max: int = Field(default=8, ge=1)

    # TorchServe.
    inference_url: str = "http://127.0.0.1:8080"
    management_url: str = "http://127.0.0.1:8081"
    metrics_url: str = "http://127.0.0.1:8082"
    # TorchServe always also binds its gRPC APIs (on 127.0.0.1); the app does not use them.
    grpc_inference_port: int = Field(default=7070, ge=1, le=65535)
    grpc_management_port: int = Field(default=7071, ge=1, le=65535)
    model_name: str = "mnist"
    # The shipped archive (`model_store/mnist.mar`, version 1.0), built by `make model`.
    model_store: Path = ROOT / "model_store"
    # TorchServe's model store: every archive it may register (the shipped one is copied in as
    # `mnist.mar` when absent; the trainer writes new versions there). Unset: data_dir/"archives".
    archive_dir: Path | None = None
    inference_timeout_s: float = Field(default=5.0, gt=0)
    # How TorchServe runs the model (registered by `python -m serving`; see serving/README.md).
    model_workers: int = Field(default=2, ge=1)
    model_batch_size: int = Field(default=4, ge=1)
    model_batch_delay_ms: int = Field(default=0, ge=0)  # 0: batch only requests already queued
    # TorchServe's keys (serving/keys.py): the key_file.json it writes at each start. Unset:
    # run_dir/torchserve/key_file.json, where `python -m serving` and `make run` run it.
    torchserve_key_file: Path | None = None
    # Token authorization on TorchServe's inference and management APIs (one switch in TorchServe).
    # Off only where its per-process keys cannot be shared (several replicas behind one Service).
    torchserve_token_auth: bool = True

    # The web page and JSON API.
    ui_host: str = "127.0.0.1"
    ui_port: int = Field(default=8500, ge=1, le=65535)
    storage_secret: str | None = None  # NiceGUI's browser storage; generated per run when unset
    # The operator's token (`Authorization: Bearer ...`): may label and delete any prediction.
    # Unset: nobody is the operator (`make run` generates one, kept in DATA_DIR/admin_token).
    admin_token: str | None = None

    # Where local state lives: embedded PostgreSQL data and the UI's outbox (`data_dir/outbox`:
    # predictions and labels accepted while the database was down); TorchServe logs and pid files.
    data_dir: Path = ROOT / ".data"
    run_dir: Path = ROOT / ".run"
    # The learning loop (serving/trainer.py): the MNIST files (unset: data_dir/"mnist"), how many
    # MNIST test images a candidate and the live version are compared on (unset: all 10,000), and
    # how often the trainer checks that TorchServe serves the registry's live version.
    mnist_dir: Path | None = None
    mnist_eval_limit: int | None = Field(default=None, ge=1)
    restore_interval_s: float = Field(default=10.0, gt=0)
    # The outbox's size limit; beyond it the API answers 503 until the database takes what waits.
    outbox_max_bytes: int = Field(default=256_000_000, gt=0)
    # The storage quota: at most this many drawings (about 5 KB each); beyond it new predictions are
    # refused (507) unless STORAGE_PRUNE lets the oldest unlabelled drawings go. Unset: no quota.
    storage_max_rows: int | None = Field(default=1_000_000, ge=1)
    storage_prune: bool = False

    # Input limits shared by the API and the page.
    max_upload_bytes: int = Field(default=2_000_000, gt=0)
    # The web side's bounds (ui/guard.py, ui/ratelimit.py, ui/headers.py; docs/security.md).
    max_label_bytes: int = Field(default=4_096, gt=0)  # a label body is a few bytes of JSON
    body_timeout_s: float = Field(default=10.0, gt=0)  # the whole body within this, else 408
    head_timeout_s: float = Field(
        default=10.0, gt=0
    )  # each request head within this, else 408 (ui/protocol.py)
    keep_alive_timeout_s: int = Field(default=5, ge=1)  # idle connections closed after it (s)
    max_concurrency: int = Field(default=500, ge=1)  # connections + tasks at once; beyond: 503
    # Per client address, `limits` notation ("60/minute", "10/second"); loopback gets its own.
    rate_limit_predictions: str = "60/minute"
    rate_limit_labels: str = "120/minute"
    rate_limit_login: str = "10/minute"  # operator log-in attempts on /admin, per address (loopback too)
    rate_limit_loopback: str = "100000/minute"
    # Proxies whose X-Forwarded-For is believed: comma-separated addresses or CIDRs ("" = none).
    trusted_proxies: str = ""
    # Who may read /metrics without the operator token (Prometheus): these networks, when the request
    # did not pass an untrusted proxy (ui.ratelimit.is_internal).
    internal_networks: str = "127.0.0.0/8, ::1/128, 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, fc00::/7"
    https: bool = False  # served over HTTPS (by the proxy in front): HSTS sent, cookies Secure
    cookie_secure: bool = False  # cookies Secure even without HTTPS=true

    @property
    def archives(self) -> Path:
        """TorchServe's model store and the trainer's output: `archive_dir`, else data_dir/"archives"."""
        return archive_folder(self.archive_dir, self.data_dir)

    @property
    def mnist_files(self) -> Path:
        """Where the MNIST files are: `mnist_dir`, else data_dir/"mnist"."""
        return Path(self.mnist_dir) if self.mnist_dir else Path(self.data_dir) / "mnist"


def archive_folder(archive_dir: Path | None, data_dir: Path) -> Path:
    """The one rule for where archives live (also `serving.torchserve.ServeConfig`'s default)."""
    return Path(archive_dir) if archive_dir else Path(data_dir) / "archives"


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings (cached; tests may call `get_settings.cache_clear()`)."""
    return Settings()
