-- keepd schema v12: accounts an operator manages (`keepd account`, over the
-- control socket). A disabled account cannot log in; its sessions were ended
-- when it was disabled.
ALTER TABLE keepd.users ADD COLUMN disabled_at timestamptz;

-- keepd_operator (the account commands' group role) sees every account, its
-- sessions and its usage across tenants; it reads no vault, entry, device or
-- backup, and the email is only ever an HMAC.
CREATE POLICY users_operator ON keepd.users TO keepd_operator
    USING (true) WITH CHECK (true);
CREATE POLICY sessions_operator ON keepd.sessions TO keepd_operator
    USING (true) WITH CHECK (true);
CREATE POLICY account_usage_operator ON keepd.account_usage FOR SELECT TO keepd_operator
    USING (true);
