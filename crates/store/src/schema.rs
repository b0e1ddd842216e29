//! Versioned schema migrations: `PRAGMA user_version` counts the ones applied.

/// Migrations in order; never edit one that has shipped, append a new one (and make
/// the same change to [`CURRENT`]).
pub(crate) const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE jobs (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    spec_hash TEXT NOT NULL,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    finished_ms INTEGER
);
CREATE TABLE stages (
    id INTEGER PRIMARY KEY,
    job_id INTEGER NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    name TEXT NOT NULL,
    items INTEGER NOT NULL,
    after TEXT NOT NULL,
    retries INTEGER NOT NULL,
    sizer_config TEXT NOT NULL,
    state TEXT NOT NULL,
    pending TEXT NOT NULL,
    done TEXT NOT NULL,
    done_count INTEGER NOT NULL DEFAULT 0,
    quarantined TEXT NOT NULL,
    acks TEXT NOT NULL DEFAULT 'unknown',
    last_n INTEGER NOT NULL DEFAULT 0,
    UNIQUE (job_id, idx)
);
CREATE TABLE sizers (
    stage_id INTEGER NOT NULL REFERENCES stages(id) ON DELETE CASCADE,
    class TEXT NOT NULL,
    state TEXT NOT NULL,
    PRIMARY KEY (stage_id, class)
);
CREATE TABLE workers (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    proc_start INTEGER NOT NULL,
    slots INTEGER NOT NULL,
    class TEXT NOT NULL,
    started_ms INTEGER NOT NULL,
    heartbeat_ms INTEGER NOT NULL
);
CREATE TABLE fragments (
    id INTEGER PRIMARY KEY,
    stage_id INTEGER NOT NULL REFERENCES stages(id) ON DELETE CASCADE,
    start_idx INTEGER NOT NULL,
    end_idx INTEGER NOT NULL,
    state TEXT NOT NULL,
    worker TEXT NOT NULL,
    class TEXT NOT NULL,
    lease_expires_ms INTEGER NOT NULL,
    failures INTEGER NOT NULL,
    acked TEXT NOT NULL DEFAULT '[]',
    checkpoint_id INTEGER,
    n INTEGER NOT NULL,
    predicted_ms REAL NOT NULL,
    size_cap TEXT NOT NULL,
    claimed_ms INTEGER NOT NULL,
    finished_ms INTEGER,
    observed_ms REAL,
    cpu_ms REAL,
    peak_rss_kb INTEGER,
    load REAL,
    fed INTEGER,
    acks INTEGER,
    cause TEXT,
    detail TEXT,
    stdout BLOB,
    stderr BLOB
);
CREATE INDEX fragments_by_state ON fragments (stage_id, state);
CREATE INDEX fragments_by_worker ON fragments (worker, state);
CREATE TABLE blobs (
    id INTEGER PRIMARY KEY,
    stage_id INTEGER NOT NULL REFERENCES stages(id) ON DELETE CASCADE,
    fragment_id INTEGER NOT NULL,
    kind TEXT NOT NULL,
    raw_len INTEGER NOT NULL,
    hash TEXT NOT NULL,
    data BLOB NOT NULL,
    meta TEXT NOT NULL,
    created_ms INTEGER NOT NULL
);
"#,
    // 2: workers with lifespans, splits, waste and checkpoint lineage.
    r#"
ALTER TABLE workers ADD COLUMN state TEXT NOT NULL DEFAULT 'running';
ALTER TABLE workers ADD COLUMN lifespan_end_ms INTEGER;
ALTER TABLE workers ADD COLUMN busy INTEGER NOT NULL DEFAULT 0;
ALTER TABLE workers ADD COLUMN free_memory REAL;
ALTER TABLE workers ADD COLUMN load REAL;
ALTER TABLE fragments ADD COLUMN split_request INTEGER;
ALTER TABLE fragments ADD COLUMN splits INTEGER NOT NULL DEFAULT 0;
ALTER TABLE fragments ADD COLUMN wasted_ms REAL NOT NULL DEFAULT 0;
ALTER TABLE fragments ADD COLUMN checkpoint_fallbacks INTEGER NOT NULL DEFAULT 0;
ALTER TABLE blobs ADD COLUMN prev INTEGER;
"#,
    // 3: workers describe themselves.
    r#"
