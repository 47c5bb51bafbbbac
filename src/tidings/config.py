"""Settings: defaults < TOML file < environment (TIDINGS_*) < command-line flags."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field, fields
from typing import Any

LOGIN_POLICIES = frozenset({"unlimited", "one_per_platform", "one_total"})


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080  # HTTP API, WebSocket, health
    tcp_port: int = 8081  # raw TCP transport; -1 disables it
    data_dir: str = "./tidings-data"
    tls_cert: str = ""  # PEM paths; both set -> TLS on every listener
    tls_key: str = ""
    admin_key: str = ""  # empty: generated on first start into <data_dir>/admin.key
    signing_key: str = ""  # empty: generated on first start into <data_dir>/signing.key
    token_ttl_s: int = 30 * 24 * 3600
    allow_registration: bool = True  # self-registration with a password (standalone use)
    allowed_origins: list[str] = field(default_factory=list)  # WebSocket Origin allow-list
    # Who may be online at once: "unlimited", "one_per_platform" (a new session kicks the
    # user's other devices of the same platform) or "one_total" (kicks all other devices).
    login_policy: str = "unlimited"
    backlog: int = 4096
    log_level: str = "INFO"
    # protocol
    heartbeat_ms: int = 25_000
    idle_timeout_ms: int = 75_000
    auth_timeout_ms: int = 10_000
    max_frame_bytes: int = 65_536
    max_body_bytes: int = 32_768
    max_text_bytes: int = 8_192
    rate_per_s: float = 50.0
    rate_burst: int = 100
    max_inflight: int = 256
    recall_window_ms: int = 120_000  # how long after sending a message may be recalled
    typing_interval_ms: int = 1_000  # at most one typing notice per conversation this often
    presence_batch_ms: int = 1_000  # presence changes are pushed to contacts this often
    # groups
    group_max_members: int = 100_000  # the largest group (each group may set a lower limit)
    group_history_visible: bool = False  # new members see entries from before they joined
    group_receipt_list_max: int = 200  # "read by" lists readers up to this group size
    group_read_flush_ms: int = 1_000  # group read positions are written this often (max kept)
    # live rooms
    room_tick_ms: int = 100  # a room's posts go out once per tick (at most 100 ms)
    # False: each post goes to every viewer as its own frame as it arrives (no tick, no
    # sampling); likes and the online count still go out with the ticks.
    room_coalesce: bool = True
    room_render_per_s: float = 50.0  # posts a viewer gets per second; chat beyond is sampled
    room_ring_size: int = 20  # recent posts a viewer gets on joining (0: none)
    room_chat_per_s: float = 20.0  # per-user rate limits, per room
    room_high_per_s: float = 10.0
    room_likes_per_s: float = 20.0
    room_online_interval_ms: int = 5_000  # how often the online count goes out
    room_max_body_bytes: int = 1_024
    rooms_per_session: int = 5
    history_page_max: int = 100
    sync_page_max: int = 500
    # delivery
    retransmit_ms: int = 3_000
    max_retransmits: int = 3
    max_unacked: int = 4_096
    send_buffer_bytes: int = 1_048_576
    delivered_flush_ms: int = 200  # 1:1 delivered positions (from acks) are written this often
    # storage
    sqlite_readers: int = 2
    group_commit_max_batch: int = 1_000
    group_commit_linger_ms: float = 0.0
    max_pending_writes: int = 50_000
    wal_restart_bytes: int = 8 << 20  # past this the checkpointer makes the WAL start over
    checkpoint_interval_ms: int = 100  # how often the checkpointer backfills the WAL
    write_high_water: int = 2_000  # stop reading from senders above this write backlog
    write_low_water: int = 500  # ... and resume below this
    drain_timeout_s: float = 10.0
    # scale-out (docs/operations.md, "Running a cluster")
    database_url: str = ""  # postgresql://user@host:port/db: the PostgreSQL store
    pg_pool_size: int = 10  # connections per process
    redis_url: str = ""  # redis://host:port/db: the Redis bus (routing, presence, rooms)
    node_ttl_ms: int = 5_000  # a process silent this long is dead: its routes vanish
    workers: int = 1  # processes sharing the listening ports (PostgreSQL + Redis only)

    def __post_init__(self) -> None:
        if self.login_policy not in LOGIN_POLICIES:
            raise ValueError(f"login_policy must be one of {sorted(LOGIN_POLICIES)}")
        if not 1 <= self.room_tick_ms <= 100:
            raise ValueError("room_tick_ms must be 1..100")
        if self.delivered_flush_ms < 1:
            raise ValueError("delivered_flush_ms must be >= 1")
        if self.workers < 1:
            raise ValueError("workers must be >= 1")
        if self.workers > 1 and not (self.database_url and self.redis_url):
            raise ValueError(
                "workers > 1 needs database_url (PostgreSQL) and redis_url (Redis): "
                "SQLite has one writer per database"
            )
        if self.database_url and not self.database_url.startswith(("postgres://", "postgresql://")):
            raise ValueError("database_url must be a postgresql:// URL")
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("redis_url must be a redis:// or rediss:// URL")
        if self.node_ttl_ms < 500:
            raise ValueError("node_ttl_ms must be >= 500")

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert and self.tls_key)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


ENV_PREFIX = "TIDINGS_"
_FIELDS = {f.name: f for f in fields(Settings)}


def _coerce(name: str, value: Any) -> Any:
    default = getattr(Settings(), name)
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name}: expected a boolean, got {value!r}")
    if isinstance(default, int):
        return int(value)
    if isinstance(default, float):
        return float(value)
    if isinstance(default, list):
        if isinstance(value, list):
            return [str(v) for v in value]
        return [v.strip() for v in str(value).split(",") if v.strip()]
    return str(value)


def load_settings(
    config_file: str | None = None,
    env: dict[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> Settings:
    """Merge the sources in order; unknown keys are an error, not silently ignored."""
    env = dict(os.environ) if env is None else env
    values: dict[str, Any] = {}
    path = config_file or env.get(ENV_PREFIX + "CONFIG")
    if path:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
        for key, value in data.items():
            name = key.replace("-", "_")
            if name not in _FIELDS:
                raise ValueError(f"unknown setting {key!r} in {path}")
            values[name] = _coerce(name, value)
    for name in _FIELDS:
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is not None:
            values[name] = _coerce(name, raw)
    for name, value in (overrides or {}).items():
        if name not in _FIELDS:
            raise ValueError(f"unknown setting {name!r}")
        if value is not None:
            values[name] = _coerce(name, value)
    return Settings(**values)
