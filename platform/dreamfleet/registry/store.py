"""The registry of per-subject experts, on any filesystem ``pyarrow.fs`` opens.

Layout (all paths relative to the registry root)::

    registry.json                         format marker and version
    subjects/<id>/state.json              queued | training | done | failed, step, loss, error, attempts
    subjects/<id>/versions/v0001/...      immutable expert folders; expert.json is written last
    subjects/<id>/versions/v0001/eval.json  metrics of that expert, added after (`dreamfleet demo`)
    subjects/<id>/latest                  the published version, e.g. "v0002"
    runs/<run_id>.json                    one file per training run (manifest, base model, subjects)
    checkpoints/                          Ray Train checkpoint storage of running fine-tunes

Readers never see a half-written expert: a version folder counts only once its
``expert.json`` exists, and ``latest`` is replaced in one write after the version is
complete, only for a successful run. Version numbers are allocated under a lock file on
local (and NFS) registries, so concurrent orchestrators never collide. On S3 there is no
lock and no rename, so two conditional writes take their place:

- a publisher claims ``versions/vNNNN/.claim`` with ``If-None-Match: *``; the one whose
  write succeeds owns the number, the others take the next (no number is used twice);
- ``latest`` moves forward only, with ``If-Match`` on the ETag it read: a publisher
  that finds a newer complete version already named there leaves it (a slow publisher
  never moves ``latest`` back), and one that loses the race reads again.

Other object stores (gs://, ...) have neither; one writer per subject at a time there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from dreamfleet.core.errors import DataError, DreamfleetError
from dreamfleet.core.expert import EXPERT_FILE, ExpertInfo
from dreamfleet.core.ids import validate_subject_id
from dreamfleet.core.storage import ConditionalObjects, check_location, concurrently, is_s3, open_fs

log = logging.getLogger("dreamfleet")

REGISTRY_FORMAT = "dreamfleet-registry"
REGISTRY_VERSION = 1
STATES = ("queued", "training", "done", "failed")
VERSION_RE = re.compile(r"^v(\d{4,})$")
CLAIM = ".claim"  # the object that reserves a version number on S3
EVAL_FILE = "eval.json"  # an expert's evaluation, stored beside its files (the dashboard shows it)
SINGLE_PUT_BYTES = 64 * 2**20  # files up to this size are uploaded to S3 in one PUT (S3 takes up to 5 GiB)


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class SubjectState:
    subject_id: str
    state: str = "queued"
    run_id: str | None = None
    step: int = 0
    total_steps: int | None = None
    loss: float | None = None
    loss_instance: float | None = None
    loss_prior: float | None = None
    recent_losses: list[float] = field(default_factory=list)
    attempts: int = 0
    error: str | None = None
    version: str | None = None
    checkpoint: str | None = None
    checkpoint_step: int | None = None
    worker: dict[str, Any] = field(default_factory=dict)
    class_noun: str | None = None
    tenant: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    updated_at: str = field(default_factory=now)

    def __post_init__(self) -> None:
        if self.state not in STATES:
            raise ValueError(f"unknown subject state {self.state!r}; one of {STATES}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SubjectState:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class Registry:
    def __init__(self, uri: str | os.PathLike, *, create: bool = True):
        self.uri = str(uri)
        check_location(self.uri, what="registry")
        self.fs, self.root = open_fs(self.uri, what="registry")
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)
        self.objects = ConditionalObjects(self.uri) if is_s3(self.uri) else None
        marker = self._p("registry.json")
        info = self.fs.get_file_info(marker)
        if info.type == pafs.FileType.NotFound:
            if not create:
                raise DreamfleetError(f"{self.uri}: no registry here (no registry.json); check the path")
            if self.is_local:
                self.fs.create_dir(self.root, recursive=True)
            self._write_json(marker, {"format": REGISTRY_FORMAT, "version": REGISTRY_VERSION, "created_at": now()})
        else:
            meta = self._read_json(marker)
            if meta.get("format") != REGISTRY_FORMAT:
                raise DreamfleetError(f"{self.uri}: registry.json is not a dreamfleet registry marker")
            if int(meta.get("version", 0)) > REGISTRY_VERSION:
                raise DreamfleetError(
                    f"{self.uri}: registry format {meta['version']} is newer than this dreamfleet reads "
                    f"({REGISTRY_VERSION}); upgrade dreamfleet"
                )

    # ------------------------------------------------------------------ paths and small files

    def _p(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def subject_path(self, subject_id: str, *parts: str) -> str:
        validate_subject_id(subject_id)
        return self._p("subjects", subject_id, *parts)

    @property
    def checkpoint_storage(self) -> str:
        """Where Ray Train persists checkpoints (a path or URI Ray understands)."""
        if self.is_local:
            return self._p("checkpoints")
        return self.uri.rstrip("/") + "/checkpoints"

    def _exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def _read_json(self, path: str) -> Any:
        data = self._get(path)
        if data is None:
            raise FileNotFoundError(path)
        return json.loads(data.decode())

    def _get(self, path: str) -> bytes | None:
        """A small object's bytes, or None when it is absent: one GET on S3 (no HEAD first)."""
        if self.objects is not None:
            return self.objects.read(path)[0]
        if not self._exists(path):
            return None
        with self.fs.open_input_stream(path) as f:
            return f.read()

    def _put(self, path: str, data: bytes) -> None:
        """A small object in one request on S3 (pyarrow's stream would take three: a multipart
        upload's create, part and complete)."""
        if self.objects is not None:
            self.objects.put(path, data)
            return
        with self.fs.open_output_stream(path) as f:
            f.write(data)

    def _write_json(self, path: str, obj: Any) -> None:
        """Atomic on local filesystems (write + rename); a single PUT on object stores."""
        data = (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()
        parent = path.rsplit("/", 1)[0]
        if self.is_local:
            self.fs.create_dir(parent, recursive=True)
            tmp = f"{parent}/.{path.rsplit('/', 1)[1]}.{uuid.uuid4().hex[:8]}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        else:
            self._put(path, data)

    @contextlib.contextmanager
    def _lock(self, subject_id: str) -> Iterator[None]:
        if not self.is_local:
            yield
            return
        from filelock import FileLock

        path = self.subject_path(subject_id)
        os.makedirs(path, exist_ok=True)
        with FileLock(f"{path}/.lock", timeout=120):
            yield

    # ------------------------------------------------------------------ subject states

    def get_state(self, subject_id: str) -> SubjectState | None:
        data = self._get(self.subject_path(subject_id, "state.json"))
        if data is None:
            return None
        try:
            return SubjectState.from_dict(json.loads(data.decode()))
        except (ValueError, TypeError) as e:
            log.warning("registry: unreadable state for subject %r (%s)", subject_id, e)
            return None

    def set_state(self, st: SubjectState) -> SubjectState:
        st.updated_at = now()
        self._write_json(self.subject_path(st.subject_id, "state.json"), dataclasses.asdict(st))
        return st

    def update_state(self, subject_id: str, **changes: Any) -> SubjectState:
        st = self.get_state(subject_id) or SubjectState(subject_id)
        for key, value in changes.items():
            if not hasattr(st, key):
                raise AttributeError(f"SubjectState has no field {key!r}")
            setattr(st, key, value)
        if st.state not in STATES:
            raise ValueError(f"unknown subject state {st.state!r}")
        return self.set_state(st)

    def subjects(self) -> list[str]:
        base = self._p("subjects")
        if not self._exists(base):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=False))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory and not i.base_name.startswith("."))

    def states(self) -> dict[str, SubjectState]:
        def state(sid: str) -> SubjectState | None:
            st = self.get_state(sid)
            if st is None and (version := self.latest(sid)):
                st = SubjectState(sid, state="done", version=version)
            return st

        sids = self.subjects()
        return {sid: st for sid, st in zip(sids, concurrently(state, sids), strict=True) if st is not None}

    # ------------------------------------------------------------------ versions

    def versions(self, subject_id: str) -> list[str]:
        """Complete versions (those whose expert.json exists), oldest first."""
        base = self.subject_path(subject_id, "versions")
        if not self._exists(base):
            return []
        names = []
        for info in self.fs.get_file_info(pafs.FileSelector(base, recursive=False)):
            is_version = info.type == pafs.FileType.Directory and VERSION_RE.match(info.base_name)
            if is_version and self._exists(f"{base}/{info.base_name}/{EXPERT_FILE}"):
                names.append(info.base_name)
        return sorted(names, key=lambda v: int(v[1:]))

    def latest(self, subject_id: str) -> str | None:
        data = self._get(self.subject_path(subject_id, "latest"))
        return (data or b"").decode().strip() or None

    def _next_version(self, subject_id: str) -> str:
        base = self.subject_path(subject_id, "versions")
        taken = []
        if self._exists(base):
            for info in self.fs.get_file_info(pafs.FileSelector(base, recursive=False)):
                m = VERSION_RE.match(info.base_name.lstrip(".").split(".tmp")[0])
                if m:
                    taken.append(int(m.group(1)))
        return f"v{max(taken, default=0) + 1:04d}"

    def publish(self, subject_id: str, expert_dir: str | Path, *, set_latest: bool = True) -> str:
        """Copy a finished expert folder in as a new version; move ``latest`` to it."""
        expert_dir = Path(expert_dir)
        if not (expert_dir / EXPERT_FILE).is_file():
            raise DataError(f"{expert_dir}: not an expert folder (no {EXPERT_FILE}); nothing published")
        if self.objects is not None:
            return self._publish_s3(subject_id, expert_dir, set_latest)
        with self._lock(subject_id):
            version = self._next_version(subject_id)
            final = self.subject_path(subject_id, "versions", version)
            if self.is_local:
                tmp = self.subject_path(subject_id, "versions", f".{version}.tmp-{uuid.uuid4().hex[:8]}")
                os.makedirs(os.path.dirname(tmp), exist_ok=True)
                shutil.copytree(expert_dir, tmp)
                os.rename(tmp, final)
            else:
                self._upload_dir(expert_dir, final)
            if set_latest:
                self._write_text(self.subject_path(subject_id, "latest"), version)
        return version

    def _publish_s3(self, subject_id: str, expert_dir: Path, set_latest: bool) -> str:
        version = self._claim_version(subject_id)
        self._upload_dir(expert_dir, self.subject_path(subject_id, "versions", version))
        if set_latest:
            self._advance_latest(subject_id, version)
        return version

    def _claim_version(self, subject_id: str) -> str:
        """The first free number from the listing on, taken with a create-if-absent write."""
        number = int(self._next_version(subject_id)[1:])
        claim = json.dumps({"claimed_at": now(), "host": os.uname().nodename, "pid": os.getpid()}).encode()
        while not self.objects.create(self.subject_path(subject_id, "versions", f"v{number:04d}", CLAIM), claim):
            number += 1
        return f"v{number:04d}"

    def _advance_latest(self, subject_id: str, version: str) -> None:
        path = self.subject_path(subject_id, "latest")
        while True:
            body, etag = self.objects.read(path)
            current = (body or b"").decode().strip()
            if VERSION_RE.match(current) and int(current[1:]) > int(version[1:]) and current in self.versions(subject_id):
                return  # a newer complete version is already latest
            if self.objects.replace(path, (version + "\n").encode(), etag):
                return

    def _upload_dir(self, local: Path, dest: str) -> None:
        files = sorted(p for p in local.rglob("*") if p.is_file())
        # expert.json last: until it exists, the version is not complete for readers
        files.sort(key=lambda p: p.name == EXPERT_FILE)
        for path in files:
            target = f"{dest}/{path.relative_to(local).as_posix()}"
            if self.objects is not None and path.stat().st_size <= SINGLE_PUT_BYTES:
                self._put(target, path.read_bytes())  # one request, not a multipart upload's three
                continue
            if self.objects is None:
                self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
            with open(path, "rb") as src, self.fs.open_output_stream(target) as out:
                shutil.copyfileobj(src, out)

    def _write_text(self, path: str, text: str) -> None:
        if self.is_local:
            tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
            Path(tmp).write_text(text + "\n")
            os.replace(tmp, path)
        else:
            self._put(path, (text + "\n").encode())

    def resolve_version(self, subject_id: str, version: str | None = None) -> str:
        if version in (None, "", "latest"):
            version = self.latest(subject_id)
            if version is None:
                raise DataError(f"subject {subject_id!r} has no published expert in {self.uri}")
        elif version not in self.versions(subject_id):
            raise DataError(
                f"subject {subject_id!r} has no version {version!r}; versions: {', '.join(self.versions(subject_id)) or 'none'}"
            )
        return version

    def expert_info(self, subject_id: str, version: str | None = None) -> ExpertInfo:
        version = self.resolve_version(subject_id, version)
        return ExpertInfo.read(self.fetch(subject_id, version))

    def fetch(self, subject_id: str, version: str | None = None, *, cache_dir: str | Path | None = None) -> Path:
        """A local folder holding the expert: the registry's own on local disk, a cached download otherwise."""
        version = self.resolve_version(subject_id, version)
        remote = self.subject_path(subject_id, "versions", version)
        if self.is_local:
            return Path(remote)
        cache = Path(cache_dir or Path(tempfile.gettempdir()) / "dreamfleet-experts")
        local = cache / re.sub(r"[^A-Za-z0-9._-]+", "_", self.uri) / subject_id / version
        if not (local / EXPERT_FILE).is_file():
            tmp = local.with_name(f".{version}.{uuid.uuid4().hex[:8]}")
            self.download(f"subjects/{subject_id}/versions/{version}", tmp)
            local.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, local) if not local.exists() else shutil.rmtree(tmp, ignore_errors=True)
        return local

    def download(self, rel_path: str, local: str | Path) -> Path:
        """Copy a folder of the registry (e.g. a Ray Train checkpoint under ``checkpoints/``) to local disk."""
        src = self._p(*rel_path.strip("/").split("/"))
        if self.fs.get_file_info(src).type != pafs.FileType.Directory:
            raise DataError(f"{self.uri}: no folder {rel_path!r}")
        local = Path(local)
        for info in self.fs.get_file_info(pafs.FileSelector(src, recursive=True)):
            if info.type == pafs.FileType.File and info.base_name != CLAIM:
                target = local / info.path[len(src) + 1:]
                target.parent.mkdir(parents=True, exist_ok=True)
                with self.fs.open_input_stream(info.path) as f, open(target, "wb") as out:
                    shutil.copyfileobj(f, out)
        return local

    def write_evaluation(self, subject_id: str, version: str, metrics: dict[str, Any]) -> None:
        """Store the metrics of one published expert beside its files (its folder's ``eval.json``);
        the expert's own files are untouched."""
        version = self.resolve_version(subject_id, version)
        self._write_json(self.subject_path(subject_id, "versions", version, EVAL_FILE), metrics)

    def delete(self, subject_id: str, version: str | None = None) -> list[str]:
        """Delete one version (moving ``latest`` back to the newest remaining) or the whole subject."""
        if subject_id not in self.subjects():
            raise DataError(f"subject {subject_id!r} is not in the registry {self.uri}")
        with self._lock(subject_id):
            if version is None:
                removed = self.versions(subject_id)
                self.fs.delete_dir(self.subject_path(subject_id))
                return removed
            version = self.resolve_version(subject_id, version)
            self.fs.delete_dir(self.subject_path(subject_id, "versions", version))
            remaining = self.versions(subject_id)
            if self.latest(subject_id) == version:
                if remaining:
                    self._write_text(self.subject_path(subject_id, "latest"), remaining[-1])
                else:
                    self.fs.delete_file(self.subject_path(subject_id, "latest"))
            return [version]

    # ------------------------------------------------------------------ runs

    def write_run(self, run_id: str, data: dict[str, Any]) -> None:
        self._write_json(self._p("runs", f"{run_id}.json"), {**data, "run_id": run_id, "updated_at": now()})

    def update_run(self, run_id: str, **changes: Any) -> dict[str, Any]:
        data = self.run(run_id) or {}
        data.update(changes)
        self.write_run(run_id, data)
        return data

    def run(self, run_id: str) -> dict[str, Any] | None:
        data = self._get(self._p("runs", f"{run_id}.json"))
        return json.loads(data.decode()) if data is not None else None

    def runs(self) -> list[dict[str, Any]]:
        base = self._p("runs")
        if not self._exists(base):
            return []
        out = []
        for info in self.fs.get_file_info(pafs.FileSelector(base, recursive=False)):
            if info.base_name.endswith(".json") and not info.base_name.startswith("."):
                with contextlib.suppress(ValueError, OSError):
                    out.append(self._read_json(info.path))
        return sorted(out, key=lambda r: r.get("started_at", ""))
