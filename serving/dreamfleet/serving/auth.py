"""API keys: bearer tokens mapped to tenants, stored hashed, compared in constant time.

A token looks like ``df_<id>_<secret>``. The keys file keeps only the sha256 of each token,
its id, tenant and whether it is an admin key; the token itself is shown once, when it is
created. A caller sees its tenant's subjects (and subjects without a tenant); admin keys
see all. Another tenant's subject answers 404, exactly like one that does not exist.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from dreamfleet.core.errors import ConfigError
from dreamfleet.core.storage import is_remote

KEYS_VERSION = 2  # 2: a key may carry its own rate_per_min (version-1 files load as they are)


@dataclass
class ApiKey:
    id: str
    hash: str
    tenant: str | None
    admin: bool = False
    name: str = ""
    created_at: str = ""
    revoked: bool = False
    rate_per_min: float | None = None
    """Requests a minute this key may send, in a bucket of its own (None: the tenant's bucket at
    the server's --rate-limit-per-min)."""


@dataclass(frozen=True)
class Caller:
    key_id: str | None
    tenant: str | None
    admin: bool
    rate_per_min: float | None = None

    def may_use(self, subject_tenant: str | None) -> bool:
        return self.admin or subject_tenant is None or subject_tenant == self.tenant


ANONYMOUS_ADMIN = Caller(None, None, True)  # no keys configured: loopback-only, sees everything


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class KeyStore:
    """The keys file, re-read when it changes on disk (revocations apply without a restart)."""

    def __init__(self, path: str | Path | None):
        """``path=None``: no keys file (a remote registry served without ``--keys``): keys are
        off, and ``dreamfleet serve`` then binds only a loopback address."""
        self.path = Path(path) if path is not None else None
        self._mtime: float | None = None
        self._keys: dict[str, ApiKey] = {}
        self._lock = threading.Lock()

    def _load(self) -> None:
        if self.path is None:
            self._keys, self._mtime = {}, None
            return
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            self._keys, self._mtime = {}, None
            return
        if mtime == self._mtime:
            return
        data = json.loads(self.path.read_text())
        if int(data.get("version", 0)) > KEYS_VERSION:
            raise ConfigError(f"{self.path}: keys file from a newer dreamfleet; upgrade")
        self._keys = {k["id"]: ApiKey(**k) for k in data.get("keys", [])}
        self._mtime = mtime

    def list_keys(self) -> list[ApiKey]:
        with self._lock:
            self._load()
            return list(self._keys.values())

    @property
    def enabled(self) -> bool:
        return any(not k.revoked for k in self.list_keys())

    def authenticate(self, token: str | None) -> Caller | None:
        """The caller for a token, or None. Never logs or stores the token."""
        if not token:
            return None
        parts = token.split("_")
        key_id = parts[1] if len(parts) == 3 and parts[0] == "df" else ""
        with self._lock:
            self._load()
            key = self._keys.get(key_id)
        # Compare against a dummy hash for unknown ids too, so timing does not reveal which ids exist.
        expected = key.hash if key is not None else "0" * 64
        if not hmac.compare_digest(_hash(token), expected) or key is None or key.revoked:
            return None
        return Caller(key.id, key.tenant, key.admin, key.rate_per_min)

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": KEYS_VERSION, "keys": [asdict(k) for k in self._keys.values()]}, indent=2))
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)
        self._mtime = self.path.stat().st_mtime

    def create(self, tenant: str | None, *, admin: bool = False, name: str = "",
               rate_per_min: float | None = None) -> tuple[ApiKey, str]:
        if not admin and not tenant:
            raise ConfigError("a key needs a --tenant (or --admin for a key that sees every subject)")
        if rate_per_min is not None and not 0 < rate_per_min < float("inf"):
            raise ConfigError(f"--rate-per-min must be positive and finite, got {rate_per_min:g} (leave it out for the "
                              "server's --rate-limit-per-min)")
        key_id = secrets.token_hex(4)
        token = f"df_{key_id}_{secrets.token_urlsafe(24).replace('_', '-')}"
        key = ApiKey(key_id, _hash(token), tenant, admin, name, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     rate_per_min=rate_per_min)
        with self._lock:
            self._load()
            self._keys[key_id] = key
            self._save()
        return key, token

    def revoke(self, key_id: str) -> ApiKey:
        with self._lock:
            self._load()
            if key_id not in self._keys:
                raise ConfigError(f"no key with id {key_id!r} in {self.path}")
            self._keys[key_id].revoked = True
            self._save()
            return self._keys[key_id]


def keys_for(keys: str | None, registry_uri: str) -> KeyStore:
    """The keys a server checks: ``keys`` if given, else the local registry's own keys file;
    a remote registry without ``keys`` has none."""
    if keys:
        return KeyStore(keys)
    if is_remote(registry_uri):
        return KeyStore(None)
    return KeyStore(default_keys_path(registry_uri))


def default_keys_path(registry_uri: str) -> Path:
    if is_remote(registry_uri):
        raise ConfigError("the registry is remote: pass --keys FILE for the API keys file")
    return Path(registry_uri.removeprefix("file://")).expanduser().resolve() / "serving" / "keys.json"
