"""Demo accounts: registration and password login with argon2id hashes."""

from __future__ import annotations

import asyncio
import os

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from im_bridge.errors import BadRequest, Conflict, Unauthorized
from im_bridge.ids import check_user_id, no_nul, now_ms, valid_user_id
from im_bridge.models import User
from im_bridge.store import Store, ops

_hasher = PasswordHasher()
# Verified against when the user does not exist, so both paths cost the same time.
_DUMMY_HASH = _hasher.hash("talkbridge-timing-equaliser")


class UserService:
    """Register and authenticate demo accounts (hashing runs off the event loop)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        # Hashes at once: one per core; more would only queue in threads, each attempt
        # holding its memory (argon2id's 64 MiB) meanwhile.
        self._hashing = asyncio.Semaphore(os.cpu_count() or 1)

    async def register(self, user: object, password: object, name: object = None) -> User:
        uid = check_user_id(user)
        if not isinstance(password, str) or not 8 <= len(password) <= 1024:
            raise BadRequest("'password' must be 8 to 1024 characters", field="password")
        if name is not None and (not isinstance(name, str) or len(name) > 128):
            raise BadRequest("'name' must be a string of at most 128 characters", field="name")
        if name is not None:
            no_nul(name, "name")  # stored in a column (see ids.no_nul)
        display = name or uid
        async with self._hashing:
            pw_hash = await asyncio.to_thread(_hasher.hash, password)
        now = now_ms()
        if not await self.store.write(ops.create_user(uid, display, pw_hash, now)):
            raise Conflict("that user id is taken")
        return User(id=uid, name=display, password_hash=pw_hash, created_at=now)

    async def authenticate(self, user: object, password: object) -> User:
        """The user for a correct password; Unauthorized otherwise (same answer for both)."""
        if not isinstance(user, str) or not isinstance(password, str):
            raise BadRequest("'user' and 'password' must be strings")
        # An id no account can have is looked up nowhere (PostgreSQL refuses some, a NUL
        # among them), but still costs a hash: the answer takes the same time.
        record = await self.store.read(ops.get_user(user)) if valid_user_id(user) else None
        stored = record.password_hash if record and record.password_hash else _DUMMY_HASH
        try:
            async with self._hashing:
                await asyncio.to_thread(_hasher.verify, stored, password)
        except (VerificationError, InvalidHashError):
            raise Unauthorized("wrong user or password") from None
        if record is None or not record.password_hash:
            raise Unauthorized("wrong user or password")
        return record

    async def get(self, user: str) -> User | None:
        return await self.store.read(ops.get_user(user))
