"""Relations between users that are not messages: the block list and typing notices."""

from __future__ import annotations

from tidings.bus.base import Bus, TypingNotice
from tidings.clock import Clock
from tidings.domain.groups import check_group_conv, is_group
from tidings.domain.ids import normalize_user_id
from tidings.domain.permissions import member_pair
from tidings.protocol.errors import TidingsError
from tidings.store.base import Store

TYPING_GROUP_MAX = 200  # larger groups show no typing indicators (too many to tell)


class Contacts:
    def __init__(self, store: Store, bus: Bus, clock: Clock) -> None:
        self.store = store
        self.bus = bus
        self.clock = clock

    async def set_block(self, uid: str, raw_other: str, on: bool) -> None:
        """``uid`` blocks (``on``) or unblocks another user; idempotent."""
        other = normalize_user_id(raw_other)
        if other == uid:
            raise TidingsError("invalid", "you cannot block yourself")
        if on and not await self.store.users_exist([other]):
            raise TidingsError("not_found", "no such user")
        await self.store.set_block(uid, other, on, self.clock.now_ms())

    async def blocked(self, uid: str) -> list[str]:
        return await self.store.blocked_by(uid)

    async def typing(self, uid: str, conv: str) -> None:
        """Relay a typing notice to the other member of a 1:1 conversation, unless that
        member blocks ``uid``; in groups of up to TYPING_GROUP_MAX members, to the other
        members. Nothing is stored."""
        if is_group(conv):
            check_group_conv(conv)
            info = await self.store.group_info(conv)
            if info is None or info.member_count > TYPING_GROUP_MAX:
                return
            _, snapshot = await self.store.member_snapshot(conv)
            members = [m for m, _ in snapshot]
            if uid not in members:
                raise TidingsError("forbidden", "not a member of this group")
            others = tuple(m for m in members if m != uid)
            if others:
                self.bus.publish(TypingNotice(conv, uid, others))
            return
        pair = member_pair(uid, conv)
        peer = pair[1] if pair[0] == uid else pair[0]
        if peer == uid or await self.store.is_blocked(peer, uid):
            return
        self.bus.publish(TypingNotice(conv, uid, (peer,)))
