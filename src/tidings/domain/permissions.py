"""Who may read or post where. Pure functions over facts the caller already fetched."""

from __future__ import annotations

from tidings.domain.ids import direct_members
from tidings.protocol.errors import TidingsError


def can_read(user: str, conv: str, is_member: bool) -> bool:
    """Only members read a conversation; a direct conversation's members are its pair."""
    pair = direct_members(conv)
    if pair is not None:
        return user in pair
    return is_member


def can_post(user: str, conv: str, is_member: bool) -> bool:
    return can_read(user, conv, is_member)


def member_pair(user: str, conv: str) -> tuple[str, str]:
    """The pair of a 1:1 conversation ``user`` belongs to, or the documented error:
    `not_found` for an id that is not a 1:1 conversation, `forbidden` for a non-member."""
    pair = direct_members(conv)
    if pair is None:
        raise TidingsError("not_found", "no such conversation")
    if user not in pair:
        raise TidingsError("forbidden", "not a member of this conversation")
    return pair
