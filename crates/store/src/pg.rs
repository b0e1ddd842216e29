//! The shared backend: one PostgreSQL database for workers on many hosts.
//!
//! Unlike the SQLite store, nothing hot lives on one row. Pending items are rows of
//! ranges (a stage starts as up to 64 of them); a claim locks one with
//! `FOR UPDATE SKIP LOCKED`, so concurrent claimers take different ranges instead of
//! queueing. Done items are counted on the fragment rows that did them. The sizer
//! row is written only by whoever gets its lock without waiting (`SKIP LOCKED`):
//! under contention the model learns from a sample of fragments. Each transition
//! runs the same pure ledger functions as SQLite on the rows it touches.
//!
//! One connection per worker. A lost connection makes every call fail as
//! `Unavailable` until a reconnect (tried at most once per backoff step) succeeds;
//! the worker buffers acks meanwhile.

use crate::db::{Arg, Db, Row, Val};
use crate::ops::{store_over_backend, Backend, Plans, TxKind};
use crate::{Result, StoreError, WriteCounts};
use std::cell::Cell;
use std::collections::HashMap;
use std::future::Future;
use std::str::FromStr;
use std::task::Poll;
use std::time::{Duration, Instant};
use tokio_postgres::tls::NoTlsStream;
use tokio_postgres::types::{FromSql, IsNull, ToSql, Type};
use tokio_postgres::{AsyncMessage, Client, Config, Connection, Error, NoTls, Socket, Statement};

/// The channel idle workers listen on.
const CHANNEL: &str = "granule_work";
/// Longest wait between reconnect attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long the server lets one of our sessions sit idle inside a transaction before
/// it ends the session and frees its locks (see `connect`).
const IDLE_IN_TRANSACTION: Duration = Duration::from_secs(10);

/// Migrations in order; never edit one that has shipped, append a new one.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE jobs (
    id BIGSERIAL PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    spec_hash TEXT NOT NULL,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    finished_ms BIGINT
);
CREATE TABLE stages (
    id BIGSERIAL PRIMARY KEY,
    job_id BIGINT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    idx INT NOT NULL,
    name TEXT NOT NULL,
    items BIGINT NOT NULL,
    after TEXT NOT NULL,
    retries INT NOT NULL,
    sizer_config TEXT NOT NULL,
    state TEXT NOT NULL,
    quarantined TEXT NOT NULL DEFAULT '[]',
    acks TEXT NOT NULL DEFAULT 'unknown',
    UNIQUE (job_id, idx)
);
CREATE TABLE pending (
    id BIGSERIAL PRIMARY KEY,
    stage_id BIGINT NOT NULL REFERENCES stages(id) ON DELETE CASCADE,
    start_idx BIGINT NOT NULL,
    end_idx BIGINT NOT NULL,
    failures INT NOT NULL,
    checkpoint_id BIGINT
);
CREATE INDEX pending_by_stage ON pending (stage_id, start_idx);
CREATE TABLE sizers (
    stage_id BIGINT NOT NULL REFERENCES stages(id) ON DELETE CASCADE,
    class TEXT NOT NULL,
    state TEXT NOT NULL,
    PRIMARY KEY (stage_id, class)
);
CREATE TABLE workers (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid BIGINT NOT NULL,
    proc_start BIGINT NOT NULL,
    slots INT NOT NULL,
    class TEXT NOT NULL,
    started_ms BIGINT NOT NULL,
    heartbeat_ms BIGINT NOT NULL,
    state TEXT NOT NULL DEFAULT 'running',
    lifespan_end_ms BIGINT,
    busy INT NOT NULL DEFAULT 0,
    free_memory DOUBLE PRECISION,
    load DOUBLE PRECISION
);
CREATE TABLE fragments (
    id BIGSERIAL PRIMARY KEY,
    stage_id BIGINT NOT NULL REFERENCES stages(id) ON DELETE CASCADE,
    start_idx BIGINT NOT NULL,
    end_idx BIGINT NOT NULL,
    state TEXT NOT NULL,
    worker TEXT NOT NULL,
    class TEXT NOT NULL,
    lease_expires_ms BIGINT NOT NULL,
    failures INT NOT NULL,
    acked TEXT NOT NULL DEFAULT '[]',
    done_count BIGINT NOT NULL DEFAULT 0,
    checkpoint_id BIGINT,
    n BIGINT NOT NULL,
    predicted_ms DOUBLE PRECISION NOT NULL,
    size_cap TEXT NOT NULL,
    claimed_ms BIGINT NOT NULL,
    finished_ms BIGINT,
    observed_ms DOUBLE PRECISION,
    cpu_ms DOUBLE PRECISION,
    peak_rss_kb BIGINT,
    load DOUBLE PRECISION,
    fed BIGINT,
    acks BIGINT,
    cause TEXT,
    detail TEXT,
    stdout BYTEA,
    stderr BYTEA,
    split_request BIGINT,
    splits INT NOT NULL DEFAULT 0,
    wasted_ms DOUBLE PRECISION NOT NULL DEFAULT 0,
    checkpoint_fallbacks INT NOT NULL DEFAULT 0
);
CREATE INDEX fragments_by_stage ON fragments (stage_id, state);
CREATE INDEX fragments_by_worker ON fragments (worker, state);
CREATE TABLE blobs (
    id BIGSERIAL PRIMARY KEY,
    stage_id BIGINT NOT NULL REFERENCES stages(id) ON DELETE CASCADE,
    fragment_id BIGINT NOT NULL,
    kind TEXT NOT NULL,
    raw_len BIGINT NOT NULL,
    hash TEXT NOT NULL,
    data BYTEA NOT NULL,
    meta TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    prev BIGINT
);
"#,
    // 2: workers describe themselves.
    r#"
