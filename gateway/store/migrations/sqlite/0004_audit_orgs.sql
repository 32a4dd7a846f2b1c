-- Each audit event names the org it is about (a key's, a member's or a trust
-- policy's org; NULL for what every org shares, as roles) and the org of the
-- admin key that acted (NULL at the command line), so an org admin reads its
-- own org's trail only.
ALTER TABLE audit_events ADD COLUMN org TEXT;
ALTER TABLE audit_events ADD COLUMN actor_org TEXT;
-- Events written before: the org of the key, member or trust policy they name.
UPDATE audit_events SET org = (SELECT keys.org FROM keys WHERE keys.id = audit_events.target)
    WHERE action LIKE 'key.%';
UPDATE audit_events SET org = substr(target, 1, instr(target, '/') - 1)
    WHERE action LIKE 'member.%' AND instr(target, '/') > 0;
UPDATE audit_events SET org = (SELECT trust_policies.org FROM trust_policies WHERE trust_policies.name = audit_events.target)
    WHERE action LIKE 'trust.%';
UPDATE audit_events SET actor_org = (SELECT keys.org FROM keys WHERE keys.id = audit_events.actor);
CREATE INDEX audit_events_by_org ON audit_events (org, at);
