"""Who may use which app and which MCP tool: roles matched on the session's identity.

A role applies to a session whose username matches ``users`` or whose token claims match
``claims`` (exact, list, ``"*"``, ``^…$`` — the label matching). It grants the apps its
``app_labels`` select and the tools its ``mcp.tools`` list (exact, glob such as ``search_*``,
or ``^…$``); ``deny.mcp.tools`` of any applicable role wins over every allow (Teleport's MCP
RBAC). No roles configured: every verified identity may use every tool of the apps its auth
config matches. Decisions are cached per session and policy, so a call costs a dict lookup.

The ``scope`` claim is matched as a set of space-separated tokens (with ``scp``), so a role can
grant by OAuth scope; a refusal such a role would lift is a step-up (``Access.step_up_scope``):
403 insufficient_scope naming the scopes to authorize again with (issue 12).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from proxyd.auth.jwt import Identity, token_scopes
from proxyd.config import RoleSettings
from proxyd.labels import LabelSelector, ValueMatcher, parse_value_matcher

_CACHE_SIZE = 10_000
SCOPE_CLAIM = "scope"
# MCP tool names (2025-11-25 "Tool names"): 1-128 of these characters. Under restricting roles
# any other name is denied like an unknown tool: a glob's "*" matched a NUL or a newline, and a
# name one reader stops at a control character is another name to the next (issue 10).
TOOL_NAME = re.compile(r"[A-Za-z0-9_\-./]{1,128}")


class ToolMatcher:
    def __init__(self, entries: Iterable[str]) -> None:
        self.exact: set[str] = set()
        self.patterns: list[re.Pattern[str]] = []
        for entry in entries:
            if entry.startswith("^") and entry.endswith("$"):
                self.patterns.append(re.compile(entry))
            elif any(c in entry for c in "*?["):
                self.patterns.append(re.compile(fnmatch.translate(entry)))
            else:
                self.exact.add(entry)

    @property
    def empty(self) -> bool:
        return not self.exact and not self.patterns

    @property
    def everything(self) -> bool:
        return any(p.pattern == fnmatch.translate("*") for p in self.patterns)

    def matches(self, name: str) -> bool:
        return name in self.exact or any(p.fullmatch(name) for p in self.patterns)


def _claim_values(claims: Mapping[str, Any], key: str) -> list[Any]:
    if key == SCOPE_CLAIM:
        # RFC 6749 §3.3: a set of space-delimited tokens, matched one by one, like a list
        # claim (with those of `scp`, the same grants under another name).
        return list(token_scopes(claims))
    value = claims.get(key)
    return value if isinstance(value, list) else [value]


def _claim_matches(selector: LabelSelector, claims: Mapping[str, Any]) -> bool:
    if selector.match_all:
        return True
    if not selector.terms:
        return False
    for key, matcher in selector.terms:
        values = _claim_values(claims, key)
        if not any(_scalar(v) is not None and matcher.matches(_scalar(v) or "") for v in values):
            return False
    return True


def _scalar(value: object) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    return None


@dataclass(frozen=True, slots=True)
class Role:
    name: str
    users: ValueMatcher | None
    claims: LabelSelector | None
    apps: LabelSelector | None
    allow: ToolMatcher
    deny: ToolMatcher

    @classmethod
    def of(cls, settings: RoleSettings) -> Role:
        users = parse_value_matcher(list(settings.users), "users") if settings.users else None
        return cls(
            settings.name,
            users,
            settings.claims,
            settings.app_labels,
            ToolMatcher(settings.allow_tools),
            ToolMatcher(settings.deny_tools),
        )

    def needs(self, claim_names: frozenset[str]) -> bool:
        """This role's claim matchers read one of these claims."""
        if self.claims is None or not claim_names:
            return False
        return any(key in claim_names for key, _ in self.claims.terms)

    def scope_grants(self) -> tuple[str, ...]:
        """The scopes that make this role apply, in the order tried for a step-up: the exact
        values of its ``scope`` matcher (a pattern names no scope a client could ask for)."""
        if self.claims is None or self.claims.match_all:
            return ()
        for key, matcher in self.claims.terms:
            if key == SCOPE_CLAIM:
                # Only what a token can hold (an RFC 6749 scope token) goes into a challenge.
                return tuple(sorted(v for v in matcher.exact if token_scopes({key: v}) == (v,)))
        return ()

    def applies_to(self, identity: Identity) -> bool:
        if self.users is not None and self.users.matches(identity.username):
            return True
        return self.claims is not None and _claim_matches(self.claims, identity.claims)