ALTER TABLE workers ADD COLUMN cost DOUBLE PRECISION NOT NULL DEFAULT 0;
ALTER TABLE workers ADD COLUMN spot BOOLEAN NOT NULL DEFAULT false;
ALTER TABLE workers ADD COLUMN resources TEXT NOT NULL DEFAULT '{}';
"#,
    // 3: what a stage's slots need, its class and priority.
    r#"
ALTER TABLE stages ADD COLUMN needs TEXT NOT NULL DEFAULT '{}';
"#,
    // 4: what placement keeps of items' history (lost with workers, out of memory).
    r#"
ALTER TABLE pending ADD COLUMN lost INT NOT NULL DEFAULT 0;
ALTER TABLE pending ADD COLUMN floor_memory_mb BIGINT NOT NULL DEFAULT 0;
ALTER TABLE fragments ADD COLUMN lost INT NOT NULL DEFAULT 0;
ALTER TABLE fragments ADD COLUMN floor_memory_mb BIGINT NOT NULL DEFAULT 0;
"#,
    // 5: block I/O of a fragment's task, for the stage's profile.
    r#"
ALTER TABLE fragments ADD COLUMN io_bytes BIGINT NOT NULL DEFAULT 0;
"#,
    // 6: exact at the task boundary: the state each checkpoint, pending range and
    // running fragment covers, chain results, jobs that stop with an error.
    r#"
