"""The admin API's request and response bodies and query strings, as pydantic models.

The request models check a request's shape: JSON types, required fields and
unknown fields, which the service layer cannot see once the body is parsed.
Values are checked once, by the service (:mod:`gateway.manage.service`), as
for the CLI: a constraint the models state (a name's length, a role's
grants) is described in the OpenAPI document, not enforced here. The models
also shape every response, and the document is generated from them, so it
cannot drift from the code.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_type_hints

from pydantic import (
    BaseModel, ConfigDict, Field, ValidationError, ValidatorFunctionWrapHandler, WrapValidator, create_model,
)
from pydantic_core import PydanticCustomError

from ..manage import inputs as fields
from ..models import RequestRecord

MAX_PAGE = 500
DEFAULT_PAGE = 50

Operation = Annotated[str, Field(examples=["deploy", "servers:read", "*:read"])]
Server = Annotated[str, Field(examples=["prod-1", "*", "admin"])]
Cidr = Annotated[str, Field(examples=["10.0.0.0/8", "2001:db8::/32"])]
RateLimit = Annotated[str, Field(examples=["100/minute", "10/second; burst=50"])]
Org = Annotated[str, Field(examples=["default", "acme"])]
User = Annotated[str, Field(examples=["alice"])]
RoleName = Annotated[str, Field(examples=["admin", "deploy-only"])]
# Described, not enforced: the service checks names (with its own message).
KeyName = Annotated[str, Field(examples=["deploy from CI"], json_schema_extra={"minLength": 1, "maxLength": 200})]
Expires = Annotated[str, Field(
    description=f"When the key stops working: {fields.EXPIRY_FORMS}.", examples=["30d", "never", "2027-01-31"],
)]
Timestamp = Annotated[str, Field(json_schema_extra={"format": "date-time"})]


def _one_problem(message: str) -> WrapValidator:
    """A union of scalars refused as one problem of its field.

    Pydantic lists one problem per member of a union, each at the field's
    place tagged with the member's type (``grace.str``, ``grace.float``):
    no field the client sent has that name.
    """
    def validate(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError("duration_type", message) from None

    return WrapValidator(validate)


_DURATION = "Input should be a duration such as 15m or 1h, or a number of seconds"
Grace = Annotated[str | float, _one_problem(_DURATION), Field(
    description="How long the old key keeps working: seconds, or a duration such as 30m or 1h; 0 = revoke now.",
    examples=["1h", 0],
)]


Issuer = Annotated[str, Field(examples=["https://token.actions.githubusercontent.com"])]
Conditions = Annotated[dict[str, str], Field(
    description="Claim name -> pattern; every one must hold. A pattern with * or ? is a glob (every other "
                "character literal), else the claim must equal it. At least one condition on `sub` or "
                "`repository`.",
    examples=[{"repository": "acme/shop", "ref": "refs/heads/main"}], json_schema_extra={"minProperties": 1},
)]
Lifetime = Annotated[str | int, _one_problem(_DURATION), Field(examples=["15m", 900])]


class _Edge(BaseModel):
    # SECURITY: unknown fields are refused, so a typo never silently does less than asked.
    model_config = ConfigDict(extra="forbid", frozen=True)


# -- requests -------------------------------------------------------------
class KeyCreate(_Edge):
    """A new key. It needs a role or at least one operation (agent keys are issued per member)."""

    name: KeyName = Field(description="What the key is for.")
    kind: str | None = Field(None, description="Key kind (sets the prefix); default keys.default_kind.")
    org: Org | None = Field(None, description="The key's org; null = the admin key's own org.")
    user: User = Field("", description="Makes a per-user key; the user must be a member of the org.")
    role: RoleName | None = Field(None, description="Role whose grants bound the key.")
    operations: list[Operation] = Field(default_factory=list, description="The key's own operation grants.")
    servers: list[Server] = Field(default_factory=list, description='Servers the key may act on; empty = ["*"].')
    ip_allowlist: list[Cidr] = Field(default_factory=list, description="Client networks allowed; empty = any.")
    rate_limit: RateLimit | None = Field(None, description="Own rate limit; null = ratelimit.default.")
    expires: Expires = "never"
    canary: bool = Field(False, description="A decoy that never authorizes: any use is answered as an unknown "
                                            "key's and raises key.canary_used. A canary takes no role, "
                                            "operations, servers, ip_allowlist or rate_limit (422).")


class KeyPatch(_Edge):
    """Changes to a key: only the fields given change (null or absent = unchanged, except for
    role and rate_limit, where null removes the setting); lists replace the key's lists."""

    name: KeyName | None = None
    role: RoleName | None = Field(None, description="New role; null removes it (the key must keep operations).")
    operations: list[Operation] | None = None
    servers: list[Server] | None = None
    ip_allowlist: list[Cidr] | None = None
    rate_limit: RateLimit | None = Field(None, description="New rate limit; null = ratelimit.default.")
    expires: Expires | None = None


class KeyRotate(_Edge):
    grace: Grace | None = None


