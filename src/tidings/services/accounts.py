"""Accounts, devices and tokens.

Tokens are JWTs signed with HS256 only (the algorithm is pinned on verification), bound
to (user, device, platform), with an expiry and a unique id. Revocation is stored: a
revoked token id, or a device's "revoked before" time, and every hello checks both.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import re
import secrets
from typing import Any

import jwt
import msgspec
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from tidings.bus.base import Bus, RevokeEvent
from tidings.clock import Clock
from tidings.domain.ids import normalize_user_id, validate_device
from tidings.protocol.errors import TidingsError
from tidings.store.base import AuthState, Store, UserRecord

ALGORITHM = "HS256"
ISSUER = "tidings"
_B64URL = re.compile(r"[A-Za-z0-9_-]+")
_json_object = msgspec.json.Decoder(dict[str, Any]).decode


def _b64(segment: str) -> bytes:
    """base64url without padding (RFC 7515); ValueError on anything else."""
    if not segment or len(segment) % 4 == 1 or not _B64URL.fullmatch(segment):
        raise ValueError("segment")
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _segment(segment: str) -> dict[str, Any]:
    return _json_object(_b64(segment))


def _b64url(raw: bytes) -> bytes:
    return base64.urlsafe_b64encode(raw).rstrip(b"=")


class _Body(msgspec.Struct):
    """The claims a login reads (the JSON object may hold others: ignored)."""

    iss: str
    sub: str
    jti: str
    exp: int
    dev: str
    plat: str
    ims: int


_claims = msgspec.json.Decoder(_Body).decode
MAX_HEADS_KEPT = 16  # header segments of valid tokens already found to name HS256


MAX_PASSWORD_BYTES = 1024
MIN_PASSWORD_CHARS = 8


class Claims(msgspec.Struct, frozen=True):
    uid: str
    device: str
    platform: str
    jti: str
    issued_ms: int
    expires_ms: int


class IssuedToken(msgspec.Struct, frozen=True):
    token: str
    user: str
    device: str
    platform: str
    expires_ms: int


class Accounts:
    def __init__(
        self,
        store: Store,
        bus: Bus,
        clock: Clock,
        signing_key: str,
        admin_key: str,
        *,
        token_ttl_s: int,
        allow_registration: bool,
    ) -> None:
        self.store = store
        self.bus = bus
        self.clock = clock
        self._key = signing_key.encode()
        self._hs256_heads: set[str] = set()
        self._signer = hmac.new(self._key, digestmod=hashlib.sha256)
        self._admin_key = admin_key.encode()
        self.token_ttl_s = token_ttl_s
        self.allow_registration = allow_registration
        self._hasher = PasswordHasher()
        self._hash_slots = asyncio.Semaphore(2)  # argon2 is memory-hard: bound concurrency

    # ------------------------------------------------------------------ admin

    def check_admin_key(self, presented: str) -> bool:
        return hmac.compare_digest(presented.encode(), self._admin_key)

    # ------------------------------------------------------------------ users

    async def put_user(
        self, raw_uid: str, name: str = "", password: str | None = None
    ) -> tuple[UserRecord, bool]:
        uid = normalize_user_id(raw_uid)
        if len(name.encode()) > 256:
            raise TidingsError("too_large", "name is longer than 256 bytes")
        hashed = await self._hash(password) if password is not None else None
        return await self.store.put_user(uid, raw_uid, name, hashed, self.clock.now_ms())

    async def get_user(self, raw_uid: str) -> UserRecord:
        user = await self.store.get_user(normalize_user_id(raw_uid))
        if user is None:
            raise TidingsError("not_found", "no such user")
        return user

    async def register(
        self, raw_uid: str, password: str, device: str, platform: str, name: str = ""
    ) -> IssuedToken:
        if not self.allow_registration:
            raise TidingsError("forbidden", "self-registration is disabled on this server")
        uid = normalize_user_id(raw_uid)
        validate_device(device, platform)
        if await self.store.get_user(uid) is not None:
            raise TidingsError("conflict", "that user id is taken")
        hashed = await self._hash(password)
        await self.store.create_user(uid, raw_uid, name, hashed, self.clock.now_ms())
        return await self.issue_token(uid, device, platform)

    async def login(self, raw_uid: str, password: str, device: str, platform: str) -> IssuedToken:
        uid = normalize_user_id(raw_uid)
        validate_device(device, platform)
        user = await self.store.get_user(uid)
        if (
            user is None
            or user.password_hash is None
            or not await self._verify(user.password_hash, password)
        ):
            raise TidingsError("auth_failed", "wrong user id or password")
        return await self.issue_token(uid, device, platform)

    async def _hash(self, password: str) -> str:
        if len(password) < MIN_PASSWORD_CHARS:
            raise TidingsError(
                "invalid", f"password must be at least {MIN_PASSWORD_CHARS} characters"
            )
        if len(password.encode()) > MAX_PASSWORD_BYTES:
            raise TidingsError("too_large", "password is too long")
        async with self._hash_slots:
            return await asyncio.get_running_loop().run_in_executor(
                None, self._hasher.hash, password
            )

    async def _verify(self, hashed: str, password: str) -> bool:
        if len(password.encode()) > MAX_PASSWORD_BYTES:
            return False

        def check() -> bool:
            try:
                return self._hasher.verify(hashed, password)
            except (VerificationError, InvalidHashError):
                return False

        async with self._hash_slots:
            return await asyncio.get_running_loop().run_in_executor(None, check)

    # ------------------------------------------------------------------ tokens

    async def issue_token(
        self, raw_uid: str, device: str, platform: str, ttl_s: int | None = None
    ) -> IssuedToken:
        uid = normalize_user_id(raw_uid)
        validate_device(device, platform)
        if await self.store.get_user(uid) is None:
            raise TidingsError("not_found", "no such user")
        ttl = self.token_ttl_s if ttl_s is None else ttl_s
        if not 1 <= ttl <= 366 * 24 * 3600:
            raise TidingsError("invalid", "ttl_s must be between 1 second and 366 days")
        now = self.clock.now_ms()
        await self.store.upsert_device(uid, device, platform, now)
        expires = now + ttl * 1000
        payload = {
            "iss": ISSUER,
            "sub": uid,
            "dev": device,
            "plat": platform,
            "jti": secrets.token_urlsafe(12),
            "ims": now,
            "iat": now // 1000,
            "exp": expires // 1000,
        }
        token = jwt.encode(payload, self._key, algorithm=ALGORITHM)
        return IssuedToken(token, uid, device, platform, (expires // 1000) * 1000)

    def decode(self, token: str) -> Claims:
        """Check signature, algorithm, issuer and expiry (no revocation check).

        HS256 only, checked here directly (a login's hottest step; PyJWT, which issues
        the tokens, took ~100 µs to check one): the header must name HS256, the
        signature must match in constant time (in its canonical base64url form), the
        claims must be a JSON object with `iss` = "tidings", integer `exp` in the future
        and `ims`, and strings `sub`, `jti`, `dev`, `plat`. The header segment of a
        valid token is remembered (every token this server issues has the same one)."""
        if not isinstance(token, str) or len(token) > 4096:
            raise TidingsError("auth_failed", "malformed token")
        parts = token.split(".")
        if len(parts) != 3:
            raise TidingsError("auth_failed", "invalid token")
        head, body, sig = parts
        try:
            known = head in self._hs256_heads
            if not known and _segment(head).get("alg") != ALGORITHM:
                raise ValueError("algorithm")
            signer = self._signer.copy()  # the key's HMAC state, set up once
            signer.update(f"{head}.{body}".encode("ascii"))
            mac = signer.digest()
            # Compared in its canonical base64url form (RFC 7515: no padding).
            if not hmac.compare_digest(_b64url(mac), sig.encode("ascii")):
                raise ValueError("signature")
            if not known and len(self._hs256_heads) < MAX_HEADS_KEPT:
                self._hs256_heads.add(head)  # only a signed header: none filled by others
            data = _claims(_b64(body))
        except (ValueError, UnicodeError, msgspec.DecodeError):
            raise TidingsError("auth_failed", "invalid token") from None
        if data.iss != ISSUER:
            raise TidingsError("auth_failed", "invalid token")
        if data.exp <= self.clock.now_ms() // 1000:
            raise TidingsError("token_expired", "the token has expired")
        try:
            uid = normalize_user_id(data.sub)
        except TidingsError:
            raise TidingsError("auth_failed", "invalid token claims") from None
        return Claims(uid, data.dev, data.plat, data.jti, data.ims, data.exp * 1000)

    async def verify(self, token: str) -> Claims:
        claims = self.unexpired(token)
        self.check_state(claims, await self.store.auth_state(claims.jti, claims.uid, claims.device))
        return claims

    def unexpired(self, token: str) -> Claims:
        """``decode`` and the expiry against this server's clock (no store read)."""
        claims = self.decode(token)
        if claims.expires_ms <= self.clock.now_ms():
            raise TidingsError("token_expired", "the token has expired")
        return claims

    @staticmethod
    def check_state(claims: Claims, state: AuthState) -> None:
        """Refuse a token its user revoked (logout) or issued before its device's kick."""
        if state.token_revoked or claims.issued_ms < state.device_revoked_before_ms:
            raise TidingsError("token_revoked", "the token was revoked")

    async def revoke_token(self, token: str) -> Claims:
        """Logout: the token stops working and its live connections are closed."""
        claims = self.decode(token)
        await self.store.revoke_token(claims.jti, claims.uid, claims.device, claims.expires_ms)
        self.bus.publish(RevokeEvent(claims.uid, claims.device, jti=claims.jti))
        return claims

    async def revoke_device(self, raw_uid: str, device: str) -> None:
        """Kick: every token issued so far for the device stops working; sessions close."""
        uid = normalize_user_id(raw_uid)
        now = self.clock.now_ms() + 1
        await self.store.revoke_device(uid, device, now)
        self.bus.publish(RevokeEvent(uid, device, before_ms=now))