class Access:
    """What one identity may do on one app."""

    def __init__(
        self,
        app_allowed: bool,
        allow: list[ToolMatcher],
        deny: list[ToolMatcher],
        step_up: Callable[[str | None], tuple[str, ...] | None] | None = None,
    ) -> None:
        self.app_allowed = app_allowed
        self._allow = allow
        self._deny = deny
        self.unrestricted = app_allowed and not deny and any(m.everything for m in allow)
        self._tools: dict[str, bool] = {}
        self._step_up = step_up

    def step_up_scope(self, tool: str | None) -> tuple[str, ...] | None:
        """For a refused app (None) or tool: the scopes to authorize again with when a token
        with one more scope would be allowed (RFC 6750 §3.1 insufficient_scope); else None."""
        return None if self._step_up is None else self._step_up(tool)

    def tool_allowed(self, name: str) -> bool:
        known = self._tools.get(name)
        if known is None:
            known = (
                TOOL_NAME.fullmatch(name) is not None
                and self.app_allowed
                and not any(m.matches(name) for m in self._deny)
                and any(m.matches(name) for m in self._allow)
            )
            if len(self._tools) < 1024:
                self._tools[name] = known
        return known


ALLOW_ALL = Access(True, [ToolMatcher(["*"])], [])


class Policy:
    def __init__(self, roles: Iterable[RoleSettings]) -> None:
        self.roles = tuple(Role.of(r) for r in roles)
        # Roles granting by a named scope: what a step-up (insufficient_scope) can offer.
        self._scope_roles = tuple(r for r in self.roles if r.scope_grants())
        # (session key, app) → (the identity decided for, its access). The identity is kept
        # because a session key can be re-verified into another identity (its app auth config
        # changed, e.g. the username claim) without a new Policy; the decision of the old one
        # must not carry over.
        self._cache: OrderedDict[tuple[str, str], tuple[Identity, Access]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return bool(self.roles)

    @property
    def named_tools(self) -> frozenset[str]:
        """The tool names the roles name exactly (allowed or denied)."""
        return frozenset(name for r in self.roles for m in (r.allow, r.deny) for name in m.exact)

    def access(
        self, session_key: str, identity: Identity, app: str, labels: Mapping[str, str]
    ) -> Access:
        if not self.roles:
            return ALLOW_ALL
        key = (session_key, app)
        cached = self._cache.get(key)
        if cached is not None and (cached[0] is identity or cached[0] == identity):
            return cached[1]
        step_up = None
        if self._scope_roles:

            def step_up(tool: str | None) -> tuple[str, ...] | None:
                return self._step_up(identity, labels, tool)

        access = self._decide(identity, labels, step_up)
        self._cache[key] = (identity, access)
        if len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return access

    def _step_up(
        self, identity: Identity, labels: Mapping[str, str], tool: str | None
    ) -> tuple[str, ...] | None:
        """The first scope (roles in order) whose grant would allow the app, or the tool: the
        token's own scopes plus that one, so authorizing again loses nothing it had."""
        have = token_scopes(identity.claims)
        for role in self._scope_roles:
            if role.apps is None or not role.apps.matches(labels):
                continue
            if tool is not None and not role.allow.matches(tool):
                continue
            for scope in role.scope_grants():
                if scope in have:
                    continue
                granted = (*have, scope)
                claims = {**identity.claims, SCOPE_CLAIM: " ".join(granted)}
                claims.pop("scp", None)  # its scopes are in `granted` already
                wider = self._decide(dataclasses.replace(identity, claims=claims), labels)
                if wider.app_allowed if tool is None else wider.tool_allowed(tool):
                    return granted
        return None

    def _decide(
        self,
        identity: Identity,
        labels: Mapping[str, str],
        step_up: Callable[[str | None], tuple[str, ...] | None] | None = None,
    ) -> Access:
        applicable = [r for r in self.roles if r.applies_to(identity)]
        granting = [r for r in applicable if r.apps is not None and r.apps.matches(labels)]
        # A deny role matching on a claim that was too large to keep is applied anyway: a
        # token with hundreds of groups must not shed its denials (fail closed, never grant).
        denying = [
            r for r in self.roles if r not in applicable and r.needs(identity.dropped_claims)
        ]
        deny = [
            r.deny
            for r in (*applicable, *denying)
            if not r.deny.empty and (r.apps is None or r.apps.matches(labels))
        ]
        return Access(bool(granting), [r.allow for r in granting], deny, step_up)
