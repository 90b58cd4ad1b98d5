//! `RoleAwarePool`: connections as the node's current login role, handed
//! out only as role-scoped transactions.
//!
//! Every unit of work is one transaction that starts with one parameterised
//! statement setting the group role and the tenant for that transaction
//! only (`set_config(..., true)`); both vanish at commit or rollback. There
//! is no way to run SQL outside such a transaction.
//!
//! Credentials rotate underneath: new connections log in with whatever
//! credential is current, and a connection of an older version is discarded
//! when it comes back instead of being reused.

use std::collections::HashMap;
use std::time::Duration;

use deadpool::managed::{self, Metrics, RecycleError, RecycleResult};
use tokio::sync::watch;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row, Statement};

use crate::secrets::values::SecretString;

/// The login credential new connections use.
#[derive(Clone, Debug)]
pub struct LoginCredential {
    pub role: String,
    /// TLS with this role's client certificate (TCP mode), or none.
    pub tls: super::tls::Tls,
    pub version: u32,
    pub password: SecretString,
}

pub use super::GroupRole;

/// Who a unit of work runs for: the group role and, for tenant data, the
/// user whose rows it may see. A login lookup instead names the email HMAC
/// it already knows, which makes that one user row visible.
#[derive(Debug, Clone)]
pub struct OperationContext {
    pub role: GroupRole,
    pub user_id: Option<String>,
    pub email_hmac: Option<String>,
}

impl OperationContext {
    /// Work for no tenant: tenant tables show no rows.
    pub fn system(role: GroupRole) -> OperationContext {
        OperationContext {
            role,
            user_id: None,
            email_hmac: None,
        }
    }

    /// Work on behalf of one user.
    pub fn user(role: GroupRole, user_id: impl Into<String>) -> OperationContext {
        OperationContext {
            role,
            user_id: Some(user_id.into()),
            email_hmac: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("no database connection available within {0:?}")]
    Timeout(Duration),
    #[error("cannot connect to Postgres: {0}")]
    Connect(String),
    #[error("{}", super::describe_error(.0))]
    Sql(#[from] tokio_postgres::Error),
}

/// Pool size and timeouts.
#[derive(Debug, Clone, Copy)]
pub struct PoolSettings {
    pub max_size: usize,
    pub acquire_timeout: Duration,
}

impl PoolSettings {
    /// From `database.pool`.
    pub fn of(config: &crate::config::Config) -> PoolSettings {
        PoolSettings {
            max_size: config.database.pool.max_size as usize,
            acquire_timeout: config.database.pool.acquire_timeout.get(),
        }
    }
}

pub struct Connection {
    client: Client,
    /// Statements prepared on this connection, by the role they run as and
    /// their SQL: each is parsed and planned once per connection and role.
    /// Per role, because Postgres re-plans a statement that depends on
    /// row-level security whenever it runs as another role than the one
    /// its plan was made for.
    statements: std::sync::Mutex<HashMap<GroupRole, HashMap<String, Statement>>>,
    version: u32,
    /// Given back inside a transaction (an error path): roll back on recycle.
    in_transaction: bool,
    /// The server refused a write as read-only: it is a standby now (a
    /// failover happened without closing this connection); never reused,
    /// so the next connection finds the writable primary.
    read_only: std::sync::atomic::AtomicBool,
}

pub struct Manager {
    base: tokio_postgres::Config,
    credential: watch::Receiver<LoginCredential>,
}

impl managed::Manager for Manager {
    type Type = Connection;
    type Error = tokio_postgres::Error;

    async fn create(&self) -> Result<Connection, tokio_postgres::Error> {
        let credential = self.credential.borrow().clone();
        let mut config = self.base.clone();
        config
            .user(&credential.role)
            .password(credential.password.expose())
            // Each statement is planned once per connection and role: by
            // default Postgres re-plans a prepared statement with the
            // parameters of each execution for as long as that looks
            // cheaper, and for keepd's statements (key lookups, a bounded
            // index range) it always does, which cost about a quarter of
            // the database's time under the pull benchmark.
            .options("-c plan_cache_mode=force_generic_plan");
        let client = super::tls::connect(&config, &credential.tls).await?;
        Ok(Connection {
            client,
            statements: std::sync::Mutex::new(HashMap::new()),
            version: credential.version,
            in_transaction: false,
            read_only: Default::default(),
        })
    }

    async fn recycle(
        &self,
        conn: &mut Connection,
        _: &Metrics,
    ) -> RecycleResult<tokio_postgres::Error> {
        if conn.client.is_closed() {
            return Err(RecycleError::message("connection closed"));
        }
        if conn.read_only.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(RecycleError::message("the server became read-only"));
        }
        if conn.version != self.credential.borrow().version {
            return Err(RecycleError::message("login credential rotated"));
        }
        if conn.in_transaction {
            conn.client.batch_execute("ROLLBACK").await?;
            conn.in_transaction = false;
        }
        Ok(())
    }
}

/// The pool. Cloning shares it.
#[derive(Clone)]
pub struct RoleAwarePool {
    pool: managed::Pool<Manager>,
    credential: std::sync::Arc<watch::Sender<LoginCredential>>,
    acquire_timeout: Duration,
}

impl RoleAwarePool {
    /// `base` names the server and database; the login comes from `credential`.
    pub fn new(
        base: tokio_postgres::Config,
        credential: LoginCredential,
        settings: PoolSettings,
    ) -> RoleAwarePool {
        let (sender, receiver) = watch::channel(credential);
        let manager = Manager {
            base,
            credential: receiver,
        };
        let pool = managed::Pool::builder(manager)
            .max_size(settings.max_size)
            .wait_timeout(Some(settings.acquire_timeout))
            .create_timeout(Some(settings.acquire_timeout))
            .recycle_timeout(Some(settings.acquire_timeout))
            .runtime(deadpool::Runtime::Tokio1)
            .build()
            .expect("timeouts are set together with the runtime");
        RoleAwarePool {
            pool,
            credential: std::sync::Arc::new(sender),
            acquire_timeout: settings.acquire_timeout,
        }
    }