ALTER TABLE pending ADD COLUMN covers TEXT NOT NULL DEFAULT '[]';
ALTER TABLE stages ADD COLUMN stateful BOOLEAN NOT NULL DEFAULT false;
UPDATE stages SET stateful = true WHERE id IN (SELECT stage_id FROM blobs);
ALTER TABLE fragments ADD COLUMN covers TEXT NOT NULL DEFAULT '[]';
ALTER TABLE fragments ADD COLUMN inherited TEXT NOT NULL DEFAULT '[]';
ALTER TABLE fragments ADD COLUMN resumed_from BIGINT;
ALTER TABLE fragments ADD COLUMN result BIGINT;
ALTER TABLE fragments ADD COLUMN state_reruns BIGINT NOT NULL DEFAULT 0;
ALTER TABLE fragments ADD COLUMN results_missing BIGINT NOT NULL DEFAULT 0;
ALTER TABLE fragments ADD COLUMN unconfirmed BOOLEAN NOT NULL DEFAULT false;
ALTER TABLE blobs ADD COLUMN covers TEXT NOT NULL DEFAULT '[]';
ALTER TABLE jobs ADD COLUMN error TEXT;
UPDATE fragments SET result = checkpoint_id WHERE state = 'done' AND checkpoint_id IS NOT NULL;
-- What schema 5 knew, said the new way (as in the SQLite store's migration 7).
UPDATE fragments SET unconfirmed = true WHERE state = 'done' AND done_count > 0
    AND stage_id IN (SELECT id FROM stages WHERE acks != 'yes');
UPDATE fragments SET resumed_from = checkpoint_id WHERE state = 'running'
    AND checkpoint_id IN (SELECT b.id FROM blobs b WHERE b.fragment_id != fragments.id);
UPDATE fragments SET covers = acked WHERE state = 'running'
    AND checkpoint_id IN (SELECT b.id FROM blobs b WHERE b.fragment_id = fragments.id);
"#,
    // 7: a fragment its worker has confirmed holding follows the worker's lease (one
    // row per heartbeat, not one per fragment); where a worker's pids mean something.
    r#"
ALTER TABLE workers ADD COLUMN lease_until_ms BIGINT NOT NULL DEFAULT 0;
ALTER TABLE workers ADD COLUMN locality TEXT NOT NULL DEFAULT '';
"#,
    // 8: a claim moves its range's start; with the start out of the index (and room
    // left in each page) that update is HOT: it adds no index entry, and scans of a
    // stage's pending rows stop visiting one dead entry per claim made since the
    // last vacuum (5,241 entries for 64 rows after 5 s at 32 clients).
    r#"
DROP INDEX pending_by_stage;
CREATE INDEX pending_by_stage ON pending (stage_id);
ALTER TABLE pending SET (fillfactor = 50);
"#,
    // 9: costs learned per task and class outlive the stage that learned them, so
    // a rerun or a new job of the same command does not slow-start again.
    r#"
ALTER TABLE stages ADD COLUMN cost_key TEXT NOT NULL DEFAULT '';
CREATE TABLE learned (
    cost_key TEXT NOT NULL,
    class TEXT NOT NULL,
    sizer TEXT NOT NULL,
    updated_ms BIGINT NOT NULL,
    PRIMARY KEY (cost_key, class)
);
"#,
    // 10: stages that feed stages: outputs published when their items' acks commit,
    // the items of streamed stages, afterany.
    r#"
ALTER TABLE stages ADD COLUMN sources TEXT NOT NULL DEFAULT '[]';
ALTER TABLE stages ADD COLUMN from_results BOOLEAN NOT NULL DEFAULT false;
ALTER TABLE stages ADD COLUMN after_any TEXT NOT NULL DEFAULT '[]';
ALTER TABLE stages ADD COLUMN published BIGINT NOT NULL DEFAULT 0;
ALTER TABLE stages ADD COLUMN results_published BIGINT NOT NULL DEFAULT 0;
CREATE TABLE outputs (
    id BIGSERIAL PRIMARY KEY,
    stage_id BIGINT NOT NULL REFERENCES stages(id) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    start_idx BIGINT NOT NULL,
    end_idx BIGINT NOT NULL,
    fragment_id BIGINT NOT NULL,
    data BYTEA NOT NULL
);
CREATE INDEX outputs_by_stage ON outputs (stage_id, kind, start_idx);
CREATE TABLE feeds (
    stage_id BIGINT NOT NULL REFERENCES stages(id) ON DELETE CASCADE,
    start_idx BIGINT NOT NULL,
    end_idx BIGINT NOT NULL,
    src_stage BIGINT NOT NULL,
    src_start BIGINT NOT NULL
);
CREATE INDEX feeds_by_stage ON feeds (stage_id, start_idx);
"#,
    // 11: `granule serve`: each worker names the allocation a provider started it
    // in, and each pool's last decision and launch error are kept for `status`.
    r#"
ALTER TABLE workers ADD COLUMN allocation TEXT;
CREATE TABLE pools (
    name TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    updated_ms BIGINT NOT NULL
);
"#,
    // 12: how long each claim's transaction took in the store (`/metrics`).
    r#"
ALTER TABLE fragments ADD COLUMN claim_us BIGINT;
"#,
    // 13: fair share across jobs: shares per owner and account, each owner's recent
    // usage (decayed slot-ms; '' for none), and store-wide settings (the half-life).
    r#"
CREATE TABLE shares (
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    shares DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (kind, name)
);
CREATE TABLE usage (
    account TEXT NOT NULL,
    owner TEXT NOT NULL,
    slot_ms DOUBLE PRECISION NOT NULL,
    at_ms BIGINT NOT NULL,
    PRIMARY KEY (account, owner)
);
CREATE TABLE settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"#,
];

/// A store in a PostgreSQL database.
pub struct PgStore {
    config: Config,
    conn: Option<Conn>,
    /// Prepared statements of the current connection, by SQL text.
    statements: HashMap<String, Statement>,
    next_attempt: Instant,
    backoff: Duration,
    /// The server's clock minus this host's, measured at connect (see `clock_offset`).
    clock_offset_ms: i64,
    plans: Plans,
}

