"""GitLab CI ID tokens: who submitted what, verified before anything else is done.

The submit job requests an ID token (`id_tokens:` in ci/.gitlab-ci.yml) with the audience
the watcher is configured with, and uploads it with the submission. The watcher verifies it
with PyJWT against the GitLab instance's JWKS (keys cached, fetched again for an unknown key
id): signature (RS256), issuer, audience, expiry, then GitLab's claims: the project path is
on the operator's allow-list, the token was issued for a branch pipeline of the submitted
branch (and, optionally, a protected one), and its `sha` is the submitted commit.
"""

from __future__ import annotations

import time
import urllib.error
from dataclasses import dataclass

import jwt

from geofm import names
from geofm.store import Unavailable

MAX_TOKEN_BYTES = 16 * 1024


class TokenError(Exception):
    """The token does not authorise this submission (refused; nothing runs)."""


@dataclass(frozen=True)
class Policy:
    jwks_url: str
    issuer: str
    audience: str
    projects: tuple[str, ...]
    require_protected: bool = False
    leeway_s: float = 30.0
    refresh_cooldown_s: float = 30.0  # at most one JWKS fetch per this many seconds for unknown key ids


class _Keys(jwt.PyJWKClient):
    """PyJWKClient whose network failures are outages (requeue), not refusals."""

    def fetch_data(self):
        try:
            return super().fetch_data()
        except jwt.PyJWKClientConnectionError as e:
            raise Unavailable(f"JWKS {self.uri} unreachable ({str(e)[:120]})") from None
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            raise Unavailable(f"JWKS {self.uri} unreachable ({type(e).__name__})") from None


class Verifier:
    def __init__(self, policy: Policy):
        if not policy.projects:
            raise ValueError("no project allowed: give at least one project path")
        self.policy = policy
        self.keys = _Keys(policy.jwks_url, cache_keys=False, lifespan=3600, timeout=10,
                          cooldown_duration=policy.refresh_cooldown_s)  # fmt: skip

    def verify(self, token: object, *, commit: str, branch: str, at: float | None = None) -> dict:
        """The token's claims, when it authorises running `commit` of `branch`; else TokenError.

        Expiry is judged at `at` (default now): the watcher passes the time the store received
        the submission, so a token valid when CI uploaded it stays valid while it is queued,
        and an expired token uploaded again is refused."""
        p = self.policy
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_BYTES:
            raise TokenError("no ID token (submission.json id_token); fix: run the submit job with id_tokens")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as e:
            raise TokenError(f"ID token unreadable ({e})") from None
        if header.get("alg") != "RS256":
            raise TokenError(f"ID token algorithm {names.short(header.get('alg'))} is not RS256")
        try:
            key = self.keys.get_signing_key(header.get("kid"))
        except jwt.PyJWKClientError as e:
            raise TokenError(f"ID token key id {names.short(header.get('kid'))} is not the issuer's ({e})") from None
        try:
            claims = jwt.decode(
                token, key.key, algorithms=["RS256"], audience=p.audience, issuer=p.issuer,
                options={"require": ["exp", "iat", "iss", "aud", "sub"], "verify_exp": False, "verify_iat": False,
                         "verify_nbf": False},
            )  # fmt: skip
        except jwt.PyJWTError as e:
            raise TokenError(f"ID token rejected: {type(e).__name__}: {e}") from None
        at = time.time() if at is None else at
        exp, iat = claims.get("exp"), claims.get("iat")
        if not isinstance(exp, int | float) or not isinstance(iat, int | float):
            raise TokenError("ID token exp/iat are not times")
        if at > exp + p.leeway_s:
            raise TokenError(f"ID token expired {at - exp:.0f} s before the submission was uploaded")
        if iat > at + p.leeway_s or claims.get("nbf", iat) > at + p.leeway_s:
            raise TokenError("ID token issued after the submission was uploaded")
        checks = (
            ("project_path", claims.get("project_path") in p.projects, "a project the watcher serves"),
            ("ref_type", claims.get("ref_type") == "branch", "branch"),
            ("ref", claims.get("ref") == branch, f"the submitted branch {branch!r}"),
            ("sha", claims.get("sha") == commit, f"the submitted commit {commit[:12]}"),
        )
        if p.require_protected:
            checks += (("ref_protected", claims.get("ref_protected") == "true", "a protected branch"),)
        for claim, ok, expected in checks:
            if not ok:
                raise TokenError(f"ID token {claim} {names.short(claims.get(claim))} is not {expected}")
        return claims