    /// New connections use `credential` from now on (rotation step 4);
    /// idle connections of older versions are closed.
    pub fn switch_credential(&self, credential: LoginCredential) {
        let version = credential.version;
        self.credential.send_replace(credential);
        self.pool.retain(|conn, _| conn.version == version);
    }

    /// Pool occupancy: (max, open, idle, waiting).
    pub fn occupancy(&self) -> (usize, usize, usize, usize) {
        let status = self.pool.status();
        (
            status.max_size,
            status.size,
            status.available,
            status.waiting,
        )
    }

    /// The login role new connections use.
    pub fn credential_role(&self) -> String {
        self.credential.borrow().role.clone()
    }

    pub fn credential_version(&self) -> u32 {
        self.credential.borrow().version
    }

    async fn connection(&self) -> Result<managed::Object<Manager>, PoolError> {
        self.pool.get().await.map_err(|e| match e {
            managed::PoolError::Timeout(_) => PoolError::Timeout(self.acquire_timeout),
            managed::PoolError::Backend(e) => PoolError::Sql(e),
            other => PoolError::Connect(other.to_string()),
        })
    }

    /// Opens a transaction as `ctx.role` for `ctx.user_id`.
    pub async fn begin(&self, ctx: &OperationContext) -> Result<ScopedTransaction, PoolError> {
        Ok(self.open_scoped(ctx, None, &[]).await?.0)
    }

