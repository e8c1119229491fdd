"""Object storage (any S3-compatible store: IBM COS, SeaweedFS, AWS) as the mailbox between CI
and the cluster-side watcher.

Layout under a bucket prefix (default ``geofm``), and which key writes where:

    <prefix>/queue/<id>                        CI writes (empty marker); the watcher deletes it when done
    <prefix>/submissions/<id>/config.yaml      CI: the experiment config, byte for byte as committed
    <prefix>/submissions/<id>/submission.json  CI: commit, branch, config path, the job's ID token
    <prefix>/submissions/<id>/cancel           CI: the wait job asks the watcher to stop the run
    <prefix>/status/<id>.json                  watcher: queued | running | succeeded | failed | cancelled
    <prefix>/leases/<id>.json                  watcher: which watcher runs it (conditional writes only)
    <prefix>/quarantine/<id>/<name>            watcher: malformed objects set aside, with reason.json

CI's key can therefore write only ``queue/`` and ``submissions/`` (and read ``status/``); it can
neither forge a status nor touch a lease. Submission ids start with the UTC upload time, so
listing ``queue/`` returns them in order, and the watcher lists only that small prefix.

Every read is capped (`get(..., max_bytes)`): an oversized object raises TooLarge unread.
Credentials come only from the environment (or any other source boto3 reads); nothing here
writes or prints them.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import boto3
import botocore.exceptions
from botocore.config import Config

from geofm import names
from geofm.retry import Transient

DEFAULT_PREFIX = "geofm"
MAX_JSON_BYTES = 256 * 1024  # status, lease and submission documents
SUBMISSION_ID = names.SUBMISSION_ID
# Environment variables whose values must never reach a log, a status object or git.
SECRET_ENV = (
    "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "GEOFM_GIT_TOKEN", "CI_JOB_TOKEN",
    "GEOFM_DVC_ACCESS_KEY_ID", "GEOFM_DVC_SECRET_ACCESS_KEY", "GEOFM_ID_TOKEN",
)  # fmt: skip


class Unavailable(Transient):
    """The object store cannot be reached or answers with a server error (retry later)."""


class PreconditionFailed(Exception):
    """A conditional write lost: the object exists (IfNoneMatch) or changed (IfMatch)."""


class TooLarge(Exception):
    """An object is larger than the reader accepts; it was not read."""


class Malformed(ValueError):
    """An object is not what it should be (not JSON, not a mapping, missing fields...)."""


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_submission_id(commit: str) -> str:
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%f")
    short = re.sub(r"[^0-9a-f]", "", commit.lower())[:12].ljust(7, "0")
    return f"{stamp}Z-{short}-{secrets.token_hex(3)}"


def secret_values(env: dict | None = None) -> list[str]:
    env = os.environ if env is None else env
    return [env[k] for k in SECRET_ENV if len(env.get(k, "")) >= 4]


def scrub(text: str, values: list[str] | None = None) -> str:
    """Replace every credential value (default: those in the environment) with [masked]."""
    for value in sorted(secret_values() if values is None else values, key=len, reverse=True):
        if value:
            text = text.replace(value, "[masked]")
    return text


def client(endpoint_url: str | None = None, timeout: float = 10, credentials: dict | None = None):
    """An S3 client for any S3-compatible store; path-style addressing, short timeouts.

    Retries are left to the caller (geofm.retry), so that an outage is logged and waited out
    rather than hidden in long client-side retry loops.
    """
    config = Config(
        connect_timeout=timeout,
        read_timeout=max(30, timeout),
        retries={"max_attempts": 2, "mode": "standard"},
        s3={"addressing_style": "path"},
        signature_version="s3v4",
        # Only send checksums when an operation requires them: older S3-compatible stores
        # (COS, SeaweedFS) reject the newer default trailing checksums on some requests.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
    keys = {}
    if credentials:
        keys = {"aws_access_key_id": credentials["AWS_ACCESS_KEY_ID"],
                "aws_secret_access_key": credentials["AWS_SECRET_ACCESS_KEY"]}  # fmt: skip
    return boto3.client("s3", endpoint_url=endpoint_url or None, region_name=region, config=config, **keys)


def _code(error: botocore.exceptions.ClientError) -> tuple[str, int]:
    meta = error.response.get("ResponseMetadata", {})
    return str(error.response.get("Error", {}).get("Code", "")), int(meta.get("HTTPStatusCode") or 0)


def _transient(error: Exception) -> bool:
    if isinstance(error, botocore.exceptions.ClientError):
        code, status = _code(error)
        return status >= 500 or code in ("SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout")
    return isinstance(
        error,
        botocore.exceptions.EndpointConnectionError
        | botocore.exceptions.ConnectionClosedError
        | botocore.exceptions.ConnectTimeoutError
        | botocore.exceptions.ReadTimeoutError
        | botocore.exceptions.HTTPClientError
        | botocore.exceptions.ResponseStreamingError
        | ConnectionError,
    )


def parse_json(data: bytes, what: str) -> dict:
    """A JSON mapping, or Malformed with a one-line reason."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise Malformed(f"{what}: not JSON ({str(e).splitlines()[0][:80]})") from None
    if not isinstance(doc, dict):
        raise Malformed(f"{what}: a JSON {type(doc).__name__}, not a mapping")
    return doc


