"""Object storage (S3 / IBM COS) as the mailbox between CI and the cluster-side watcher.

Layout under a bucket prefix (default ``geofm``):

    <prefix>/queue/<id>                        empty marker: the submission waits or runs
    <prefix>/submissions/<id>/config.yaml      the experiment config, byte for byte as committed
    <prefix>/submissions/<id>/submission.json  commit, branch, repository, pipeline, config path
    <prefix>/submissions/<id>/status.json      queued | running | succeeded | failed, with times
    <prefix>/submissions/<id>/lease.json       which watcher runs it (conditional writes only)

Submission ids start with the UTC upload time, so listing ``queue/`` returns them in order,
and the watcher lists only that (small) prefix while idle.

Credentials come only from the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or
any other source boto3 reads); nothing here writes or prints them.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import boto3
import botocore.exceptions
from botocore.config import Config

DEFAULT_PREFIX = "geofm"
SUBMISSION_ID = re.compile(r"^[0-9]{8}T[0-9]{12}Z-[0-9a-f]{7,40}-[0-9a-f]{6}$")
SAFE_PREFIX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,200}$")
STATES = ("queued", "running", "succeeded", "failed")
TERMINAL = ("succeeded", "failed")
# Environment variables whose values must never reach a log, a status object or git.
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "GEOFM_GIT_TOKEN", "CI_JOB_TOKEN")


class Unavailable(RuntimeError):
    """The object store cannot be reached or answers with a server error (retry later)."""


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


def client(endpoint_url: str | None = None, timeout: float = 10):
    """An S3 client for any S3-compatible store; path-style addressing, short timeouts.

    Retries are left to the caller (see `retrying`), so that an outage is logged and waited
    out rather than hidden in long client-side retry loops.
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
    return boto3.client("s3", endpoint_url=endpoint_url or None, region_name=region, config=config)


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
        | ConnectionError,
    )


class PreconditionFailed(Exception):
    """A conditional write lost: the object exists (IfNoneMatch) or changed (IfMatch)."""


@dataclass
class Store:
    """One bucket prefix; every call raises Unavailable on network or server trouble."""

    bucket: str
    prefix: str = DEFAULT_PREFIX
    endpoint_url: str | None = None

    def __post_init__(self):
        self.prefix = self.prefix.strip("/")
        if not SAFE_PREFIX.match(self.prefix) or ".." in self.prefix.split("/"):
            raise ValueError(f"S3 prefix {self.prefix!r} is not a plain key prefix")
        self.s3 = client(self.endpoint_url)

    # keys
    def queue_key(self, sid: str = "") -> str:
        return f"{self.prefix}/queue/{sid}"

    def key(self, sid: str, name: str) -> str:
        if not SUBMISSION_ID.match(sid):
            raise ValueError(f"not a submission id: {sid!r}")
        return f"{self.prefix}/submissions/{sid}/{name}"

    # primitives
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

    def get(self, key: str) -> tuple[bytes, str]:
        """(body, etag); KeyError when missing."""
        response = self._call(self.s3.get_object, Bucket=self.bucket, Key=key)
        return response["Body"].read(), response["ETag"]

    def exists(self, key: str) -> bool:
        try:
            self._call(self.s3.head_object, Bucket=self.bucket, Key=key)
            return True
        except KeyError:
            return False

    def delete(self, key: str) -> None:
        self._call(self.s3.delete_object, Bucket=self.bucket, Key=key)

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

    def get_json(self, key: str) -> tuple[dict, str] | None:
        try:
            body, etag = self.get(key)
        except KeyError:
            return None
        return json.loads(body), etag

    # submissions
    def queued(self) -> list[str]:
        """Pending submission ids, oldest first (one LIST of the small queue/ prefix)."""
        start = len(self.queue_key())
        ids = [k[start:] for k in self.list(self.queue_key())]
        return sorted(i for i in ids if SUBMISSION_ID.match(i))

    def status(self, sid: str) -> dict | None:
        found = self.get_json(self.key(sid, "status.json"))
        return found[0] if found else None

    def submit(self, config_text: bytes, meta: dict) -> str:
        """Upload a submission; the queue marker comes last, so the watcher sees it complete."""
        sid = new_submission_id(meta["commit"])
        meta = {**meta, "submission": sid, "submitted_at": now()}
        self.put(self.key(sid, "config.yaml"), config_text)
        self.put_json(self.key(sid, "submission.json"), meta)
        status = {
            "submission": sid,
            "state": "queued",
            "experiment": meta.get("experiment"),
            "commit": meta["commit"],
            "branch": meta["branch"],
            "submitted_at": meta["submitted_at"],
            "updated_at": meta["submitted_at"],
            "history": [{"state": "queued", "at": meta["submitted_at"]}],
        }
        self.put_json(self.key(sid, "status.json"), status)
        self.put(self.queue_key(sid), b"")
        return sid


class Backoff:
    """Exponential backoff with jitter, capped; reset after a success."""

    def __init__(self, first: float = 1.0, cap: float = 300.0):
        self.first, self.cap, self.failures = first, cap, 0

    def next(self) -> float:
        delay = min(self.cap, self.first * 2**self.failures)
        self.failures += 1
        return delay * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        self.failures = 0


def retrying(fn: Callable, *, stop: threading.Event | None = None, log: Callable[[str], None] = print,
             what: str = "object store", first: float = 1.0, cap: float = 300.0, deadline: float | None = None):  # fmt: skip
    """Call fn until it does not raise Unavailable; wait with backoff in between.

    Returns fn's result, or None when `stop` is set or `deadline` (time.monotonic) passes.
    """
    backoff = Backoff(first, cap)
    while True:
        try:
            return fn()
        except Unavailable as e:
            delay = backoff.next()
            if deadline is not None and time.monotonic() + delay > deadline:
                raise
            log(f"{what} unavailable ({e}); retrying in {delay:.1f} s")
            if stop is not None:
                if stop.wait(delay):
                    return None
            else:
                time.sleep(delay)
