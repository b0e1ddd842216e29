//! The embedded backend: one SQLite file in WAL mode, safe across processes.
//!
//! SQLite has no `SKIP LOCKED`; every transition that writes takes the write lock up
//! front (`BEGIN IMMEDIATE`) so two claimers serialize instead of deadlocking, and
//! each holds it for a few row reads and writes only. The transitions are `ops`';
//! this file opens, migrates and speaks SQLite's SQL.

use crate::common::{json, parse};
use crate::db::{sqlite_dialect, Arg, Db, Row, Val};
use crate::ops::{store_over_backend, Backend, Plans, TxKind};
use crate::schema::{
    CURRENT, LATER, MIGRATIONS, ROW_LAYOUT_AFTER, ROW_LAYOUT_BEFORE, ROW_LAYOUT_VERSION, VERSION,
};
use crate::{Result, StoreError, WriteCounts};
use granule_core::{IntervalSet, Pending};
use rusqlite::types::{ToSqlOutput, Value, ValueRef};
use rusqlite::{params_from_iter, Connection, TransactionBehavior};
use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

/// A store in one SQLite file.
pub struct SqliteStore {
    conn: Connection,
    writes: WriteCounts,
    /// Statements as SQLite says them, by their PostgreSQL text.
    dialect: HashMap<String, String>,
    plans: Plans,
}

impl SqliteStore {
    /// Opens (creating if needed) the store at `path` and applies pending migrations.
    /// Several processes may open it at once; a busy database is retried for 30 s.
    pub fn open(path: &Path) -> Result<SqliteStore> {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            match SqliteStore::try_open(path) {
                Err(StoreError::Sqlite(e))
                    if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy)
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                other => return other,
            }
        }
    }

    fn try_open(path: &Path) -> Result<SqliteStore> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(30))?;
        let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            conn.pragma_update(None, "journal_mode", "WAL")?;
        }
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let mut store = SqliteStore {
            conn,
            writes: WriteCounts::default(),
            dialect: HashMap::new(),
            plans: Plans::default(),
        };
        store.migrate()?;
        Ok(store)
    }

    fn migrate(&mut self) -> Result<()> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let version = tx.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))? as usize;
        if version == 0 {
            tx.execute_batch(CURRENT)?;
        } else {
            upgrade(&tx, version)?;
        }
        tx.pragma_update(None, "user_version", VERSION as i64)?;
        tx.commit()?;
        Ok(())
    }
}

/// Applies the migrations after `version`.
fn upgrade(conn: &Connection, version: usize) -> Result<()> {
    for sql in MIGRATIONS.iter().skip(version) {
        conn.execute_batch(sql)?;
    }
    if version < ROW_LAYOUT_VERSION {
        to_row_layout(conn)?;
    }
    for sql in LATER
        .iter()
        .skip(version.saturating_sub(ROW_LAYOUT_VERSION))
    {
        conn.execute_batch(sql)?;
    }
    Ok(())
}

/// Migration 9: each stage's JSON ledger becomes rows. Pending ranges become
/// `pending` rows; a running fragment counts its own acks; the stage's other done
/// items are counted on one `migrated` fragment row per stage (and one more for
/// all-or-nothing items no ack has confirmed), which the status leaves out.
fn to_row_layout(conn: &Connection) -> Result<()> {
    conn.execute_batch(ROW_LAYOUT_BEFORE)?;
    let stages: Vec<(i64, String, String, String)> = conn
        .prepare("SELECT id, pending, done, unconfirmed FROM stages")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
        .collect::<rusqlite::Result<_>>()?;
    for (stage, pending, done, unconfirmed) in stages {
        let pending: Pending = parse(&pending, "stage pending")?;
        for r in pending.ranges() {
            conn.execute(
                "INSERT INTO pending (stage_id, start_idx, end_idx, failures, checkpoint_id, lost,
                   floor_memory_mb, covers) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                rusqlite::params![
                    stage,
                    r.span.start as i64,
                    r.span.end as i64,
                    r.failures,
                    r.checkpoint,
                    r.lost,
                    r.floor_memory_mb as i64,
                    json(&r.covers)
                ],
            )?;
        }
        let mut rest: IntervalSet = parse(&done, "stage done")?;
        let running: Vec<(i64, String)> = conn
            .prepare("SELECT id, acked FROM fragments WHERE stage_id = ?1 AND state = 'running'")?
            .query_map([stage], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        for (id, acked) in running {
            let acked: IntervalSet = parse(&acked, "fragment acks")?;
            rest.subtract(&acked);
            conn.execute(
                "UPDATE fragments SET done_count = ?2 WHERE id = ?1",
                rusqlite::params![id, acked.len() as i64],
            )?;
        }
        conn.execute(
            "UPDATE fragments SET acked = '[]' WHERE stage_id = ?1 AND state != 'running'",
            [stage],
        )?;
        let unconfirmed: IntervalSet = parse(&unconfirmed, "stage unconfirmed")?;
        let confirmed = rest.difference(&unconfirmed);
        let waiting = rest.intersection(&unconfirmed);
        if !waiting.is_empty() {
            // Its finished fragments were all-or-nothing: the stage's first ack
            // reverts them (their results too), as it did before.
            conn.execute(
                "UPDATE fragments SET unconfirmed = 1 WHERE stage_id = ?1 AND state = 'done'",
                [stage],
            )?;
        }
        for (slot, items) in [(0, confirmed), (1, waiting)] {
            if items.is_empty() {
                continue;
            }
            conn.execute(
                "INSERT INTO fragments (id, stage_id, start_idx, end_idx, state, worker, class,
                   lease_expires_ms, failures, n, predicted_ms, size_cap, claimed_ms, acked,
                   done_count, unconfirmed)
                 SELECT ?1, ?2, 0, items, 'migrated', '', '', 0, 0, 0, 0, 'bounds', 0, ?3, ?4, ?5
                 FROM stages WHERE id = ?2",
                rusqlite::params![
                    -(stage * 2 + slot),
                    stage,
                    json(&items),
                    items.len() as i64,
                    slot
                ],
            )?;
        }
    }
    conn.execute_batch(ROW_LAYOUT_AFTER)?;
    Ok(())
}