/// One connection: tokio-postgres's client, whose connection is driven on this
/// thread by a small runtime only while a call waits (as the `postgres` crate does).
/// Used directly so that a transaction's statements can go out together: `BEGIN`
/// with the first statement, writes nobody reads with the statement or commit after
/// them (pipelining: one round trip where there were several).
struct Conn {
    runtime: tokio::runtime::Runtime,
    client: Client,
    /// The connection, until it ends: dropping it then fails what waits on it.
    connection: Option<Connection<Socket, NoTlsStream>>,
    /// Notifications seen since the last `wait`.
    notified: Cell<bool>,
}

impl Conn {
    fn open(config: &Config) -> Result<Conn> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::Unavailable(format!("cannot start a runtime: {e}")))?;
        let (client, connection) = runtime.block_on(config.connect(NoTls))?;
        Ok(Conn {
            runtime,
            client,
            connection: Some(connection),
            notified: Cell::new(false),
        })
    }

    /// Runs `work` (which uses the client) to its end, driving the connection.
    fn run<T>(&mut self, work: impl AsyncFnOnce(&Client) -> Result<T, Error>) -> Result<T> {
        let Conn {
            runtime,
            client,
            connection,
            notified,
        } = self;
        let work = work(client);
        drive(runtime, connection, notified, work).map_err(StoreError::from)
    }

    fn batch(&mut self, sql: &str) -> Result<()> {
        self.run(async |c| c.batch_execute(sql).await)
    }
}

/// Polls the connection (keeping notifications) and then `work`, until `work` ends.
/// A connection that ends is dropped: what `work` waits on then fails as closed.
fn drive<T>(
    runtime: &tokio::runtime::Runtime,
    connection: &mut Option<Connection<Socket, NoTlsStream>>,
    notified: &Cell<bool>,
    work: impl Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    let mut work = std::pin::pin!(work);
    runtime.block_on(std::future::poll_fn(|cx| {
        while let Some(c) = connection {
            match c.poll_message(cx) {
                Poll::Ready(Some(Ok(AsyncMessage::Notification(_)))) => notified.set(true),
                Poll::Ready(Some(Ok(_))) => {}
                Poll::Ready(Some(Err(_)) | None) => *connection = None,
                Poll::Pending => break,
            }
        }
        work.as_mut().poll(cx)
    }))
}

/// The server's clock minus this host's (ms), from one round trip's midpoint. Under
/// a second is taken as none: that is the measurement's own noise on a loaded host,
/// and synchronized clocks agree closer than a lease needs.
fn clock_offset(conn: &mut Conn) -> Result<i64> {
    let local = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64)
    };
    let before = local();
    let server: i64 = conn
        .run(async |c| {
            c.query_one(
                "SELECT (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT",
                &[],
            )
            .await
        })?
        .get(0);
    let offset = server - (before + local()) / 2;
    Ok(if offset.abs() < 1000 { 0 } else { offset })
}