@dataclass
class Store:
    """One bucket prefix; every call raises Unavailable on network or server trouble."""

    bucket: str
    prefix: str = DEFAULT_PREFIX
    endpoint_url: str | None = None
    credentials: dict | None = None

    def __post_init__(self):
        self.prefix = self.prefix.strip("/")
        if not names.valid(names.SAFE_PREFIX, self.prefix) or ".." in self.prefix.split("/"):
            raise ValueError(f"S3 prefix {self.prefix!r} is not a plain key prefix")
        self.s3 = client(self.endpoint_url, credentials=self.credentials)

    # keys ---------------------------------------------------------------------------------
    @staticmethod
    def _checked(sid: str) -> str:
        if not names.valid(SUBMISSION_ID, sid):
            raise ValueError(f"not a submission id: {names.short(sid)}")
        return sid

    def queue_key(self, sid: str = "") -> str:
        return f"{self.prefix}/queue/{self._checked(sid) if sid else ''}"

    def key(self, sid: str, name: str) -> str:
        """An object of the submission as CI uploaded it (config.yaml, submission.json, cancel)."""
        return f"{self.prefix}/submissions/{self._checked(sid)}/{name}"

    def status_key(self, sid: str) -> str:
        return f"{self.prefix}/status/{self._checked(sid)}.json"

    def lease_key(self, sid: str) -> str:
        return f"{self.prefix}/leases/{self._checked(sid)}.json"

    def quarantine_key(self, sid: str, name: str) -> str:
        return f"{self.prefix}/quarantine/{self._checked(sid)}/{name}"

    # primitives ---------------------------------------------------------------------------
    def _call(self, fn: Callable, **kwargs):
        try:
            return fn(**kwargs)
        except botocore.exceptions.ClientError as e:
            code, status = _code(e)
            if status == 412 or code == "PreconditionFailed":
                raise PreconditionFailed(kwargs.get("Key", "")) from None
            if status == 404 or code in ("NoSuchKey", "404", "NotFound"):
                raise KeyError(kwargs.get("Key", "")) from None
            if _transient(e):
                raise Unavailable(f"{code or status} from object store") from None
            raise
        except botocore.exceptions.BotoCoreError as e:
            if _transient(e):
                raise Unavailable(type(e).__name__) from None
            raise

    def put(self, key: str, body: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> str:
        kwargs = {"Bucket": self.bucket, "Key": key, "Body": body}
        if if_none_match:
            kwargs["IfNoneMatch"] = "*"
        if if_match is not None:
            kwargs["IfMatch"] = if_match
        return self._call(self.s3.put_object, **kwargs)["ETag"]

    def get(self, key: str, max_bytes: int = MAX_JSON_BYTES) -> tuple[bytes, str]:
        """(body, etag); KeyError when missing, TooLarge (unread) when over max_bytes."""
        response = self._call(self.s3.get_object, Bucket=self.bucket, Key=key)
        body = response["Body"]
        try:
            if int(response.get("ContentLength") or 0) > max_bytes:
                raise TooLarge(f"{key}: {response['ContentLength']} bytes, more than the {max_bytes} accepted")
            try:
                data = body.read(max_bytes + 1)
            except (botocore.exceptions.BotoCoreError, OSError) as e:
                raise Unavailable(f"reading {key}: {type(e).__name__}") from None
            if len(data) > max_bytes:
                raise TooLarge(f"{key}: more than the {max_bytes} bytes accepted")
        finally:
            body.close()
        return data, response["ETag"]

    def etag(self, key: str) -> str | None:
        """The object's ETag (None when missing), without reading it."""
        try:
            return self._call(self.s3.head_object, Bucket=self.bucket, Key=key)["ETag"]
        except KeyError:
            return None

    def exists(self, key: str) -> bool:
        return self.etag(key) is not None

    def modified(self, key: str) -> float:
        """When the store received the object (POSIX seconds, the store's clock); KeyError when missing."""
        return self._call(self.s3.head_object, Bucket=self.bucket, Key=key)["LastModified"].timestamp()

    def delete(self, key: str, *, if_match: str | None = None) -> None:
        kwargs = {"Bucket": self.bucket, "Key": key}
        if if_match is not None:
            kwargs["IfMatch"] = if_match
        try:
            self._call(self.s3.delete_object, **kwargs)
        except KeyError:
            if if_match is not None:  # gone already: nothing of ours to delete
                raise PreconditionFailed(key) from None

    def list(self, prefix: str) -> list[str]:
        keys, token = [], None
        while True:
            kwargs = {"Bucket": self.bucket, "Prefix": prefix}
            if token:
                kwargs["ContinuationToken"] = token
            page = self._call(self.s3.list_objects_v2, **kwargs)
            keys += [o["Key"] for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return keys
            token = page["NextContinuationToken"]

    def put_json(self, key: str, doc: dict, **conditions) -> str:
        return self.put(key, json.dumps(doc, indent=2, sort_keys=True).encode(), **conditions)

    def get_json(self, key: str, max_bytes: int = MAX_JSON_BYTES) -> tuple[dict, str] | None:
        """(mapping, etag) or None when missing; Malformed / TooLarge when it is not a small JSON mapping."""
        try:
            body, etag = self.get(key, max_bytes)
        except KeyError:
            return None
        return parse_json(body, key), etag

    # submissions --------------------------------------------------------------------------
    def queued(self) -> list[str]:
        """Pending submission ids, oldest first (one LIST of the small queue/ prefix)."""
        start = len(self.queue_key())
        ids = [k[start:] for k in self.list(self.queue_key())]
        return sorted(i for i in ids if names.valid(SUBMISSION_ID, i))

    def submit(self, config_text: bytes, meta: dict) -> str:
        """Upload a submission (CI's key); the queue marker comes last, so the watcher sees it complete."""
        sid = new_submission_id(meta["commit"])
        meta = {**meta, "submission": sid, "submitted_at": now()}
        self.put(self.key(sid, "config.yaml"), config_text)
        self.put_json(self.key(sid, "submission.json"), meta)
        self.put(self.queue_key(sid), b"")
        return sid

    def quarantine(self, sid: str, name: str, reason: str, body: bytes | None, watcher: str) -> None:
        """Set an object aside under quarantine/<id>/ (a copy of `body`, when read, and the reason)."""
        stamp = now()
        if body is not None:
            self.put(self.quarantine_key(sid, f"{name}.{stamp}"), body)
        doc = {"object": name, "reason": reason, "at": stamp, "watcher": watcher}
        self.put_json(self.quarantine_key(sid, f"{name}.{stamp}.reason.json"), doc)

    def probe_conditional_writes(self, name: str) -> str | None:
        """Why this store cannot hold leases (it ignores a conditional write), or None if it can."""
        key = f"{self.prefix}/leases/.probe-{uuid.uuid4().hex}"
        self.put(key, f"probe by {name}".encode(), if_none_match=True)
        problems = []
        try:
            for what, attempt in (
                ("If-None-Match on an existing object", lambda: self.put(key, b"x", if_none_match=True)),
                ("If-Match with a stale ETag", lambda: self.put(key, b"x", if_match='"0-stale"')),
                ("If-Match on delete with a stale ETag", lambda: self.delete(key, if_match='"0-stale"')),
            ):
                try:
                    attempt()
                    problems.append(what)
                except PreconditionFailed:
                    pass
        finally:
            try:
                self.delete(key)
            except Unavailable:
                pass
        return f"it ignored {', '.join(problems)}" if problems else None