ALTER TABLE workers ADD COLUMN cost REAL NOT NULL DEFAULT 0;
ALTER TABLE workers ADD COLUMN spot INTEGER NOT NULL DEFAULT 0;
ALTER TABLE workers ADD COLUMN resources TEXT NOT NULL DEFAULT '{}';
"#,
    // 4: what a stage's slots need, its class and priority.
    r#"
ALTER TABLE stages ADD COLUMN needs TEXT NOT NULL DEFAULT '{}';
"#,
    // 5: what placement keeps of a fragment's items' history (lost, out of memory).
    r#"
ALTER TABLE fragments ADD COLUMN lost INTEGER NOT NULL DEFAULT 0;
ALTER TABLE fragments ADD COLUMN floor_memory_mb INTEGER NOT NULL DEFAULT 0;
"#,
    // 6: block I/O of a fragment's task, for the stage's profile.
    r#"
ALTER TABLE fragments ADD COLUMN io_bytes INTEGER NOT NULL DEFAULT 0;
"#,
    // 7: exact at the task boundary: all-or-nothing items a first ack reverts, the
    // state each checkpoint and running fragment covers, chain results, jobs that
    // stop with an error. Blob ids are never reused (AUTOINCREMENT): a range that
    // names a deleted checkpoint must never resume from another one's state. The
    // table is copied aside rather than renamed: a rename reparses the whole schema
    // and more than doubles SQLite's peak memory on every fresh database.
    r#"
ALTER TABLE stages ADD COLUMN unconfirmed TEXT NOT NULL DEFAULT '[]';
ALTER TABLE stages ADD COLUMN stateful INTEGER NOT NULL DEFAULT 0;
ALTER TABLE stages ADD COLUMN stateless_done TEXT NOT NULL DEFAULT '[]';
UPDATE stages SET stateful = 1 WHERE id IN (SELECT stage_id FROM blobs);
ALTER TABLE fragments ADD COLUMN covers TEXT NOT NULL DEFAULT '[]';
ALTER TABLE fragments ADD COLUMN inherited TEXT NOT NULL DEFAULT '[]';
ALTER TABLE fragments ADD COLUMN resumed_from INTEGER;
ALTER TABLE fragments ADD COLUMN result INTEGER;
ALTER TABLE fragments ADD COLUMN state_reruns INTEGER NOT NULL DEFAULT 0;
ALTER TABLE fragments ADD COLUMN results_missing INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN error TEXT;
CREATE TABLE blobs_v6 AS SELECT * FROM blobs;
DROP TABLE blobs;
CREATE TABLE blobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    stage_id INTEGER NOT NULL REFERENCES stages(id) ON DELETE CASCADE,
    fragment_id INTEGER NOT NULL,
    kind TEXT NOT NULL,
    raw_len INTEGER NOT NULL,
    hash TEXT NOT NULL,
    data BLOB NOT NULL,
    meta TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    prev INTEGER,
    covers TEXT NOT NULL DEFAULT '[]'
);
INSERT INTO blobs (id, stage_id, fragment_id, kind, raw_len, hash, data, meta, created_ms, prev)
    SELECT id, stage_id, fragment_id, kind, raw_len, hash, data, meta, created_ms, prev FROM blobs_v6;
DROP TABLE blobs_v6;
UPDATE fragments SET result = checkpoint_id WHERE state = 'done' AND checkpoint_id IS NOT NULL;
-- What schema 6 knew, said the new way. All-or-nothing items of a stage not yet
-- known to ack are unconfirmed, and items of a stage without checkpoints have no
-- state. A running fragment's checkpoint_id was the last one it restored or wrote:
-- one another fragment wrote is what it resumed from (its own acks not in it); one
-- it wrote itself holds its acks so far (schema 6 took it so).
UPDATE stages SET unconfirmed = done WHERE acks != 'yes';
UPDATE stages SET stateless_done = done WHERE stateful = 0;
UPDATE fragments SET resumed_from = checkpoint_id WHERE state = 'running'
    AND checkpoint_id IN (SELECT b.id FROM blobs b WHERE b.fragment_id != fragments.id);