class LeakReportIn(_Edge):
    """Where the key was found; the service keeps both as printable text."""

    url: str = Field(min_length=1, max_length=2048, description="Where the key was found (a commit, a paste ...).")
    source: str | None = Field(None, max_length=64, description="What kind of place that is, e.g. commit.")


class RolePut(_Edge):
    # Described, not enforced: the service refuses a role without grants.
    grants: list[Operation] = Field(description="Operation grants, e.g. deploy, servers:*, *:read.",
                                    json_schema_extra={"minItems": 1})


class MemberPut(_Edge):
    role: RoleName


class TrustPolicyPut(_Edge):
    """A trust policy: which OIDC tokens may be exchanged for a key, and the key they yield.
    It needs a role or at least one operation; PUT replaces the whole policy."""

    issuer: Issuer = Field(description="The issuer's URL, compared exactly with the token's `iss`: https "
                                       "(http only for a loopback host), no query or fragment.")
    audience: str = Field(description="Must be among the token's `aud`.", examples=["https://keygate.example.com"],
                          json_schema_extra={"minLength": 1})
    conditions: Conditions
    org: Org = Field(description="The org of the keys the policy yields.")
    role: RoleName | None = Field(None, description="Role whose grants bound the keys (it must exist).")
    operations: list[Operation] = Field(default_factory=list, description="The keys' own operation grants.")
    servers: list[Server] = Field(default_factory=list, description='Servers the keys may act on; empty = ["*"].')
    ip_allowlist: list[Cidr] = Field(default_factory=list, description="Client networks allowed; empty = any.")
    rate_limit: RateLimit | None = Field(None, description="The keys' rate limit; null = ratelimit.default.")
    lifetime: Lifetime | None = Field(None, description="How long a key lives: seconds, or a duration such as "
                                                        "15m or 1h; 60 s to 1 h; null = 15 minutes.")
    jwks_file: str | None = Field(None, description="An absolute path to the issuer's JWKS (a JSON file with a "
                                                    '"keys" array) on the gateway\'s host, instead of discovery.',
                                  examples=["/etc/keygate/k8s-jwks.json"])


# -- query strings ----------------------------------------------------------
class PageQuery(_Edge):
    limit: int = Field(DEFAULT_PAGE, ge=1, le=MAX_PAGE, description="Most items in one page.")
    cursor: str | None = Field(None, description="next_cursor of the previous page.")


class KeyListQuery(PageQuery):
    org: str | None = None
    user: str | None = None
    status: Literal["active", "idle", "rotating", "expired", "revoked"] | None = Field(
        None, description="idle: unused for keys.idle_after (refused while that is 0); rotating: replaced by a "
        "rotation, still valid until its revoked_at.")
    kind: str | None = None


class SuggestionQuery(_Edge):
    days: int = Field(30, ge=1, le=366, description="Look at the key's allowed requests of this many days.")
    max: int = Field(4, ge=1, le=16, description="Most CIDRs to suggest (IPv4 and IPv6 together).")


class UsageQuery(_Edge):
    hours: int = Field(168, ge=1, le=744, description="The last this many UTC hours, the current one included "
                                                      "(168 = 7 days; at most 744, 31 days).")


class AuditQuery(PageQuery):
    key: str | None = Field(None, description="A key id: events about it or by it, and its request records.")
    org: str | None = Field(None, description="Events about the org's keys, members and trust policies, and the "
                                              "request records of its keys (an admin key without orgs:any "
                                              "always reads its own org's only).")
    action: str | None = Field(None, description="Events only, e.g. key.create, key.revoke, role.set.")
    decision: str | None = Field(None, description="Request records only, e.g. allowed, invalid_token.")
    type: Literal["event", "request"] | None = Field(None, description="Only management events or only requests.")
    since: str | None = Field(None, description="From this time: ISO 8601, or a duration ago (30m, 1h, 7d).")
    until: str | None = Field(None, description="Before this time: ISO 8601, or a duration ago.")


# -- responses --------------------------------------------------------------
class KeyOut(_Edge):
    """A key as users see it (the CLI's --json record): never its secret or hash."""

    id: str
    kind: str
    name: str
    org: str
    user: str
    role: str | None
    operations: list[str]
    servers: list[str]
    ip_allowlist: list[str]
    rate_limit: str | None
    agent: bool
    created_by: str
    created_at: Timestamp
    expires_at: Timestamp | None
    revoked_at: Timestamp | None
    last_used_at: Timestamp | None
    last_used_ip: str | None
    canary: bool = Field(description="A decoy: it never authorizes, and any use of it is an alarm.")
    leaked_at: Timestamp | None = Field(description="When a leak of the key was reported.")
    status: Literal["active", "idle", "rotating", "expired", "revoked"]


class KeyCreated(KeyOut):
    key: str = Field(description="The full key. Shown only in this answer: Keygate keeps only a hash.")


class KeyLeakReported(KeyOut):
    result: Literal["revoked", "flagged", "already_revoked"] = Field(
        description="What the report did: revoked the key, or only flagged it (its kind's on_leak, or a canary), "
        "or nothing more (it was revoked already).")
    first_report: bool = Field(description="Whether this was the key's first leak report (webhook key.leaked sent).")