/// A transaction of the store: statements said SQLite's way, prepared once.
struct SqliteTx<'a> {
    conn: &'a Connection,
    dialect: &'a mut HashMap<String, String>,
    plans: &'a mut Plans,
}

impl SqliteTx<'_> {
    fn statement(&mut self, sql: &str) -> Result<rusqlite::CachedStatement<'_>> {
        let text = self
            .dialect
            .entry(sql.to_string())
            .or_insert_with(|| sqlite_dialect(sql));
        Ok(self.conn.prepare_cached(text)?)
    }
}

fn value(v: ValueRef<'_>) -> Val {
    match v {
        ValueRef::Null => Val::Null,
        ValueRef::Integer(i) => Val::Int(i),
        ValueRef::Real(f) => Val::Real(f),
        ValueRef::Text(t) => Val::Text(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => Val::Bytes(b.to_vec()),
    }
}

impl Db for SqliteTx<'_> {
    fn query(&mut self, sql: &str, args: &[Arg<'_>]) -> Result<Vec<Row>> {
        let mut stmt = self.statement(sql)?;
        let width = stmt.column_count();
        let rows = stmt
            .query_map(params_from_iter(args.iter()), |r| {
                (0..width)
                    .map(|i| r.get_ref(i).map(value))
                    .collect::<rusqlite::Result<Vec<_>>>()
                    .map(Row)
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    fn execute(&mut self, sql: &str, args: &[Arg<'_>]) -> Result<u64> {
        let mut stmt = self.statement(sql)?;
        Ok(stmt.execute(params_from_iter(args.iter()))? as u64)
    }

    fn notify(&mut self) -> Result<()> {
        // Idle workers poll (`idle_poll`): a local claim is cheap.
        Ok(())
    }

    fn lease_clock(&self, local_ms: i64) -> i64 {
        // One file on one host: one clock.
        local_ms
    }

    fn plans(&mut self) -> &mut Plans {
        self.plans
    }
}

impl rusqlite::ToSql for Arg<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match *self {
            Arg::Null => ToSqlOutput::Owned(Value::Null),
            Arg::Int(v) => ToSqlOutput::Owned(Value::Integer(v)),
            Arg::Real(v) => ToSqlOutput::Owned(Value::Real(v)),
            Arg::Bool(v) => ToSqlOutput::Owned(Value::Integer(v.into())),
            Arg::Text(v) => ToSqlOutput::Borrowed(ValueRef::Text(v.as_bytes())),
            Arg::Bytes(v) => ToSqlOutput::Borrowed(ValueRef::Blob(v)),
            // `= ANY($n)` reads them with `json_each` (see `sqlite_dialect`).
            Arg::Ints(v) => ToSqlOutput::Owned(Value::Text(json(&v))),
            Arg::Texts(v) => ToSqlOutput::Owned(Value::Text(json(&v))),
        })
    }
}

impl Backend for SqliteStore {
    fn transaction<T>(
        &mut self,
        kind: TxKind,
        f: impl FnOnce(&mut dyn Db) -> Result<T>,
    ) -> Result<T> {
        let behavior = match kind {
            TxKind::Read => TransactionBehavior::Deferred,
            _ => TransactionBehavior::Immediate,
        };
        let before = self.conn.total_changes();
        let tx = self.conn.transaction_with_behavior(behavior)?;
        let value = f(&mut SqliteTx {
            conn: &tx,
            dialect: &mut self.dialect,
            plans: &mut self.plans,
        })?;
        tx.commit()?;
        let rows = self.conn.total_changes() - before;
        let w = &mut self.writes;
        let counted = match kind {
            TxKind::Claim => Some((&mut w.claims, &mut w.claim_rows)),
            TxKind::Flush => Some((&mut w.flushes, &mut w.flush_rows)),
            TxKind::Finish => Some((&mut w.finishes, &mut w.finish_rows)),
            TxKind::Read | TxKind::Write => None,
        };
        if let Some((calls, written)) = counted {
            *calls += 1;
            *written += rows;
        }
        Ok(value)
    }

    fn counted_writes(&self) -> Option<WriteCounts> {
        Some(self.writes.clone())
    }

    fn skips_locked_rows(&self) -> bool {
        // A transaction holds the whole database: nothing is ever skipped.
        false
    }

    fn wait(&mut self, timeout: Duration) -> Result<bool> {
        std::thread::sleep(timeout.min(self.poll_interval()));
        Ok(true)
    }

    fn poll_interval(&self) -> Duration {
        // A claim is a local transaction: polling is cheap.
        Duration::from_millis(100)
    }
}

store_over_backend!(SqliteStore);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Store;
    use granule_core::Span;

    /// Every table's columns (name, type, not null, default, key), foreign keys and
    /// AUTOINCREMENT, and every index, as text to compare.
    fn shape(conn: &Connection) -> Vec<String> {
        let mut out = Vec::new();
        let objects: Vec<(String, String, String)> = conn
            .prepare("SELECT type, name, coalesce(sql, '') FROM sqlite_master ORDER BY type, name")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        for (kind, name, sql) in objects {
            if kind == "index" {
                out.push(format!("index {name}: {sql}"));
                continue;
            }
            out.push(format!(
                "{kind} {name} autoincrement={}",
                sql.contains("AUTOINCREMENT")
            ));
            for pragma in ["table_info", "foreign_key_list"] {
                let mut stmt = conn.prepare(&format!("PRAGMA {pragma}({name})")).unwrap();
                let width = stmt.column_count();
                let rows: Vec<String> = stmt
                    .query_map([], |r| {
                        Ok((0..width)
                            .map(|i| format!("{:?}", r.get_ref(i).unwrap()))
                            .collect::<Vec<_>>()
                            .join(" "))
                    })
                    .unwrap()
                    .map(|r| r.unwrap())
                    .collect();
                out.extend(rows.into_iter().map(|row| format!("  {pragma}: {row}")));
            }
        }
        out
    }

    /// A new store, made from the current schema at once, is the store the
    /// migrations make one step at a time.
    #[test]
    fn the_current_schema_is_what_the_migrations_build() {
        let migrated = Connection::open_in_memory().unwrap();
        upgrade(&migrated, 0).unwrap();
        let fresh = Connection::open_in_memory().unwrap();
        fresh.execute_batch(CURRENT).unwrap();
        assert_eq!(shape(&fresh), shape(&migrated));
    }

    /// A store as schema 6 wrote it: two stages (one not known to ack, with items
    /// done all-or-nothing; one with a pending range that failed once), two running
    /// fragments and two checkpoints.
    fn write_schema_6_store(path: &Path) {
        let conn = Connection::open(path).unwrap();
        for sql in &MIGRATIONS[..6] {
            conn.execute_batch(sql).unwrap();
        }
        conn.execute_batch(
        "PRAGMA user_version = 6;
         INSERT INTO jobs (id, name, spec_hash, spec, state, created_ms)
             VALUES (1, 'j', 'h', '{}', 'running', 0);
         INSERT INTO stages (id, job_id, idx, name, items, after, retries,
             sizer_config, state, pending, done, quarantined)
             VALUES (1, 1, 0, 's', 30, '[]', 2, '{}', 'running',
                 '[{\"span\":{\"start\":20,\"end\":30},\"failures\":1,\"checkpoint\":null}]', '[]', '[]');
         INSERT INTO stages (id, job_id, idx, name, items, after, retries,
             sizer_config, state, pending, done, quarantined, acks)
             VALUES (2, 1, 1, 't', 10, '[]', 2, '{}', 'running', '[]', '[[0,4]]', '[]', 'no');
         INSERT INTO blobs (id, stage_id, fragment_id, kind, raw_len, hash, data,
             meta, created_ms, prev)
             VALUES (5, 1, 2, 'checkpoint', 0, 'w', X'', '{}', 0, NULL),
                    (7, 1, 3, 'checkpoint', 5, 'x', X'68656C6C6F', '{}', 0, 6);
         INSERT INTO fragments (id, stage_id, start_idx, end_idx, state, worker, class,
             lease_expires_ms, failures, acked, checkpoint_id, n, predicted_ms,
             size_cap, claimed_ms)
             VALUES (3, 1, 0, 10, 'running', 'w', 'default', 0, 0, '[[0,2]]', 7, 10, 1, '', 0),
                    (4, 1, 10, 20, 'running', 'w', 'default', 0, 0, '[[10,12]]', 5, 10, 1, '', 0),
                    (6, 2, 0, 4, 'done', 'w', 'default', 0, 0, '[]', 5, 4, 1, '', 0);",
    )
    .unwrap();
    }

    /// Migration 9 moves each stage's JSON ledger into rows: pending ranges keep
    /// their history, running fragments count their own acks, and all-or-nothing
    /// items of a stage not known to ack await its first ack on a `migrated` row.
    #[test]
    fn a_schema_6_store_moves_to_the_row_layout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("granule.db");
        write_schema_6_store(&path);
        let mut store = SqliteStore::open(&path).unwrap();
        let migrated = |stage: i64| -> Vec<(String, i64, i64)> {
            store
                .conn
                .prepare(
                    "SELECT acked, done_count, unconfirmed FROM fragments
                     WHERE stage_id = ?1 AND state = 'migrated' ORDER BY id DESC",
                )
                .unwrap()
                .query_map([stage], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .unwrap()
                .map(|r| r.unwrap())
                .collect()
        };
        assert_eq!(migrated(2), vec![("[[0,4]]".to_string(), 4, 1)]);
        // The all-or-nothing fragment that did them is reverted with them (and its
        // result dropped) at the stage's first ack.
        let unconfirmed: i64 = store
            .conn
            .query_row("SELECT unconfirmed FROM fragments WHERE id = 6", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(unconfirmed, 1);
        // A running fragment counts its own acks; nothing else of stage 1 was done.
        assert_eq!(migrated(1), vec![]);
        let counted: i64 = store
            .conn
            .query_row("SELECT done_count FROM fragments WHERE id = 3", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(counted, 2);
        // Accounting reads the stage's done items from the rows, and its pending
        // ranges keep their history.
        let acc = store.accounting("j", "t").unwrap();
        assert_eq!(acc.done.len(), 4);
        let acc = store.accounting("j", "s").unwrap();
        assert_eq!(
            acc.pending.spans().collect::<Vec<_>>(),
            vec![Span::new(20, 30)]
        );
        let failures: i64 = store
            .conn
            .query_row("SELECT failures FROM pending WHERE stage_id = 1", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(failures, 1);
    }

    /// A store written before migration 7 keeps its checkpoints through it, and the
    /// recreated blobs table never hands out an id it already used.
    #[test]
    fn checkpoints_survive_the_upgrade_to_protocol_2() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("granule.db");
        write_schema_6_store(&path);
        let mut store = SqliteStore::open(&path).unwrap();
        let kept = store.blob(7).unwrap().expect("blob 7 kept");
        assert_eq!(kept.row.data, b"hello");
        assert_eq!(kept.prev, Some(6));
        let stateful: i64 = store
            .conn
            .query_row("SELECT stateful FROM stages WHERE id = 1", [], |r| r.get(0))
            .unwrap();
        assert_eq!(stateful, 1, "a stage with checkpoints is known stateful");
        let text = |store: &SqliteStore, sql: &str| -> String {
            store.conn.query_row(sql, [], |r| r.get(0)).unwrap()
        };
        // Its own last checkpoint holds a running fragment's acks (as schema 6 took
        // it); one another fragment wrote is where it resumed, holding none of them.
        assert_eq!(
            text(&store, "SELECT covers FROM fragments WHERE id = 3"),
            "[[0,2]]"
        );
        let resumed = |id: i64| -> Option<i64> {
            store
                .conn
                .query_row(
                    "SELECT resumed_from FROM fragments WHERE id = ?1",
                    [id],
                    |r| r.get(0),
                )
                .unwrap()
        };
        assert_eq!((resumed(3), resumed(4)), (None, Some(5)));
        assert_eq!(
            text(&store, "SELECT covers FROM fragments WHERE id = 4"),
            "[]"
        );
        store
            .conn
            .execute("DELETE FROM blobs WHERE id = 7", [])
            .unwrap();
        store
            .conn
            .execute(
                "INSERT INTO blobs (stage_id, fragment_id, kind, raw_len, hash, data, meta,
                     created_ms) VALUES (1, 4, 'checkpoint', 0, 'y', X'', '{}', 0)",
                [],
            )
            .unwrap();
        assert_eq!(
            store.conn.last_insert_rowid(),
            8,
            "blob id 7 is never reused"
        );
    }
}
