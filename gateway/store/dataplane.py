"""The data plane's PostgreSQL role, ``keygate_dataplane``: what ``keygate serve`` needs, nothing more.

A sidecar or replica reads keys and what authorizes them, follows the
change feed, and writes request records and last-used times (and a canary
key's alarm: its audit event and webhook row, insert only) -- never a key,
a role, a member or a setting, and never changes or deletes an audit event. Giving it only that means a
compromised data plane can neither mint a key nor cover its tracks.

The role is not a migration step: a role belongs to the whole PostgreSQL
server and creating one needs CREATEROLE, which the schema owner may lack
(managed databases), and its grants must follow every later migration.
``keygate migrate`` therefore sets them after migrating, every time, to
exactly :func:`grants` (revoking first, so a narrower future version takes
rights away too); when it may not create the role it says so, and
``keygate migrate --print-dataplane-role`` prints the SQL for whoever may.
Log-in users are members: ``CREATE ROLE sidecar LOGIN PASSWORD '...' IN ROLE
keygate_dataplane``.
"""

from __future__ import annotations

ROLE = "keygate_dataplane"

# What the data plane reads: a key and its role or membership, trust policies (the discovery endpoint
# lists issuers), the change feed, the stored pepper, and the schema version (serve checks it).
READS = ("keys", "roles", "members", "trust_policies", "changes", "meta", "schema_migrations")
# What it writes: one row per request, and a key's last use -- only those two columns of keys -- and
# the alarm of a canary key's use (issue 17), which only the data plane sees: its audit event and its
# webhook's outbox row. Insert only: it can neither change nor delete history, nor deliver webhooks.
INSERTS = ("request_records", "audit_events", "webhook_outbox")
UPDATED_COLUMNS = {"keys": ("last_used_at", "last_used_ip")}


def quote(identifier: str) -> str:
    """An SQL identifier, quoted."""
    return '"' + identifier.replace('"', '""') + '"'


def create_role() -> str:
    return f"CREATE ROLE {ROLE} NOLOGIN"


def grants(schema: str) -> list[str]:
    """The statements that leave the role with exactly the data plane's rights in ``schema``."""
    s = quote(schema)
    statements = [
        f"REVOKE ALL ON ALL TABLES IN SCHEMA {s} FROM {ROLE}",
        f"REVOKE ALL ON ALL SEQUENCES IN SCHEMA {s} FROM {ROLE}",
        f"GRANT USAGE ON SCHEMA {s} TO {ROLE}",
        f"GRANT SELECT ON {', '.join(f'{s}.{t}' for t in READS)} TO {ROLE}",
        f"GRANT INSERT ON {', '.join(f'{s}.{t}' for t in INSERTS)} TO {ROLE}",
    ]
    for table, columns in UPDATED_COLUMNS.items():
        statements.append(f"GRANT UPDATE ({', '.join(columns)}) ON {s}.{table} TO {ROLE}")
    return statements


def script(schema: str = "public") -> str:
    """The whole SQL, for ``keygate migrate --print-dataplane-role``."""
    lines = [
        f"-- Keygate's data-plane role ({ROLE}); run as a user with CREATEROLE, in Keygate's database,",
        f"-- after `keygate migrate`. Tables in schema {schema}; change it if Keygate's tables live elsewhere.",
        "-- Then one log-in user per data plane: CREATE ROLE sidecar LOGIN PASSWORD '...' IN ROLE "
        f"{ROLE};",
        f"{create_role()};",
        *(f"{statement};" for statement in grants(schema)),
    ]
    return "\n".join(lines) + "\n"