UPDATE fragments SET covers = acked WHERE state = 'running'
    AND checkpoint_id IN (SELECT b.id FROM blobs b WHERE b.fragment_id = fragments.id);
"#,
    // 8: a fragment its worker has confirmed holding follows the worker's lease (one
    // row per heartbeat, not one per fragment); where a worker's pids mean something.
    r#"
ALTER TABLE workers ADD COLUMN lease_until_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE workers ADD COLUMN locality TEXT NOT NULL DEFAULT '';
"#,
];

/// Migration 9, first half: pending items become rows of ranges and done items are
/// counted on the fragment rows that did them, the layout the PostgreSQL store has
/// always had (both now run the same transitions, `ops`). Between the halves the
/// stage rows' JSON ledgers are moved into rows (`sqlite::to_row_layout`).
pub(crate) const ROW_LAYOUT_BEFORE: &str = r#"
CREATE TABLE pending (
    id INTEGER PRIMARY KEY,
    stage_id INTEGER NOT NULL REFERENCES stages(id) ON DELETE CASCADE,
    start_idx INTEGER NOT NULL,
    end_idx INTEGER NOT NULL,
    failures INTEGER NOT NULL,
    checkpoint_id INTEGER,
    lost INTEGER NOT NULL DEFAULT 0,
    floor_memory_mb INTEGER NOT NULL DEFAULT 0,
    covers TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX pending_by_stage ON pending (stage_id, start_idx);
ALTER TABLE fragments ADD COLUMN done_count INTEGER NOT NULL DEFAULT 0;
ALTER TABLE fragments ADD COLUMN unconfirmed INTEGER NOT NULL DEFAULT 0;
"#;

/// Migration 9, second half: the stage rows' ledger columns, now moved into rows.
pub(crate) const ROW_LAYOUT_AFTER: &str = r#"
ALTER TABLE stages DROP COLUMN pending;
ALTER TABLE stages DROP COLUMN done;
ALTER TABLE stages DROP COLUMN done_count;
ALTER TABLE stages DROP COLUMN last_n;
ALTER TABLE stages DROP COLUMN unconfirmed;
ALTER TABLE stages DROP COLUMN stateless_done;
"#;

/// The schema version the row layout (migration 9) makes.
pub(crate) const ROW_LAYOUT_VERSION: usize = MIGRATIONS.len() + 1;

/// Migrations after the row layout, in order (10, 11, ..); never edit one that has
/// shipped, append a new one (and make the same change to [`CURRENT`]).
pub(crate) const LATER: &[&str] = &[
    // 10: costs learned per task and class outlive the stage that learned them, so
    // a rerun or a new job of the same command does not slow-start again.
    r#"
ALTER TABLE stages ADD COLUMN cost_key TEXT NOT NULL DEFAULT '';
CREATE TABLE learned (
    cost_key TEXT NOT NULL,
    class TEXT NOT NULL,
    sizer TEXT NOT NULL,
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (cost_key, class)
);
"#,
    // 11: stages that feed stages: outputs published when their items' acks commit,
    // the items of streamed stages, afterany.
    r#"
ALTER TABLE stages ADD COLUMN sources TEXT NOT NULL DEFAULT '[]';
ALTER TABLE stages ADD COLUMN from_results INTEGER NOT NULL DEFAULT 0;
ALTER TABLE stages ADD COLUMN after_any TEXT NOT NULL DEFAULT '[]';
ALTER TABLE stages ADD COLUMN published INTEGER NOT NULL DEFAULT 0;
ALTER TABLE stages ADD COLUMN results_published INTEGER NOT NULL DEFAULT 0;
CREATE TABLE outputs (
    id INTEGER PRIMARY KEY,
    stage_id INTEGER NOT NULL REFERENCES stages(id) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    start_idx INTEGER NOT NULL,
    end_idx INTEGER NOT NULL,
    fragment_id INTEGER NOT NULL,
    data BLOB NOT NULL
);
CREATE INDEX outputs_by_stage ON outputs (stage_id, kind, start_idx);
CREATE TABLE feeds (
    stage_id INTEGER NOT NULL REFERENCES stages(id) ON DELETE CASCADE,
    start_idx INTEGER NOT NULL,
    end_idx INTEGER NOT NULL,
    src_stage INTEGER NOT NULL,
    src_start INTEGER NOT NULL
);
CREATE INDEX feeds_by_stage ON feeds (stage_id, start_idx);
"#,
    // 12: `granule serve`: each worker names the allocation a provider started it
    // in, and each pool's last decision and launch error are kept for `status`.
    r#"
ALTER TABLE workers ADD COLUMN allocation TEXT;
CREATE TABLE pools (
    name TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    updated_ms INTEGER NOT NULL
);
"#,
    // 13: how long each claim's transaction took in the store (`/metrics`).
    r#"
ALTER TABLE fragments ADD COLUMN claim_us INTEGER;
"#, // 14: fair share across jobs: shares per owner and account, each owner's recent
    // usage (decayed slot-ms; '' for none), and store-wide settings (the half-life).
    r#"
CREATE TABLE shares (
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    shares REAL NOT NULL,
    PRIMARY KEY (kind, name)
);
CREATE TABLE usage (
    account TEXT NOT NULL,
    owner TEXT NOT NULL,
    slot_ms REAL NOT NULL,
    at_ms INTEGER NOT NULL,
    PRIMARY KEY (account, owner)
);
CREATE TABLE settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"#,
];

/// The schema version [`CURRENT`] is: the SQL migrations, the row layout and the
/// later migrations.
pub(crate) const VERSION: usize = ROW_LAYOUT_VERSION + LATER.len();

/// The schema all of [`MIGRATIONS`] build, created at once in a new store: replaying
/// them (a dozen `ALTER TABLE`s, a table copied) costs a fresh store memory and time
/// for nothing. A test holds the two to the same tables, columns and indexes.
pub(crate) const CURRENT: &str = r#"
CREATE TABLE jobs (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    spec_hash TEXT NOT NULL,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    finished_ms INTEGER,
    error TEXT
);
CREATE TABLE stages (
    id INTEGER PRIMARY KEY,
    job_id INTEGER NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    name TEXT NOT NULL,
    items INTEGER NOT NULL,
    after TEXT NOT NULL,
    retries INTEGER NOT NULL,
    sizer_config TEXT NOT NULL,
    state TEXT NOT NULL,
    quarantined TEXT NOT NULL,
    acks TEXT NOT NULL DEFAULT 'unknown',
    needs TEXT NOT NULL DEFAULT '{}',
    stateful INTEGER NOT NULL DEFAULT 0,
    cost_key TEXT NOT NULL DEFAULT '',
    sources TEXT NOT NULL DEFAULT '[]',
    from_results INTEGER NOT NULL DEFAULT 0,
    after_any TEXT NOT NULL DEFAULT '[]',
    published INTEGER NOT NULL DEFAULT 0,
    results_published INTEGER NOT NULL DEFAULT 0,
    UNIQUE (job_id, idx)
);
CREATE TABLE learned (
    cost_key TEXT NOT NULL,
    class TEXT NOT NULL,
    sizer TEXT NOT NULL,
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (cost_key, class)
);
CREATE TABLE pending (
    id INTEGER PRIMARY KEY,
    stage_id INTEGER NOT NULL REFERENCES stages(id) ON DELETE CASCADE,
    start_idx INTEGER NOT NULL,
    end_idx INTEGER NOT NULL,
    failures INTEGER NOT NULL,
    checkpoint_id INTEGER,
    lost INTEGER NOT NULL DEFAULT 0,
    floor_memory_mb INTEGER NOT NULL DEFAULT 0,
    covers TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX pending_by_stage ON pending (stage_id, start_idx);
CREATE TABLE sizers (
    stage_id INTEGER NOT NULL REFERENCES stages(id) ON DELETE CASCADE,
    class TEXT NOT NULL,
    state TEXT NOT NULL,
    PRIMARY KEY (stage_id, class)
);
CREATE TABLE workers (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    proc_start INTEGER NOT NULL,
    slots INTEGER NOT NULL,
    class TEXT NOT NULL,
    started_ms INTEGER NOT NULL,
    heartbeat_ms INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'running',
    lifespan_end_ms INTEGER,
    busy INTEGER NOT NULL DEFAULT 0,
    free_memory REAL,
    load REAL,
    cost REAL NOT NULL DEFAULT 0,
    spot INTEGER NOT NULL DEFAULT 0,
    resources TEXT NOT NULL DEFAULT '{}',
    lease_until_ms INTEGER NOT NULL DEFAULT 0,
    locality TEXT NOT NULL DEFAULT '',
    allocation TEXT
);
CREATE TABLE fragments (
    id INTEGER PRIMARY KEY,
    stage_id INTEGER NOT NULL REFERENCES stages(id) ON DELETE CASCADE,
    start_idx INTEGER NOT NULL,
    end_idx INTEGER NOT NULL,
    state TEXT NOT NULL,
    worker TEXT NOT NULL,
    class TEXT NOT NULL,
    lease_expires_ms INTEGER NOT NULL,
    failures INTEGER NOT NULL,
    acked TEXT NOT NULL DEFAULT '[]',
    checkpoint_id INTEGER,
    n INTEGER NOT NULL,
    predicted_ms REAL NOT NULL,
    size_cap TEXT NOT NULL,
    claimed_ms INTEGER NOT NULL,
    finished_ms INTEGER,
    observed_ms REAL,
    cpu_ms REAL,
    peak_rss_kb INTEGER,
    load REAL,
    fed INTEGER,
    acks INTEGER,
    cause TEXT,
    detail TEXT,
    stdout BLOB,
    stderr BLOB,
    split_request INTEGER,
    splits INTEGER NOT NULL DEFAULT 0,
    wasted_ms REAL NOT NULL DEFAULT 0,
    checkpoint_fallbacks INTEGER NOT NULL DEFAULT 0,
    lost INTEGER NOT NULL DEFAULT 0,
    floor_memory_mb INTEGER NOT NULL DEFAULT 0,
    io_bytes INTEGER NOT NULL DEFAULT 0,
    covers TEXT NOT NULL DEFAULT '[]',
    inherited TEXT NOT NULL DEFAULT '[]',
    resumed_from INTEGER,
    result INTEGER,
    state_reruns INTEGER NOT NULL DEFAULT 0,
    results_missing INTEGER NOT NULL DEFAULT 0,
    done_count INTEGER NOT NULL DEFAULT 0,
    unconfirmed INTEGER NOT NULL DEFAULT 0,
    claim_us INTEGER
);
CREATE INDEX fragments_by_state ON fragments (stage_id, state);
CREATE INDEX fragments_by_worker ON fragments (worker, state);
CREATE TABLE blobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    stage_id INTEGER NOT NULL REFERENCES stages(id) ON DELETE CASCADE,
    fragment_id INTEGER NOT NULL,
    kind TEXT NOT NULL,
    raw_len INTEGER NOT NULL,
    hash TEXT NOT NULL,
    data BLOB NOT NULL,
    meta TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    prev INTEGER,
    covers TEXT NOT NULL DEFAULT '[]'
);
CREATE TABLE outputs (
    id INTEGER PRIMARY KEY,
    stage_id INTEGER NOT NULL REFERENCES stages(id) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    start_idx INTEGER NOT NULL,
    end_idx INTEGER NOT NULL,
    fragment_id INTEGER NOT NULL,
    data BLOB NOT NULL
);
CREATE INDEX outputs_by_stage ON outputs (stage_id, kind, start_idx);
CREATE TABLE feeds (
    stage_id INTEGER NOT NULL REFERENCES stages(id) ON DELETE CASCADE,
    start_idx INTEGER NOT NULL,
    end_idx INTEGER NOT NULL,
    src_stage INTEGER NOT NULL,
    src_start INTEGER NOT NULL
);
CREATE INDEX feeds_by_stage ON feeds (stage_id, start_idx);
CREATE TABLE pools (
    name TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE TABLE shares (
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    shares REAL NOT NULL,
    PRIMARY KEY (kind, name)
);
CREATE TABLE usage (
    account TEXT NOT NULL,
    owner TEXT NOT NULL,
    slot_ms REAL NOT NULL,
    at_ms INTEGER NOT NULL,
    PRIMARY KEY (account, owner)
);
CREATE TABLE settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"#;