impl PgStore {
    /// Connects to the database at `url` (`postgres://…`) and applies pending migrations.
    pub fn open(url: &str) -> Result<PgStore> {
        let mut config = Config::from_str(url)?;
        config
            .connect_timeout(Duration::from_secs(5))
            // A cut link surfaces as an error within seconds instead of hanging a call.
            .tcp_user_timeout(Duration::from_secs(5))
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(5))
            .keepalives_interval(Duration::from_secs(1))
            .keepalives_retries(3);
        if config.get_application_name().is_none() {
            config.application_name("granule");
        }
        let mut store = PgStore {
            config,
            conn: None,
            statements: HashMap::new(),
            next_attempt: Instant::now(),
            backoff: Duration::ZERO,
            clock_offset_ms: 0,
            plans: Plans::default(),
        };
        store.connect()?;
        Ok(store)
    }

    fn connect(&mut self) -> Result<()> {
        let mut conn = Conn::open(&self.config)?;
        conn.run(async |c| {
            c.batch_execute("BEGIN").await?;
            // One migrator at a time, across every worker that starts at once.
            c.execute("SELECT pg_advisory_xact_lock(7267435)", &[])
                .await?;
            c.batch_execute("CREATE TABLE IF NOT EXISTS granule_schema (version INT NOT NULL)")
                .await?;
            let version: i64 = c
                .query_one(
                    "SELECT coalesce(max(version), 0)::BIGINT FROM granule_schema",
                    &[],
                )
                .await?
                .get(0);
            for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
                c.batch_execute(sql).await?;
                c.execute(
                    "INSERT INTO granule_schema (version) VALUES ($1)",
                    &[&((i + 1) as i32)],
                )
                .await?;
            }
            c.batch_execute("COMMIT").await
        })?;
        conn.batch(&format!("LISTEN {CHANNEL}"))?;
        // A worker cut off mid-transaction (a partition, a frozen host) must not hold
        // its row locks until the server's TCP keepalive notices, hours later: the
        // server ends a session left idle inside a transaction. Ours never pause that
        // long between statements; one that does is retried as a lost connection.
        // Every statement is prepared once per connection and looks rows up by key:
        // a plan made once serves every execution. By default the server plans the
        // first five executions for their values and may keep doing so; that planning
        // was the largest cost of a claim's statements after their execution.
        conn.batch(&format!(
            "SET idle_in_transaction_session_timeout = {}; SET plan_cache_mode = force_generic_plan",
            IDLE_IN_TRANSACTION.as_millis()
        ))?;
        self.clock_offset_ms = clock_offset(&mut conn)?;
        self.conn = Some(conn);
        self.statements.clear();
        self.backoff = Duration::ZERO;
        Ok(())
    }

    /// The connection, reconnecting (with backoff) if it was lost.
    fn conn(&mut self) -> Result<&mut Conn> {
        if self
            .conn
            .as_ref()
            .is_some_and(|c| c.connection.is_none() || c.client.is_closed())
        {
            self.conn = None;
        }
        if self.conn.is_none() {
            if Instant::now() < self.next_attempt {
                return Err(StoreError::Unavailable("reconnecting to PostgreSQL".into()));
            }
            if let Err(e) = self.connect() {
                self.backoff = (self.backoff * 2).clamp(Duration::from_millis(100), BACKOFF_MAX);
                self.next_attempt = Instant::now() + self.backoff;
                return Err(StoreError::Unavailable(format!(
                    "cannot reach PostgreSQL: {e}"
                )));
            }
        }
        Ok(self.conn.as_mut().expect("connected above"))
    }
}

/// An argument kept for a statement sent later.
enum Owned {
    Null,
    Int(i64),
    Real(f64),
    Bool(bool),
    Text(String),
    Bytes(Vec<u8>),
    Ints(Vec<i64>),
    Texts(Vec<String>),
}

impl Owned {
    fn of(a: &Arg<'_>) -> Owned {
        match *a {
            Arg::Null => Owned::Null,
            Arg::Int(v) => Owned::Int(v),
            Arg::Real(v) => Owned::Real(v),
            Arg::Bool(v) => Owned::Bool(v),
            Arg::Text(v) => Owned::Text(v.to_string()),
            Arg::Bytes(v) => Owned::Bytes(v.to_vec()),
            Arg::Ints(v) => Owned::Ints(v.to_vec()),
            Arg::Texts(v) => Owned::Texts(v.to_vec()),
        }
    }

    fn arg(&self) -> Arg<'_> {
        match self {
            Owned::Null => Arg::Null,
            Owned::Int(v) => Arg::Int(*v),
            Owned::Real(v) => Arg::Real(*v),
            Owned::Bool(v) => Arg::Bool(*v),
            Owned::Text(v) => Arg::Text(v),
            Owned::Bytes(v) => Arg::Bytes(v),
            Owned::Ints(v) => Arg::Ints(v),
            Owned::Texts(v) => Arg::Texts(v),
        }
    }
}

