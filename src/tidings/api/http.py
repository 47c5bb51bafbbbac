"""HTTP routes. Each parses, authorises, calls one service. One table drives both the
aiohttp router and the OpenAPI document, so they cannot drift apart."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from aiohttp import web

from tidings import __version__
from tidings.api import models as m
from tidings.domain.groups import group_id, is_group, role_name
from tidings.domain.ids import direct_members, normalize_user_id, validate_client_id
from tidings.domain.rooms import check_room
from tidings.protocol.errors import TidingsError
from tidings.services.accounts import Accounts, IssuedToken
from tidings.services.contacts import Contacts
from tidings.services.groups import GroupOp, Groups, info_out, profile_of
from tidings.services.messaging import Messaging, conv_item, to_wire
from tidings.services.rooms import Rooms
from tidings.store.base import GroupResult, UserRecord

log = logging.getLogger(__name__)
MAX_BODY = 256 * 1024
SERVER_DEVICE = "server"

Handler = Callable[[web.Request, Any], Awaitable[tuple[int, Any]]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    auth: str  # "admin", "client" or "none"
    body: type | None = None
    response: type | None = None
    status: int = 200
    query: tuple[tuple[str, str], ...] = ()  # (name, description)
    max_body: int = 256 * 1024


def _error(err: TidingsError) -> web.Response:
    body = m.ErrorResponse(m.ErrorBody(err.code, err.message, err.retryable, err.retry_after_ms))
    headers = {}
    if err.retry_after_ms:
        headers["Retry-After"] = str(max(1, -(-err.retry_after_ms // 1000)))
    return web.Response(
        body=msgspec.json.encode(body),
        status=err.http_status,
        content_type="application/json",
        headers=headers,
    )


def _user_out(u: UserRecord) -> m.UserOut:
    return m.UserOut(u.uid, u.display, u.name, u.created_ms)


def _token_out(t: IssuedToken) -> m.TokenOut:
    return m.TokenOut(t.token, t.user, t.device, t.platform, t.expires_ms)


def _bearer(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value:
        raise TidingsError("unauthenticated", "missing `Authorization: Bearer` header")
    return value.strip()


def _int_query(request: web.Request, name: str, default: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise TidingsError("invalid", f"query parameter {name} must be an integer") from None


class HttpApi:
    def __init__(
        self,
        accounts: Accounts,
        messaging: Messaging,
        contacts: Contacts,
        groups: Groups,
        rooms: Rooms,
        room_online: Callable[[str], int],
        room_stats: Callable[[], tuple[int, int, int, int, int]],
        online: Callable[[], int],
        node_info: Callable[[], dict[str, Any]] = dict,
    ) -> None:
        self.node_info = node_info  # pid, worker id, store and bus kinds (health)
        self.rooms = rooms
        self.room_online = room_online
        self.room_stats = room_stats
        self.accounts = accounts
        self.messaging = messaging
        self.contacts = contacts
        self.groups = groups
        self.online = online
        self.routes = self._routes()

    def _routes(self) -> list[Route]:
        return [
            Route(
                "GET",
                "/healthz",
                self.health,
                "Liveness: 200 once traffic is accepted",
                "none",
                response=m.Health,
            ),
            Route(
                "PUT",
                "/v1/users/{uid}",
                self.put_user,
                "Create or update a user (idempotent; 201 when created)",
                "admin",
                m.PutUser,
                m.UserOut,
            ),
            Route(
                "GET", "/v1/users/{uid}", self.get_user, "Fetch a user", "admin", response=m.UserOut
            ),
            Route(
                "POST",
                "/v1/users/{uid}/tokens",
                self.issue_token,
                "Issue a device token for a user",
                "admin",
                m.TokenRequest,
                m.TokenOut,
            ),
            Route(
                "POST",
                "/v1/users/{uid}/devices/{device}/revoke",
                self.revoke_device,
                "Kick a device: revoke all its tokens and close its connections",
                "admin",
                status=204,
            ),
            Route(
                "POST",
                "/v1/tokens/revoke",
                self.revoke_token,
                "Revoke one token and close its connections",
                "admin",
                m.RevokeToken,
                status=204,
            ),
            Route(
                "GET",
                "/v1/users/{uid}/blocks",
                self.get_blocks,
                "The users this user blocks",
                "admin",
                response=m.BlocksOut,
            ),
            Route(
                "GET",
                "/v1/users/{uid}/conversations",
                self.conversations,
                "A user's conversation list with unread counts and the badge (e.g. for the "
                "badge number of an offline notification)",
                "admin",
                response=m.ConversationsOut,
                query=(("limit", "most conversations (1-200, default 50)"),),
            ),
            Route(
                "PUT",
                "/v1/users/{uid}/blocks/{other}",
                self.put_block,
                "Block a user: their messages to this user are refused (`blocked`)",
                "admin",
                status=204,
            ),
            Route(
                "DELETE",
                "/v1/users/{uid}/blocks/{other}",
                self.delete_block,
                "Unblock a user",
                "admin",
                status=204,
            ),
            Route(
                "POST",
                "/v1/messages",
                self.server_send,
                "Send a message on behalf of a user (idempotent on from+cid), to a user (`to`) "
                "or a group (`conv`; system messages too)",
                "admin",
                m.ServerSend,
                m.SentOut,
            ),
            Route(
                "GET",
                "/v1/conversations/{conv}/messages",
                self.history,
                "Page a conversation's history backwards",
                "admin",
                response=m.PageOut,
                query=(
                    ("before", "entries with seq below this (0: newest)"),
                    ("limit", "page size"),
                ),
            ),
            Route(
                "POST",
                "/v1/groups",
                self.create_group,
                "Create a group (idempotent on owner+key)",
                "admin",
                m.CreateGroup,
                m.GroupOut,
                status=201,
                max_body=2 << 20,
            ),
            Route(
                "GET",
                "/v1/groups/{gid}",
                self.get_group,
                "A group's profile and counts",
                "admin",
                response=m.GroupOut,
            ),
            Route(
                "POST",
                "/v1/groups/{gid}/members",
                self.add_members,
                "Add up to 10,000 members (idempotent on by+key)",
                "admin",
                m.AddMembers,
                m.GroupOut,
                max_body=2 << 20,
            ),
            Route(
                "GET",
                "/v1/groups/{gid}/members",
                self.list_members,
                "Page the member list (ascending user id)",
                "admin",
                response=m.MembersOut,
                query=(
                    ("cursor", "the `next` of the previous page"),
                    ("limit", "page size (1-500, default 100)"),
                ),
            ),
            Route(
                "DELETE",
                "/v1/groups/{gid}/members/{uid}",
                self.remove_member,
                "Remove a member",
                "admin",
                response=m.GroupOut,
                query=(("key", "idempotency key"),),
            ),
            Route(
                "POST",
                "/v1/groups/{gid}/ops",
                self.group_op,
                "Any group operation: add, remove, leave, role, transfer, mute, mute_all, profile",
                "admin",
                m.GroupOpIn,
                m.GroupOut,
                max_body=2 << 20,
            ),
            Route(
                "GET",
                "/v1/groups/{gid}/receipts",
                self.receipts,
                '"Read by N" for entries of a group, and who for small groups',
                "admin",
                response=m.ReceiptsOut,
                query=(("seqs", "comma-separated seqs (at most 100)"),),
            ),
            Route(
                "POST",
                "/v1/rooms/{rid}/messages",
                self.room_post,
                "Post to a live room (kind admin or gift: never sampled away; at most once)",
                "admin",
                m.RoomPostIn,
                status=202,
            ),
            Route(
                "GET",
                "/v1/rooms/{rid}",
                self.room_info,
                "A live room's online count on this node",
                "admin",
                response=m.RoomOut,
            ),
            Route(
                "POST",
                "/v1/auth/register",
                self.register,
                "Self-registration with a password (when enabled)",
                "none",
                m.Register,
                m.TokenOut,
                status=201,
            ),
            Route(
                "POST",
                "/v1/auth/login",
                self.login,
                "Password login for a device",
                "none",
                m.Login,
                m.TokenOut,
            ),
            Route(
                "POST",
                "/v1/auth/logout",
                self.logout,
                "Revoke the presented device token",
                "client",
                status=204,
            ),
        ]

    def install(self, app: web.Application) -> None:
        for route in self.routes:
            app.router.add_route(route.method, route.path, self._wrap(route))

    def _wrap(self, route: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        decoder: Any = msgspec.json.Decoder(route.body) if route.body is not None else None

        async def handler(request: web.Request) -> web.StreamResponse:
            try:
                if route.auth == "admin" and not self.accounts.check_admin_key(_bearer(request)):
                    raise TidingsError("auth_failed", "wrong admin key")
                body: Any = None
                if decoder is not None:
                    raw = await request.read()
                    if len(raw) > route.max_body:
                        raise TidingsError("too_large", "request body too large")
                    try:
                        body = decoder.decode(raw)
                    except msgspec.ValidationError as exc:
                        raise TidingsError("invalid", str(exc)) from None
                    except msgspec.DecodeError:
                        raise TidingsError("bad_frame", "request body is not valid JSON") from None
                status, out = await route.handler(request, body)
            except TidingsError as err:
                return _error(err)
            except web.HTTPException:
                raise
            except Exception:
                log.exception("%s %s failed", route.method, route.path)
                return _error(TidingsError("internal", "internal error"))
            if out is None:
                return web.Response(status=status)
            return web.Response(
                body=msgspec.json.encode(out), status=status, content_type="application/json"
            )

        return handler

    # ------------------------------------------------------------------ handlers

    async def health(self, request: web.Request, _: None) -> tuple[int, m.Health]:
        pending = self.messaging.store.backlog()
        return 200, m.Health(
            "ok", __version__, self.online(), pending, *self.room_stats(), **self.node_info()
        )

    async def put_user(self, request: web.Request, body: m.PutUser) -> tuple[int, m.UserOut]:
        user, created = await self.accounts.put_user(
            request.match_info["uid"], body.name, body.password
        )
        return (201 if created else 200), _user_out(user)

    async def get_user(self, request: web.Request, _: None) -> tuple[int, m.UserOut]:
        return 200, _user_out(await self.accounts.get_user(request.match_info["uid"]))

    async def issue_token(
        self, request: web.Request, body: m.TokenRequest
    ) -> tuple[int, m.TokenOut]:
        token = await self.accounts.issue_token(
            request.match_info["uid"], body.device, body.platform, body.ttl_s
        )
        return 200, _token_out(token)

    async def revoke_device(self, request: web.Request, _: None) -> tuple[int, None]:
        await self.accounts.get_user(request.match_info["uid"])
        await self.accounts.revoke_device(request.match_info["uid"], request.match_info["device"])
        return 204, None

    async def revoke_token(self, request: web.Request, body: m.RevokeToken) -> tuple[int, None]:
        await self.accounts.revoke_token(body.token)
        return 204, None

    async def get_blocks(self, request: web.Request, _: None) -> tuple[int, m.BlocksOut]:
        user = await self.accounts.get_user(request.match_info["uid"])
        return 200, m.BlocksOut(await self.contacts.blocked(user.uid))

    async def conversations(self, request: web.Request, _: None) -> tuple[int, m.ConversationsOut]:
        user = await self.accounts.get_user(request.match_info["uid"])
        limit = _int_query(request, "limit", 50)
        rows, badge = await self.messaging.conversation_list(user.uid, limit)
        return 200, m.ConversationsOut([conv_item(user.uid, r) for r in rows], badge)

    async def put_block(self, request: web.Request, _: None) -> tuple[int, None]:
        user = await self.accounts.get_user(request.match_info["uid"])
        await self.contacts.set_block(user.uid, request.match_info["other"], True)
        return 204, None

    async def delete_block(self, request: web.Request, _: None) -> tuple[int, None]:
        user = await self.accounts.get_user(request.match_info["uid"])
        await self.contacts.set_block(user.uid, request.match_info["other"], False)
        return 204, None

    async def register(self, request: web.Request, body: m.Register) -> tuple[int, m.TokenOut]:
        token = await self.accounts.register(
            body.user, body.password, body.device, body.platform, body.name
        )
        return 201, _token_out(token)

    async def login(self, request: web.Request, body: m.Login) -> tuple[int, m.TokenOut]:
        token = await self.accounts.login(body.user, body.password, body.device, body.platform)
        return 200, _token_out(token)

    async def logout(self, request: web.Request, _: None) -> tuple[int, None]:
        token = _bearer(request)
        await self.accounts.verify(token)
        await self.accounts.revoke_token(token)
        return 204, None

    async def server_send(self, request: web.Request, body: m.ServerSend) -> tuple[int, m.SentOut]:
        sender = normalize_user_id(body.sender)
        await self.accounts.get_user(sender)
        validate_client_id(body.cid)
        mtype = body.type
        if mtype not in ("system", "text", "custom", "image", "file", "voice", "video", "location"):
            raise TidingsError("invalid", f"unknown message type {mtype[:32]!r}")
        if body.conv is not None and is_group(body.conv):
            body = msgspec.structs.replace(body, conv=group_id(body.conv))
        conv, members = self.messaging.target(sender, body.to, body.conv)
        msg = self.messaging.build(
            sender, SERVER_DEVICE, conv, members, body.cid, mtype, body.body, body.flags
        )
        res = await self.messaging.submit(
            msgspec.structs.replace(msg, reads=False, privileged=True), from_device=False
        )
        r = res.record
        return 200, m.SentOut(r.conv, r.seq, str(r.mid), r.ts, r.cid, res.dup)

    async def history(self, request: web.Request, _: None) -> tuple[int, m.PageOut]:
        conv = request.match_info["conv"]
        if is_group(conv):
            conv = group_id(conv)
            reader = (await self.groups.info(conv)).owner
        else:
            pair = direct_members(conv)
            if pair is None:
                raise TidingsError("not_found", "no such conversation")
            reader = pair[0]
        before = _int_query(request, "before", 0)
        limit = _int_query(request, "limit", 50)
        rows, more = await self.messaging.history(reader, conv, before, limit, as_reader=False)
        return 200, m.PageOut(conv, [to_wire(r) for r in rows], more)

    # ------------------------------------------------------------------ groups

    @staticmethod
    def _group_out(res: GroupResult) -> m.GroupOut:
        rec = res.record
        return m.GroupOut(
            info_out(res.info),
            0 if rec is None else rec.seq,
            "" if rec is None else str(rec.mid),
            res.dup,
        )

    async def _server_op(self, gid: str, by: str | None, req: GroupOp) -> GroupResult:
        """Run ``req`` on group ``gid`` as ``by`` (default: the owner), with the server
        API's rights."""
        conv = group_id(gid)
        actor = normalize_user_id(by) if by else (await self.groups.info(conv)).owner
        req = msgspec.structs.replace(req, conv=conv)
        return await self.groups.change(self.groups.build(actor, SERVER_DEVICE, req, True))

    async def create_group(
        self, request: web.Request, body: m.CreateGroup
    ) -> tuple[int, m.GroupOut]:
        owner = normalize_user_id(body.owner)
        req = GroupOp(
            "create",
            body.id,
            body.members,
            fields=profile_of(body),
            cid=body.key,
            max_members=body.max_members,
        )
        res = await self.groups.change(self.groups.build(owner, SERVER_DEVICE, req, True))
        return (200 if res.dup else 201), self._group_out(res)

    async def get_group(self, request: web.Request, _: None) -> tuple[int, m.GroupOut]:
        info = await self.groups.info(group_id(request.match_info["gid"]))
        return 200, m.GroupOut(info_out(info), 0, "", False)

    async def add_members(self, request: web.Request, body: m.AddMembers) -> tuple[int, m.GroupOut]:
        req = GroupOp("add", users=body.users, cid=body.key)
        return 200, self._group_out(await self._server_op(request.match_info["gid"], body.by, req))

    async def remove_member(self, request: web.Request, _: None) -> tuple[int, m.GroupOut]:
        key = request.query.get("key")
        req = GroupOp("remove", users=[request.match_info["uid"]], cid=key)
        res = await self._server_op(request.match_info["gid"], request.query.get("by"), req)
        return 200, self._group_out(res)

    async def group_op(self, request: web.Request, body: m.GroupOpIn) -> tuple[int, m.GroupOut]:
        if body.op in ("create", "info"):
            raise TidingsError("invalid", f"use the /v1/groups routes to {body.op} a group")
        req = GroupOp(
            body.op,
            None,
            body.users,
            body.role,
            body.duration_ms,
            body.on,
            profile_of(body),
            body.key,
        )
        return 200, self._group_out(await self._server_op(request.match_info["gid"], body.by, req))

    async def list_members(self, request: web.Request, _: None) -> tuple[int, m.MembersOut]:
        info = await self.groups.info(group_id(request.match_info["gid"]))
        rows, nxt = await self.groups.members(
            info.conv, request.query.get("cursor", ""), _int_query(request, "limit", 100)
        )
        items = [m.MemberItem(r.uid, role_name(r.role), r.joined_ms, r.muted_until) for r in rows]
        return 200, m.MembersOut(items, nxt)

    async def receipts(self, request: web.Request, _: None) -> tuple[int, m.ReceiptsOut]:
        info = await self.groups.info(group_id(request.match_info["gid"]))
        raw = request.query.get("seqs", "")
        try:
            seqs = [int(x) for x in raw.split(",") if x.strip()]
        except ValueError:
            raise TidingsError("invalid", "seqs must be comma-separated integers") from None
        counts = await self.groups.receipts(info.conv, seqs, info.member_count)
        return 200, m.ReceiptsOut([m.ReceiptItem(c.seq, c.count, c.readers) for c in counts])

    # ------------------------------------------------------------------ live rooms

    @staticmethod
    def _room(raw: str) -> str:
        return check_room(raw if raw.startswith("r:") else "r:" + raw)

    async def room_post(self, request: web.Request, body: m.RoomPostIn) -> tuple[int, None]:
        sender = normalize_user_id(body.sender) if body.sender else "server"
        room = self._room(request.match_info["rid"])
        self.rooms.post(sender, room, body.kind, body.body, server=True)
        return 202, None

    async def room_info(self, request: web.Request, _: None) -> tuple[int, m.RoomOut]:
        room = self._room(request.match_info["rid"])
        return 200, m.RoomOut(room, self.room_online(room))
