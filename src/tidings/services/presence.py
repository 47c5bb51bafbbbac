"""Presence: online / offline / last seen for the people a user has 1:1 chats with.

A user is online while any device of theirs is connected to any node. The bus reports
the cluster-wide transitions (first session anywhere, last session gone, or its node
died) to the hub of the node where they happened, which collects them and publishes
them in batches for the user's contacts, wherever those are connected. A user who hides
their presence is shown to everyone as offline with no last seen.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from tidings.bus.base import PresenceEntry
from tidings.clock import Clock
from tidings.domain.ids import normalize_user_id
from tidings.protocol.errors import TidingsError
from tidings.protocol.frames import PresenceItem
from tidings.store.base import Store

MAX_QUERY = 100
OnlineAmong = Callable[[Sequence[str]], Awaitable[set[str]]]


class Presence:
    """``is_online`` answers for one user on this node; ``online_among`` (the bus's
    ``online``), when given, answers for the cluster and is what queries use."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        is_online: Callable[[str], bool],
        online_among: OnlineAmong | None = None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.is_online = is_online
        self.online_among = online_among

    async def set_hidden(self, uid: str, hidden: bool) -> None:
        await self.store.set_presence_hidden(uid, hidden)

    async def query(self, uid: str, raw_users: list[str]) -> list[PresenceItem]:
        if len(raw_users) > MAX_QUERY:
            raise TidingsError("too_large", f"at most {MAX_QUERY} users per query")
        wanted = {normalize_user_id(u) for u in raw_users}
        contacts = set(await self.store.contacts(uid))
        users = sorted(wanted & contacts)
        info = await self.store.presence_info(users)
        if self.online_among is not None:
            online = await self.online_among(users) if users else set()
        else:
            online = {u for u in users if self.is_online(u)}
        return [self._item(u, info.get(u, (False, 0)), u in online) for u in users]

    async def fan_out(self, changed: dict[str, bool]) -> list[PresenceEntry]:
        """For a batch of users whose online state changed: what their contacts should
        see (hidden users are left out)."""
        out: list[PresenceEntry] = []
        info = await self.store.presence_info(sorted(changed))
        for uid, online in changed.items():
            hidden, last_seen = info.get(uid, (False, 0))
            if hidden:
                continue
            contacts = tuple(await self.store.contacts(uid))
            if contacts:
                item = self._item(uid, (hidden, last_seen), online)
                out.append(PresenceEntry(uid, item.online, item.last_seen, contacts))
        return out

    async def went_offline(self, uid: str) -> None:
        await self.store.set_last_seen(uid, self.clock.now_ms())

    @staticmethod
    def _item(uid: str, info: tuple[bool, int], online: bool) -> PresenceItem:
        hidden, last_seen = info
        if hidden:
            return PresenceItem(uid, False)
        return PresenceItem(uid, online, 0 if online else last_seen)