    /// Opens a transaction as `ctx.role` for `ctx.user_id` and runs `first`
    /// in it: BEGIN, the scope and `first` are sent together (one round
    /// trip) and Postgres runs them in that order.
    pub async fn begin_with(
        &self,
        ctx: &OperationContext,
        first: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<(ScopedTransaction, Vec<Row>), PoolError> {
        self.open_scoped(ctx, Some(first), params).await
    }

    /// Runs `sql` as `ctx` in a transaction of its own committed without
    /// waiting for the disk (`synchronous_commit` off for it alone): its
    /// locks go at once, not after an fsync, and a crash may lose it with
    /// nothing committed after it (the WAL is flushed in order, so a later
    /// synchronous commit makes it durable first). For a write a later
    /// synchronous commit depends on, or whose loss is harmless. One round
    /// trip once `sql` is prepared on the connection (see `run`). When
    /// `sql` fails, Postgres ends the transaction with a rollback and its
    /// error is returned.
    pub async fn run_unflushed(
        &self,
        ctx: &OperationContext,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, PoolError> {
        let mut rows = self.run(ctx, Commit::Unflushed, &[(sql, params)]).await?;
        Ok(rows.pop().unwrap_or_default())
    }

    /// Runs `statements` as `ctx`, in order, in a transaction of their own
    /// (for reads: a statement's rows are only returned, so the first may
    /// be a check the caller reads the rest by). One round trip once they
    /// are prepared on the connection (see `run`). Each statement's rows;
    /// the first error if one failed (Postgres runs none after it; a
    /// parameter of the wrong type, refused before it is sent, fails only
    /// its own statement).
    pub async fn read(
        &self,
        ctx: &OperationContext,
        statements: &[(&str, &[&(dyn ToSql + Sync)])],
    ) -> Result<Vec<Vec<Row>>, PoolError> {
        self.run(ctx, Commit::Flushed, statements).await
    }

    async fn run(
        &self,
        ctx: &OperationContext,
        commit: Commit,
        statements: &[(&str, &[&(dyn ToSql + Sync)])],
    ) -> Result<Vec<Vec<Row>>, PoolError> {
        // Held as a transaction: dropped mid-way (a cancelled request), it
        // is rolled back at once, as `ScopedTransaction`'s drop does.
        let mut tx = ScopedTransaction {
            conn: Some(self.connection().await?),
            role: ctx.role,
        };
        let conn = tx.conn.as_mut().expect("present until drop");
        match conn.run(ctx, commit, statements).await {
            // As in `open_scoped`: a connection closed while idle, replaced once.
            Err(e) if connection_lost(&e) || conn.client.is_closed() => {
                let _ = managed::Object::take(tx.conn.take().expect("present until drop"));
                tx.conn = Some(self.connection().await?);
                let conn = tx.conn.as_mut().expect("present until drop");
                Ok(conn.run(ctx, commit, statements).await?)
            }
            outcome => Ok(outcome?),
        }
    }

    async fn open_scoped(
        &self,
        ctx: &OperationContext,
        first: Option<&str>,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<(ScopedTransaction, Vec<Row>), PoolError> {
        let mut conn = self.connection().await?;
        conn.in_transaction = true;
        let rows = match conn.open(ctx, first, params).await {
            Ok(rows) => rows,
            // The server may have closed an idle connection since it was
            // last checked: take a fresh one, once; the dead one is not
            // returned to the pool.
            Err(e) if connection_lost(&e) || conn.client.is_closed() => {
                let _ = managed::Object::take(conn);
                conn = self.connection().await?;
                conn.in_transaction = true;
                conn.open(ctx, first, params).await?
            }
            Err(e) => return Err(e.into()),
        };
        Ok((
            ScopedTransaction {
                conn: Some(conn),
                role: ctx.role,
            },
            rows,
        ))
    }
}

const SET_SCOPE: &str = "SELECT set_config('role', $1, true), \
     set_config('keepd.user_id', $2, true), set_config('keepd.email_hmac', $3, true)";
/// `SET_SCOPE` for a transaction committed without waiting for the disk
/// (`Commit::Unflushed`): one statement, not a `SET LOCAL` more.
const SET_SCOPE_UNFLUSHED: &str = "SELECT set_config('role', $1, true), \
     set_config('keepd.user_id', $2, true), set_config('keepd.email_hmac', $3, true), \
     set_config('synchronous_commit', 'off', true)";
const SET_ROLE: &str = "SELECT set_config('role', $1, true)";
/// Ad-hoc SQL (tests, tools) must not grow the cache without bound.
const MAX_CACHED_STATEMENTS: usize = 256;

impl Connection {
    fn cached(&self, role: GroupRole, sql: &str) -> Option<Statement> {
        self.statements
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&role)
            .and_then(|by_sql| by_sql.get(sql))
            .cloned()
    }

    async fn statement(
        &self,
        role: GroupRole,
        sql: &str,
    ) -> Result<Statement, tokio_postgres::Error> {
        if let Some(statement) = self.cached(role, sql) {
            return Ok(statement);
        }
        let statement = self.client.prepare(sql).await?;
        let mut cache = self.statements.lock().unwrap_or_else(|e| e.into_inner());
        let by_sql = cache.entry(role).or_default();
        if by_sql.len() >= MAX_CACHED_STATEMENTS {
            by_sql.clear();
        }
        by_sql.insert(sql.to_owned(), statement.clone());
        Ok(statement)
    }

    /// The statement that scopes a transaction to `ctx` (role, tenant,
    /// login lookup) and its parameters.
    async fn scope<'c>(
        &self,
        ctx: &'c OperationContext,
        commit: Commit,
    ) -> Result<(Statement, [&'c str; 3]), tokio_postgres::Error> {
        let sql = match commit {
            Commit::Flushed => SET_SCOPE,
            Commit::Unflushed => SET_SCOPE_UNFLUSHED,
        };
        let scope = self.statement(ctx.role, sql).await?;
        let user = ctx.user_id.as_deref().unwrap_or("");
        let email = ctx.email_hmac.as_deref().unwrap_or("");
        Ok((scope, [ctx.role.name(), user, email]))
    }

    /// BEGIN, the scope of `ctx` and `first` (if any), pipelined.
    async fn open(
        &self,
        ctx: &OperationContext,
        first: Option<&str>,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, tokio_postgres::Error> {
        let (scope, [role, user, email]) = self.scope(ctx, Commit::Flushed).await?;
        let scope_params: [&(dyn ToSql + Sync); 3] = [&role, &user, &email];
        if let Some(prepared) = first.and_then(|sql| self.cached(ctx.role, sql)) {
            let (_, _, rows) = tokio::try_join!(
                self.client.batch_execute("BEGIN"),
                self.client.query_one(&scope, &scope_params),
                self.client.query(&prepared, params),
            )?;
            return Ok(rows);
        }
        tokio::try_join!(
            self.client.batch_execute("BEGIN"),
            self.client.query_one(&scope, &scope_params),
        )?;
        let Some(first) = first else {
            return Ok(Vec::new());
        };
        // Prepared once per connection and role, inside the scope (the
        // login role alone may not even see the schema).
        let first = self.statement(ctx.role, first).await?;
        self.client.query(&first, params).await
    }

    /// `statements` in a transaction of their own, opened with the scope
    /// of `ctx` and committed as `commit` says. Once all are prepared on
    /// the connection, BEGIN, the scope, the statements and COMMIT go in
    /// one round trip, so a row they lock is held for no round trip to
    /// keepd; a statement that fails aborts the transaction, those after
    /// it are refused and COMMIT rolls back.
    async fn run(
        &mut self,
        ctx: &OperationContext,
        commit: Commit,
        statements: &[(&str, &[&(dyn ToSql + Sync)])],
    ) -> Result<Vec<Vec<Row>>, tokio_postgres::Error> {
        let (scope, [role, user, email]) = self.scope(ctx, commit).await?;
        let scope_params: [&(dyn ToSql + Sync); 3] = [&role, &user, &email];
        // Pipelined only when every statement is prepared and given as many
        // parameters as it takes: a statement tokio-postgres refuses before
        // sending it would not abort the transaction for those after it.
        let prepared: Option<Vec<Statement>> = statements
            .iter()
            .map(|(sql, params)| {
                self.cached(ctx.role, sql)
                    .filter(|statement| statement.params().len() == params.len())
            })
            .collect();
        // Until COMMIT is answered, a connection dropped here is rolled
        // back by the pool's recycling check.
        self.in_transaction = true;
        let rows = match prepared {
            Some(prepared) => {
                // Each request is sent when first polled, and both joins
                // poll in order: one round trip, in this order.
                let queries = futures_util::future::join_all(
                    prepared
                        .iter()
                        .zip(statements)
                        .map(|(statement, (_, params))| self.client.query(statement, params)),
                );
                let (begun, scoped, rows, committed) = tokio::join!(
                    self.client.batch_execute("BEGIN"),
                    self.client.query_one(&scope, &scope_params),
                    queries,
                    self.client.batch_execute("COMMIT"),
                );
                begun?;
                scoped?;
                committed?;
                rows.into_iter().collect()
            }
            None => {
                tokio::try_join!(
                    self.client.batch_execute("BEGIN"),
                    self.client.query_one(&scope, &scope_params),
                )?;
                // Stops at the first failure; COMMIT then rolls back.
                let rows = async {
                    let mut rows = Vec::with_capacity(statements.len());
                    for (sql, params) in statements {
                        // Prepared once per connection and role, inside the scope.
                        let statement = self.statement(ctx.role, sql).await?;
                        rows.push(self.client.query(&statement, params).await?);
                    }
                    Ok(rows)
                }
                .await;
                self.client.batch_execute("COMMIT").await?;
                rows
            }
        };
        // Committed, or rolled back by COMMIT after a statement failed.
        self.in_transaction = false;
        rows
    }
}

/// How `Connection::run` commits.
#[derive(Debug, Clone, Copy)]
enum Commit {
    /// As every transaction does (`synchronous_commit` as configured).
    Flushed,
    /// Without waiting for the disk (`RoleAwarePool::run_unflushed`).
    Unflushed,
}

/// Whether `e` ended the session (terminated backend, server restart,
/// closed socket) rather than failing one statement.
fn connection_lost(e: &tokio_postgres::Error) -> bool {
    e.is_closed()
        || e.as_db_error()
            .is_some_and(|db| matches!(db.severity(), "FATAL" | "PANIC"))
}

/// One open transaction with its role and tenant set. Dropped without
/// `commit`, it is rolled back at once (see `Drop`).
pub struct ScopedTransaction {
    /// Present until the transaction is dropped.
    conn: Option<managed::Object<Manager>>,
    role: GroupRole,
}

impl ScopedTransaction {
    fn conn(&self) -> &Connection {
        self.conn.as_ref().expect("present until drop")
    }

    pub fn role(&self) -> GroupRole {
        self.role
    }

    /// Runs `sql` as `role` (e.g. `Audit`, to append the audit entry of the
    /// change this transaction makes) and switches back: the three
    /// statements are sent together. Rows affected. Takes `&mut self`: no
    /// other statement of this transaction may be in flight meanwhile, or
    /// it could run as `role`.
    pub async fn execute_as(
        &mut self,
        role: GroupRole,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, PoolError> {
        let conn = self.conn();
        let to = conn.statement(role, SET_ROLE).await?;
        let back = conn.statement(self.role, SET_ROLE).await?;
        let (to_name, back_name) = (role.name(), self.role.name());
        let (to_params, back_params): ([&(dyn ToSql + Sync); 1], [&(dyn ToSql + Sync); 1]) =
            ([&to_name], [&back_name]);
        let Some(statement) = conn.cached(role, sql) else {
            // Prepared once per connection as `role` (only it may see the
            // schema), one statement after the other.
            conn.client.query_one(&to, &to_params).await?;
            let statement = conn.statement(role, sql).await?;
            let affected = self.observe(conn.client.execute(&statement, params).await)?;
            conn.client.query_one(&back, &back_params).await?;
            return Ok(affected);
        };
        let (_, affected, _) = self.observe(tokio::try_join!(
            conn.client.query_one(&to, &to_params),
            conn.client.execute(&statement, params),
            conn.client.query_one(&back, &back_params),
        ))?;
        Ok(affected)
    }

    pub async fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, PoolError> {
        let statement = self.conn().statement(self.role, sql).await?;
        self.observe(self.conn().client.query(&statement, params).await)
    }

    pub async fn query_one(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, PoolError> {
        let statement = self.conn().statement(self.role, sql).await?;
        self.observe(self.conn().client.query_one(&statement, params).await)
    }

    pub async fn execute(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, PoolError> {
        let statement = self.conn().statement(self.role, sql).await?;
        self.observe(self.conn().client.execute(&statement, params).await)
    }

    /// A statement's outcome; a refusal as read-only marks the connection
    /// so that the pool drops it.
    fn observe<T>(&self, outcome: Result<T, tokio_postgres::Error>) -> Result<T, PoolError> {
        outcome.map_err(|e| {
            if e.code() == Some(&tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION) {
                self.conn()
                    .read_only
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
            e.into()
        })
    }

    /// Runs `sql` and COMMIT in one round trip: the statement is prepared
    /// first, so it is sent before COMMIT. When it fails, the transaction
    /// is aborted and Postgres ends it with a rollback: nothing commits,
    /// and its error is returned. Its rows otherwise, once committed.
    pub async fn query_and_commit(
        mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, PoolError> {
        let statement = self.conn().statement(self.role, sql).await?;
        let conn = self.conn();
        let (rows, committed) = tokio::join!(
            conn.client.query(&statement, params),
            conn.client.batch_execute("COMMIT"),
        );
        // Committed or rolled back: either way no transaction is open, and
        // a connection that did not answer COMMIT is dropped by `Drop`.
        committed?;
        self.conn
            .as_mut()
            .expect("present until drop")
            .in_transaction = false;
        self.observe(rows)
    }

    pub async fn commit(mut self) -> Result<(), PoolError> {
        let conn = self.conn.as_mut().expect("present until drop");
        conn.client.batch_execute("COMMIT").await?;
        conn.in_transaction = false;
        Ok(())
    }
}

/// Dropped without `commit` (an early return, a cancelled request): the
/// transaction is rolled back right away, so its locks are released now,
/// not when the pool next hands out this connection. A connection that
/// cannot roll back is closed, which ends the transaction server-side.
impl Drop for ScopedTransaction {
    fn drop(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        if !conn.in_transaction {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    if conn.client.batch_execute("ROLLBACK").await.is_ok() {
                        conn.in_transaction = false;
                    } else {
                        drop(managed::Object::take(conn));
                    }
                });
            }
            Err(_) => drop(managed::Object::take(conn)),
        }
    }
}
