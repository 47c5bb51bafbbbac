"""Group rules: roles, who may do what to whom, and who may post. Pure functions over
facts the caller already read (the store's writer, inside the transaction that applies
the change, so the facts cannot move underneath)."""

from __future__ import annotations

import re
import secrets

from tidings.protocol.errors import TidingsError

GROUP_PREFIX = "g:"
MEMBER, ADMIN, OWNER = 0, 1, 2
SERVER = 3  # the server API acts above the owner (but never on the owner)
ROLE_NAMES = {MEMBER: "member", ADMIN: "admin", OWNER: "owner"}
ROLES = {name: role for role, name in ROLE_NAMES.items()}
_GROUP_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

# Operations on a group. Each one that changes something becomes an entry (type
# ``group``, not counted as unread) in the group's sequence.
OPS = frozenset(
    {
        "create",
        "add",
        "remove",
        "leave",
        "role",
        "transfer",
        "mute",
        "mute_all",
        "profile",
    }
)
PROFILE_FIELDS = (
    "name",
    "avatar",
    "intro",
    "announcement",
    "members_can_invite",
    "history_visible",
)
MAX_NAME_BYTES = 128
MAX_AVATAR_BYTES = 1024
MAX_INTRO_BYTES = 2048
MAX_ANNOUNCEMENT_BYTES = 8192
MAX_REMOVE = 100  # users in one remove (the entry lists every one of them)
MAX_ADD = 10_000  # users in one add (bulk adds come in several calls)
EVENT_USERS_SHOWN = 20  # users listed in an add entry's body; `count` says how many in all


def is_group(conv: str) -> bool:
    return conv.startswith(GROUP_PREFIX)


def group_id(raw: object) -> str:
    """The conversation id of a group from an app-given id (``g:`` optional), or a new
    random one for ``None``."""
    if raw is None:
        return GROUP_PREFIX + secrets.token_urlsafe(12)
    if not isinstance(raw, str):
        raise TidingsError("invalid", "group id must be a string")
    bare = raw[len(GROUP_PREFIX) :] if raw.startswith(GROUP_PREFIX) else raw
    if not _GROUP_ID_RE.fullmatch(bare):
        raise TidingsError("invalid", "group id must be 1-64 of A-Z a-z 0-9 . _ -")
    return GROUP_PREFIX + bare


def check_group_conv(conv: str) -> None:
    """A conversation id that names a group, or `not_found`."""
    bare = conv[len(GROUP_PREFIX) :]
    if not is_group(conv) or not _GROUP_ID_RE.fullmatch(bare):
        raise TidingsError("not_found", "no such group")


def role_name(role: int) -> str:
    return ROLE_NAMES.get(role, "member")


def parse_role(name: object) -> int:
    if name not in ("admin", "member"):
        raise TidingsError("invalid", "role must be `admin` or `member` (see `transfer`)")
    assert isinstance(name, str)
    return ROLES[name]


def check_manage(op: str, actor: int | None, *, members_can_invite: bool) -> None:
    """May a member with role ``actor`` (None: not a member) run ``op`` at all?"""
    if actor is None:
        raise TidingsError("forbidden", "not a member of this group")
    if op == "add" and (members_can_invite or actor >= ADMIN):
        return
    if op == "leave":
        if actor == OWNER:
            raise TidingsError("forbidden", "the owner must transfer ownership before leaving")
        return
    if op in ("role", "transfer"):
        if actor < OWNER:
            raise TidingsError("forbidden", f"only the owner may {op}")
        return
    if actor < ADMIN:
        raise TidingsError("forbidden", "only the owner and admins manage the group")


def check_over(op: str, actor: int, target: int | None, same_user: bool) -> None:
    """May ``actor`` apply ``op`` (remove, mute, role, transfer) to a member whose role is
    ``target`` (None: not a member)? Nobody acts on a higher or equal role but the owner,
    and nobody acts on themself this way."""
    if target is None:
        raise TidingsError("not_found", "that user is not a member of this group")
    if target == OWNER:
        raise TidingsError("forbidden", f"the owner cannot be the target of {op}")
    if same_user:
        raise TidingsError("invalid", f"you cannot {op} yourself")
    if target >= actor:
        raise TidingsError(
            "forbidden", f"you cannot {op} a member whose role is {role_name(target)}"
        )


def check_post(
    role: int | None, muted_until: int, muted_all: bool, now_ms: int, *, privileged: bool
) -> None:
    """May a member post now? Non-members never; muted members not until the mute ends;
    during mute-all only the owner and admins. ``privileged`` (the server API) ignores
    mutes, not membership."""
    if role is None:
        raise TidingsError("forbidden", "not a member of this group")
    if privileged:
        return
    if muted_until > now_ms:
        raise TidingsError(
            "muted", "you are muted in this group", retry_after_ms=muted_until - now_ms
        )
    if muted_all and role < ADMIN:
        raise TidingsError("muted", "only admins may post while the group is muted")


def check_text(value: object, what: str, limit: int) -> str:
    if not isinstance(value, str):
        raise TidingsError("invalid", f"{what} must be a string")
    if len(value.encode()) > limit:
        raise TidingsError("too_large", f"{what} over {limit} bytes")
    return value
