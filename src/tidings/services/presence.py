"""Presence: online / offline / last seen for the people a user has 1:1 chats with.

Online state is what this process's hub holds (a user is online while any device of
theirs is connected here); changes are collected and pushed to contacts in batches.
A user who hides their presence is shown to everyone as offline with no last seen.
"""

from __future__ import annotations

from collections.abc import Callable

from tidings.clock import Clock
from tidings.domain.ids import normalize_user_id
from tidings.protocol.errors import TidingsError
from tidings.protocol.frames import PresenceItem
from tidings.store.base import Store

MAX_QUERY = 100


class Presence:
    def __init__(self, store: Store, clock: Clock, is_online: Callable[[str], bool]) -> None:
        self.store = store
        self.clock = clock
        self.is_online = is_online

    async def set_hidden(self, uid: str, hidden: bool) -> None:
        await self.store.set_presence_hidden(uid, hidden)

    async def query(self, uid: str, raw_users: list[str]) -> list[PresenceItem]:
        if len(raw_users) > MAX_QUERY:
            raise TidingsError("too_large", f"at most {MAX_QUERY} users per query")
        wanted = {normalize_user_id(u) for u in raw_users}
        contacts = set(await self.store.contacts(uid))
        users = sorted(wanted & contacts)
        info = await self.store.presence_info(users)
        return [self._item(u, info.get(u, (False, 0)), self.is_online(u)) for u in users]

    async def fan_out(self, changed: dict[str, bool]) -> dict[str, list[PresenceItem]]:
        """For a batch of users whose online state changed: what each contact should see."""
        out: dict[str, list[PresenceItem]] = {}
        info = await self.store.presence_info(sorted(changed))
        for uid, online in changed.items():
            hidden, last_seen = info.get(uid, (False, 0))
            if hidden:
                continue
            item = self._item(uid, (hidden, last_seen), online)
            for contact in await self.store.contacts(uid):
                out.setdefault(contact, []).append(item)
        return out

    async def went_offline(self, uid: str) -> None:
        await self.store.set_last_seen(uid, self.clock.now_ms())

    @staticmethod
    def _item(uid: str, info: tuple[bool, int], online: bool) -> PresenceItem:
        hidden, last_seen = info
        if hidden:
            return PresenceItem(uid, False)
        return PresenceItem(uid, online, 0 if online else last_seen)
