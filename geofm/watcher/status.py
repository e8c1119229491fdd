"""The status document of a submission (`<prefix>/status/<id>.json`), written only by the
watcher and read by the CI wait job (geofm/cli/wait.py). One dataclass for both sides:
`Status.parse` validates every field it keeps, so neither side acts on a malformed value.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from geofm import names
from geofm.config import SAFE_NAME
from geofm.store import MAX_JSON_BYTES, Malformed, now, parse_json

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL = ("succeeded", "failed", "cancelled")
MAX_TEXT = 20_000
STAMPS = ("submitted_at", "started_at", "snakemake_started_at", "finished_at", "updated_at")


def _text(value, what: str, limit: int = MAX_TEXT) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise Malformed(f"status.{what}: not a string of at most {limit} characters")
    return value


@dataclass
class Status:
    submission: str
    state: str = "queued"
    experiment: str | None = None
    commit: str | None = None
    branch: str | None = None
    attempt: int = 0
    watcher: str | None = None
    message: str = ""
    progress: str | None = None
    submitted_by: str | None = None  # from the verified ID token, never from the submission
    pipeline_url: str | None = None
    submitted_at: str | None = None
    started_at: str | None = None
    snakemake_started_at: str | None = None
    finished_at: str | None = None
    updated_at: str | None = None
    results_commit: str | None = None
    results_path: str | None = None  # results/<experiment>, relative to the repository
    pending_publish: bool = False  # results prepared, their push waits for the git/DVC remote
    summary: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    log_tail: str | None = None
    history: list[dict] = field(default_factory=list)

    # writing ------------------------------------------------------------------------------
    def set_state(self, state: str, **fields) -> None:
        assert state in STATES, state
        stamp = now()
        if state != self.state or not self.history:
            self.history.append({"state": state, "at": stamp})
        self.state = state
        self.update(**fields)

    def update(self, **fields) -> None:
        for key, value in fields.items():
            if not hasattr(self, key):
                raise AttributeError(key)
            setattr(self, key, value)
        self.updated_at = now()

    def to_bytes(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True).encode()

    # reading ------------------------------------------------------------------------------
    @classmethod
    def parse(cls, data: bytes, sid: str | None = None) -> Status:
        """A status document, every kept field validated; Malformed with the first problem."""
        if len(data) > MAX_JSON_BYTES:
            raise Malformed(f"status: {len(data)} bytes, more than {MAX_JSON_BYTES}")
        doc = parse_json(data, "status")
        s = doc.get("submission")
        if not names.valid(names.SUBMISSION_ID, s) or (sid is not None and s != sid):
            raise Malformed(f"status.submission: {names.short(s)} is not {sid or 'a submission id'}")
        state = doc.get("state")
        if state not in STATES:
            raise Malformed(f"status.state: {names.short(state)} is not one of {', '.join(STATES)}")
        checks = {
            "experiment": lambda v: names.valid(SAFE_NAME, v) and v not in (".", ".."),
            "commit": lambda v: names.valid(names.COMMIT, v),
            "results_commit": lambda v: names.valid(names.COMMIT, v),
            "branch": lambda v: names.valid(names.SAFE_BRANCH, v),
            "results_path": names.relative_inside,
        }
        kept: dict = {"submission": s, "state": state}
        for key, ok in checks.items():
            value = doc.get(key)
            if value is not None and not ok(value):
                raise Malformed(f"status.{key}: {names.short(value)} is not a valid value")
            kept[key] = value
        attempt = doc.get("attempt", 0)
        if not isinstance(attempt, int) or isinstance(attempt, bool) or not 0 <= attempt < 10_000:
            raise Malformed(f"status.attempt: {names.short(attempt)} is not a small whole number")
        kept["attempt"] = attempt
        kept["pending_publish"] = doc.get("pending_publish") is True
        for key in ("watcher", "progress", "submitted_by", "pipeline_url", "log_tail", *STAMPS):
            kept[key] = _text(doc.get(key), key)
        kept["message"] = _text(doc.get("message"), "message") or ""
        for key in ("summary", "errors", "history"):
            value = doc.get(key, [])
            if not isinstance(value, list) or len(value) > 10_000 or not all(isinstance(v, dict) for v in value):
                raise Malformed(f"status.{key}: not a list of mappings")
            kept[key] = value
        return cls(**kept)