class KeyRotated(KeyCreated):
    rotated_from: str = Field(description="The old key's id.")
    old_key_revoked_at: Timestamp | None
    old_key: KeyOut


class AgentKeyIssued(KeyCreated):
    revoked_previous: str | None = Field(description="The id of the user's previous agent key, now revoked.")


class SuggestedCidr(_Edge):
    cidr: str = Field(examples=["203.0.113.0/29"])
    requests: int = Field(description="Allowed requests from addresses in it.")
    addresses: int = Field(description="Distinct client addresses in it.")


class AllowlistSuggestionOut(_Edge):
    """The narrowest CIDRs covering the addresses of a key's allowed requests, and how to apply them."""

    key_id: str
    days: int
    max: int
    since: Timestamp
    requests: int = Field(description="Allowed requests counted.")
    addresses: int = Field(description="Distinct client addresses counted.")
    truncated: bool = Field(description="True when only the 10000 most used addresses were counted.")
    cidrs: list[SuggestedCidr] = Field(description="Empty when no allowed request was recorded: then there is "
                                                   "nothing to suggest (see message), not an empty allowlist.")
    command: str | None = Field(description="The `keygate keys update` command that applies the suggestion "
                                            "(it replaces the allowlist); null when there is none.")
    message: str


class UsageBucket(_Edge):
    hour: Timestamp = Field(description="The UTC hour's start.")
    decision: str = Field(examples=["allowed", "rate_limited", "insufficient_scope"])
    requests: int


class UsageOut(_Edge):
    """A key's request records counted per UTC hour and decision: an hour and decision without
    records has no bucket."""

    key_id: str
    hours: int
    since: Timestamp = Field(description="The first hour's start.")
    until: Timestamp = Field(description="The end of the current hour.")
    total: int = Field(description="Requests recorded in the window.")
    by_decision: dict[str, int] = Field(description="Requests in the window per decision.")
    buckets: list[UsageBucket] = Field(description="Oldest hour first; within an hour, by decision.")


class RoleOut(_Edge):
    name: str
    grants: list[str]
    created_at: Timestamp
    updated_at: Timestamp


class MemberOut(_Edge):
    org: str
    user: str
    role: str
    created_at: Timestamp
    updated_at: Timestamp


class TrustPolicyOut(_Edge):
    """A trust policy as the CLI's --json shows it."""

    name: str
    issuer: str
    audience: str
    conditions: dict[str, str]
    org: str
    role: str | None
    operations: list[str]
    servers: list[str]
    ip_allowlist: list[str]
    rate_limit: str | None
    lifetime: int = Field(description="Seconds a key it yields lives.")
    jwks_file: str | None
    created_by: str
    created_at: Timestamp
    updated_at: Timestamp


class EventOut(_Edge):
    """A management action: who did what to which target, and when."""

    type: Literal["event"]
    id: int
    at: Timestamp
    actor: str = Field(description="cli:<user> for the CLI, the admin key's id for the admin API.")
    action: str
    target: str
    details: dict[str, Any]
    org: str | None = Field(description="The org of the key, member or trust policy it is about; null for "
                                        "roles, which every org shares.")
    actor_org: str | None = Field(description="The acting admin key's org; null for the CLI.")


def _request_out() -> type[_Edge]:
    """The audit trail's request entry: the fields of :class:`~gateway.models.RequestRecord`, the one
    request-record type, as the API shows them (``at`` as RFC 3339 text), tagged ``type: request``."""
    fields_: dict[str, Any] = {"type": (Literal["request"], ...)}
    for name, hint in get_type_hints(RequestRecord).items():
        fields_[name] = (Timestamp if name == "at" else hint, ...)
    return create_model(  # type: ignore[call-overload, no-any-return]
        "RequestOut", __base__=_Edge, __doc__='One request through the proxy or the admin API (server "admin").',
        **fields_)


RequestOut = _request_out()


AuditEntryOut = Annotated[EventOut | RequestOut, Field(discriminator="type")]


class _Page(_Edge):
    next_cursor: str | None = Field(description="Pass as cursor for the next page; null on the last page.")


class KeyPage(_Page):
    items: list[KeyOut]


class RolePage(_Page):
    items: list[RoleOut]


class MemberPage(_Page):
    items: list[MemberOut]


class TrustPolicyPage(_Page):
    items: list[TrustPolicyOut]


class AuditPage(_Page):
    items: list[AuditEntryOut]


class OrgList(_Edge):
    items: list[str] = Field(description="Org names, sorted.")


class WhoAmI(_Edge):
    """The admin key making the request, and how far it reaches."""

    id: str
    org: str
    user: str = Field(description="Empty for an org-level key.")
    any_org: bool = Field(description="Granted orgs:any: acts in every org.")
    self_service: bool = Field(description="A per-user or agent key granted keys:self: manages its own "
                                           "per-user keys.")


class FieldError(_Edge):
    field: str
    message: str


class ProblemOut(BaseModel):
    """An error (RFC 9457 problem details)."""

    type: str
    title: str
    status: int
    detail: str
    instance: str
    errors: list[FieldError] | None = Field(None, description="Per-field problems of a 422.")