/// What ends a round trip: a statement whose result is read, or the commit.
#[derive(Clone, Copy)]
enum Last<'x> {
    Query(&'x Statement, &'x [Arg<'x>]),
    Execute(&'x Statement, &'x [Arg<'x>]),
    Commit,
}

/// What a round trip's last statement returned.
#[derive(Default)]
struct Sent {
    rows: Vec<tokio_postgres::Row>,
    count: u64,
}

/// A transaction whose statements are prepared once per connection, whose `BEGIN`
/// goes with its first statement and whose deferred writes go with the statement
/// after them.
struct PgTx<'a> {
    conn: &'a mut Conn,
    statements: &'a mut HashMap<String, Statement>,
    plans: &'a mut Plans,
    clock_offset_ms: i64,
    begun: bool,
    deferred: Vec<(Statement, Vec<Owned>)>,
}

fn params<'x>(args: &'x [Arg<'x>]) -> Vec<&'x (dyn ToSql + Sync)> {
    args.iter().map(|a| a as _).collect()
}

impl PgTx<'_> {
    fn statement(&mut self, sql: &str) -> Result<Statement> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = self.conn.run(async |c| c.prepare(sql).await)?;
        self.statements.insert(sql.to_string(), s.clone());
        Ok(s)
    }

    /// Sends `BEGIN` (the first time), the deferred writes and `last` in one round
    /// trip, in that order.
    fn send(&mut self, last: Last<'_>) -> Result<Sent> {
        let begin = !std::mem::replace(&mut self.begun, true);
        let deferred = std::mem::take(&mut self.deferred);
        self.conn.run(async |c| {
            let begin = async {
                match begin {
                    true => c.batch_execute("BEGIN").await,
                    false => Ok(()),
                }
            };
            let writes =
                futures_util::future::try_join_all(deferred.iter().map(|(s, owned)| async move {
                    let args: Vec<Arg<'_>> = owned.iter().map(Owned::arg).collect();
                    c.execute(s, &params(&args)).await
                }));
            let last = async {
                match last {
                    Last::Query(s, args) => c
                        .query(s, &params(args))
                        .await
                        .map(|rows| Sent { rows, count: 0 }),
                    Last::Execute(s, args) => c.execute(s, &params(args)).await.map(|count| Sent {
                        rows: Vec::new(),
                        count,
                    }),
                    Last::Commit => c.batch_execute("COMMIT").await.map(|()| Sent::default()),
                }
            };
            let ((), _, sent) = futures_util::future::try_join3(begin, writes, last).await?;
            Ok(sent)
        })
    }
}

impl Db for PgTx<'_> {
    fn query(&mut self, sql: &str, args: &[Arg<'_>]) -> Result<Vec<Row>> {
        let s = self.statement(sql)?;
        self.send(Last::Query(&s, args))?
            .rows
            .iter()
            .map(|r| {
                (0..r.len())
                    .map(|i| r.try_get::<_, Val>(i))
                    .collect::<Result<Vec<_>, _>>()
                    .map(Row)
                    .map_err(StoreError::from)
            })
            .collect()
    }

    fn execute(&mut self, sql: &str, args: &[Arg<'_>]) -> Result<u64> {
        let s = self.statement(sql)?;
        Ok(self.send(Last::Execute(&s, args))?.count)
    }

    fn defer(&mut self, sql: &str, args: &[Arg<'_>]) -> Result<()> {
        let s = self.statement(sql)?;
        self.deferred
            .push((s, args.iter().map(Owned::of).collect()));
        Ok(())
    }

    fn notify(&mut self) -> Result<()> {
        self.defer(&format!("SELECT pg_notify('{CHANNEL}', '')"), &[])
    }

    fn lease_clock(&self, local_ms: i64) -> i64 {
        local_ms + self.clock_offset_ms
    }

    fn plans(&mut self) -> &mut Plans {
        self.plans
    }
}

impl Backend for PgStore {
    fn counted_writes(&self) -> Option<WriteCounts> {
        None
    }

    fn skips_locked_rows(&self) -> bool {
        true
    }

    /// Runs `f` in a transaction; a broken connection is dropped for a reconnect.
    fn transaction<T>(
        &mut self,
        _kind: TxKind,
        f: impl FnOnce(&mut dyn Db) -> Result<T>,
    ) -> Result<T> {
        self.conn()?;
        let mut tx = PgTx {
            conn: self.conn.as_mut().expect("connected"),
            statements: &mut self.statements,
            plans: &mut self.plans,
            clock_offset_ms: self.clock_offset_ms,
            begun: false,
            deferred: Vec::new(),
        };
        // A transaction that only deferred writes has not begun yet: it commits too.
        let result = f(&mut tx).and_then(|value| match tx.begun || !tx.deferred.is_empty() {
            true => tx.send(Last::Commit).map(|_| value),
            false => Ok(value),
        });
        if result.is_err() && tx.begun {
            // Ends what the server still holds open (it fails too on a lost connection).
            let _ = tx.conn.batch("ROLLBACK");
        }
        if let Err(e) = &result {
            if e.is_transient() {
                self.conn = None;
                self.statements.clear();
            }
        }
        result
    }

    fn wait(&mut self, timeout: Duration) -> Result<bool> {
        let conn = match self.conn() {
            Ok(c) => c,
            Err(e) => {
                std::thread::sleep(timeout.min(Duration::from_millis(100)));
                return Err(e);
            }
        };
        // What came meanwhile counts at once; otherwise wait for one, up to `timeout`.
        let Conn {
            runtime,
            connection,
            notified,
            ..
        } = conn;
        let notified = &*notified;
        let work = async {
            let mut sleep = std::pin::pin!(tokio::time::sleep(timeout));
            std::future::poll_fn(|cx| match notified.get() {
                true => Poll::Ready(Ok(true)),
                false => sleep.as_mut().poll(cx).map(|()| Ok(false)),
            })
            .await
        };
        let got = drive(runtime, connection, notified, work)?;
        notified.set(false);
        if connection.is_none() {
            return Err(StoreError::Unavailable(
                "lost the connection to PostgreSQL".into(),
            ));
        }
        Ok(got)
    }

    fn poll_interval(&self) -> Duration {
        // Notifications wake idle workers; the poll is only a safety net.
        Duration::from_secs(2)
    }
}

store_over_backend!(PgStore);

type BoxError = Box<dyn std::error::Error + Sync + Send>;

impl ToSql for Arg<'_> {
    /// The argument as the type the server inferred for its parameter: integers
    /// narrow to `INT` and `SMALLINT` columns and widen to booleans and floats.
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut tokio_postgres::types::private::BytesMut,
    ) -> Result<IsNull, BoxError> {
        match *self {
            Arg::Null => Ok(IsNull::Yes),
            Arg::Int(v) if *ty == Type::INT4 => i32::try_from(v)?.to_sql(ty, out),
            Arg::Int(v) if *ty == Type::INT2 => i16::try_from(v)?.to_sql(ty, out),
            Arg::Int(v) if *ty == Type::BOOL => (v != 0).to_sql(ty, out),
            Arg::Int(v) if *ty == Type::FLOAT8 => (v as f64).to_sql(ty, out),
            Arg::Int(v) => v.to_sql(ty, out),
            Arg::Real(v) => v.to_sql(ty, out),
            Arg::Bool(v) if *ty == Type::INT4 => i32::from(v).to_sql(ty, out),
            Arg::Bool(v) => v.to_sql(ty, out),
            Arg::Text(v) => v.to_sql(ty, out),
            Arg::Bytes(v) => v.to_sql(ty, out),
            Arg::Ints(v) => v.to_sql(ty, out),
            Arg::Texts(v) => v.to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    tokio_postgres::types::to_sql_checked!();
}

impl<'a> FromSql<'a> for Val {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Val, BoxError> {
        Ok(match *ty {
            Type::INT2 => Val::Int(i16::from_sql(ty, raw)?.into()),
            Type::INT4 => Val::Int(i32::from_sql(ty, raw)?.into()),
            Type::INT8 => Val::Int(i64::from_sql(ty, raw)?),
            Type::BOOL => Val::Int(bool::from_sql(ty, raw)?.into()),
            Type::FLOAT4 => Val::Real(f32::from_sql(ty, raw)?.into()),
            Type::FLOAT8 => Val::Real(f64::from_sql(ty, raw)?),
            Type::BYTEA => Val::Bytes(Vec::from_sql(ty, raw)?),
            _ => Val::Text(String::from_sql(ty, raw)?),
        })
    }

    fn from_sql_null(_: &Type) -> Result<Val, BoxError> {
        Ok(Val::Null)
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestDatabase;

    #[test]
    fn a_transaction_of_deferred_writes_alone_commits_them() {
        let Some(db) = TestDatabase::create("deferred_alone") else {
            return;
        };
        let mut store = PgStore::open(&db.url).unwrap();
        let count = |store: &mut PgStore| {
            store
                .transaction(TxKind::Read, |tx| {
                    Ok(tx
                        .query_one("SELECT count(*) FROM granule_schema", &[])?
                        .i64(0))
                })
                .unwrap()
        };
        let before = count(&mut store);
        store
            .transaction(TxKind::Write, |tx| {
                tx.defer("INSERT INTO granule_schema (version) VALUES (0)", &[])
            })
            .unwrap();
        assert_eq!(count(&mut store), before + 1);
    }
}
