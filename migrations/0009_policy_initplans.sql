-- keepd schema v9: the tenant policies read the tenant once per statement.
-- Written as a scalar subquery, the tenant expression becomes an InitPlan
-- that Postgres evaluates once per statement, instead of calling
-- current_setting and casting to uuid for every row it checks (a page of
-- a pull checks 101). The policies mean exactly what they meant.
ALTER POLICY users_tenant ON keepd.users
    USING (id = (SELECT nullif(current_setting('keepd.user_id', true), '')::uuid)
           OR email_hmac = (SELECT decode(coalesce(current_setting('keepd.email_hmac', true), ''), 'hex')))
    WITH CHECK (id = (SELECT nullif(current_setting('keepd.user_id', true), '')::uuid));
ALTER POLICY sessions_tenant ON keepd.sessions
    USING (user_id = (SELECT nullif(current_setting('keepd.user_id', true), '')::uuid))
    WITH CHECK (user_id = (SELECT nullif(current_setting('keepd.user_id', true), '')::uuid));
ALTER POLICY vaults_tenant ON keepd.vaults
    USING (user_id = (SELECT nullif(current_setting('keepd.user_id', true), '')::uuid))
    WITH CHECK (user_id = (SELECT nullif(current_setting('keepd.user_id', true), '')::uuid));
ALTER POLICY vault_keys_tenant ON keepd.vault_keys
    USING (user_id = (SELECT nullif(current_setting('keepd.user_id', true), '')::uuid))
    WITH CHECK (user_id = (SELECT nullif(current_setting('keepd.user_id', true), '')::uuid));
ALTER POLICY sync_logs_tenant ON keepd.sync_logs
    USING (user_id = (SELECT nullif(current_setting('keepd.user_id', true), '')::uuid))
    WITH CHECK (user_id = (SELECT nullif(current_setting('keepd.user_id', true), '')::uuid));
ALTER POLICY push_requests_tenant ON keepd.push_requests
    USING (user_id = (SELECT nullif(current_setting('keepd.user_id', true), '')::uuid))
    WITH CHECK (user_id = (SELECT nullif(current_setting('keepd.user_id', true), '')::uuid));
ALTER POLICY devices_tenant ON keepd.devices
    USING (user_id = (SELECT nullif(current_setting('keepd.user_id', true), '')::uuid))
    WITH CHECK (user_id = (SELECT nullif(current_setting('keepd.user_id', true), '')::uuid));
ALTER POLICY backups_tenant ON keepd.backups
    USING (user_id = (SELECT nullif(current_setting('keepd.user_id', true), '')::uuid))
    WITH CHECK (user_id = (SELECT nullif(current_setting('keepd.user_id', true), '')::uuid));
ALTER POLICY account_usage_tenant ON keepd.account_usage
    USING (user_id = (SELECT nullif(current_setting('keepd.user_id', true), '')::uuid))
    WITH CHECK (user_id = (SELECT nullif(current_setting('keepd.user_id', true), '')::uuid));
