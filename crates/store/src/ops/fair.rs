//! Fair share in the store: each owner's usage recorded as its fragments end, the
//! owners' turns read for a claim (core's `fair::turns`), and the shares and
//! half-life `granule shares` sets. Owners and accounts without a name are stored
//! as ''.

use super::{Backend, StageRow, TxKind};
use crate::common::parse;
use crate::db::{args, Db};
use crate::{FairShare, OwnerShare, Result, StageState};
use granule_core::fair::{self, OwnerKey, Standing, Usage, DEFAULT_HALF_LIFE_MS, DEFAULT_SHARES};
use granule_core::StageNeeds;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// The setting that holds the half-life, ms.
const HALF_LIFE: &str = "fair_half_life_ms";

fn stored(name: &Option<String>) -> &str {
    name.as_deref().unwrap_or("")
}

fn named(stored: String) -> Option<String> {
    (!stored.is_empty()).then_some(stored)
}

/// The half-life of usage: the store's setting, else the default.
fn half_life_ms(tx: &mut dyn Db) -> Result<f64> {
    Ok(tx
        .query_opt(
            "SELECT value FROM settings WHERE key = $1",
            args![HALF_LIFE],
        )?
        .and_then(|r| r.str(0).parse::<f64>().ok())
        .filter(|h| *h > 0.0)
        .unwrap_or(DEFAULT_HALF_LIFE_MS))
}

/// Adds to the usage of each `(stage, slot_ms)`'s owner, as of `now_ms` (fragments
/// of those stages ended having held a slot that long). Its own transaction, after
/// the one that ended them, locking usage rows only and in one order: usage is an
/// estimate, and a lock taken inside a finish (which goes on to claim) could close a
/// cycle with another finish's stage locks.
pub(crate) fn record_usage(b: &mut impl Backend, used: &[(i64, f64)], now_ms: i64) -> Result<()> {
    let used: Vec<(i64, f64)> = used.iter().copied().filter(|(_, ms)| *ms > 0.0).collect();
    if used.is_empty() {
        return Ok(());
    }
    b.transaction(TxKind::Write, |tx| {
        let half_life = half_life_ms(tx)?;
        let mut by_owner: BTreeMap<OwnerKey, f64> = BTreeMap::new();
        for (stage, ms) in &used {
            let row = tx.query_one("SELECT needs FROM stages WHERE id = $1", args![*stage])?;
            let needs: StageNeeds = parse(row.str(0), "stage needs")?;
            *by_owner.entry(needs.owner_key()).or_default() += ms;
        }
        for ((account, owner), ms) in &by_owner {
            let (account, owner) = (stored(account), stored(owner));
            let old = tx
                .query_opt(
                    "SELECT slot_ms, at_ms FROM usage WHERE account = $1 AND owner = $2 FOR UPDATE",
                    args![account, owner],
                )?
                .map(|r| Usage {
                    slot_ms: r.f64(0),
                    at_ms: r.i64(1),
                })
                .unwrap_or_default();
            let new = old.add(*ms, now_ms, half_life);
            tx.execute(
                "INSERT INTO usage (account, owner, slot_ms, at_ms) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (account, owner) DO UPDATE SET slot_ms = $3, at_ms = $4",
                args![account, owner, new.slot_ms, new.at_ms],
            )?;
        }
        Ok(())
    })
}

/// Each owner's and account's shares, usage decayed to `now_ms`, and the half-life.
struct Ledger {
    half_life_ms: f64,
    owner_shares: HashMap<String, f64>,
    account_shares: HashMap<String, f64>,
    usage: BTreeMap<OwnerKey, f64>,
}

fn ledger(tx: &mut dyn Db, now_ms: i64) -> Result<Ledger> {
    let half_life_ms = half_life_ms(tx)?;
    let (mut owner_shares, mut account_shares) = (HashMap::new(), HashMap::new());
    for r in tx.query("SELECT kind, name, shares FROM shares", args![])? {
        match r.str(0) {
            "account" => account_shares.insert(r.string(1), r.f64(2)),
            _ => owner_shares.insert(r.string(1), r.f64(2)),
        };
    }
    let usage = tx
        .query("SELECT account, owner, slot_ms, at_ms FROM usage", args![])?
        .iter()
        .map(|r| {
            let u = Usage {
                slot_ms: r.f64(2),
                at_ms: r.i64(3),
            };
            (
                (named(r.string(0)), named(r.string(1))),
                u.at(now_ms, half_life_ms),
            )
        })
        .collect();
    Ok(Ledger {
        half_life_ms,
        owner_shares,
        account_shares,
        usage,
    })
}

impl Ledger {
    fn owner_shares(&self, owner: &Option<String>) -> f64 {
        self.owner_shares
            .get(stored(owner))
            .copied()
            .unwrap_or(DEFAULT_SHARES)
    }

    fn account_shares(&self, account: &str) -> f64 {
        self.account_shares
            .get(account)
            .copied()
            .unwrap_or(DEFAULT_SHARES)
    }

    /// [`Ledger::standings`] by slots alone, usage left out: usage breaks ties
    /// between claims but never splits a fragment (two owners at their share would
    /// take a slot from each other every second).
    fn standings_by_slots(
        &self,
        running: &BTreeMap<OwnerKey, u64>,
    ) -> (BTreeMap<String, Standing>, BTreeMap<OwnerKey, Standing>) {
        let (mut accounts, mut owners) = self.standings(running);
        for s in accounts.values_mut().chain(owners.values_mut()) {
            s.usage_ms = 0.0;
        }
        (accounts, owners)
    }

    /// The standings of owners and accounts, given the slots each owner runs.
    fn standings(
        &self,
        running: &BTreeMap<OwnerKey, u64>,
    ) -> (BTreeMap<String, Standing>, BTreeMap<OwnerKey, Standing>) {
        let keys: BTreeSet<&OwnerKey> = running.keys().chain(self.usage.keys()).collect();
        let (mut accounts, mut owners) = (BTreeMap::new(), BTreeMap::new());
        for key in keys {
            let run = running.get(key).copied().unwrap_or(0);
            let used = self.usage.get(key).copied().unwrap_or(0.0);
            owners.insert(
                key.clone(),
                Standing {
                    shares: self.owner_shares(&key.1),
                    running: run,
                    usage_ms: used,
                },
            );
            let a = key.0.clone().unwrap_or_default();
            let s: &mut Standing = accounts.entry(a.clone()).or_insert_with(|| Standing {
                shares: self.account_shares(&a),
                ..Standing::default()
            });
            s.running += run;
            s.usage_ms += used;
        }
        (accounts, owners)
    }
}

/// Slots running now per owner, over the stages of running jobs.
fn running_by_owner(tx: &mut dyn Db) -> Result<BTreeMap<OwnerKey, u64>> {
    let rows = tx.query(
        "SELECT s.needs, count(*) FROM fragments f
           JOIN stages s ON s.id = f.stage_id
           JOIN jobs j ON j.id = s.job_id
         WHERE j.state = 'running' AND f.state = 'running'
         GROUP BY s.id, s.needs",
        args![],
    )?;
    let mut out = BTreeMap::new();
    for r in rows {
        let needs: StageNeeds = parse(r.str(0), "stage needs")?;
        *out.entry(needs.owner_key()).or_default() += r.u64(1);
    }
    Ok(out)
}

/// The owners' turns for a claim over `jobs` (core's `fair::turns`); `None` when
/// every unfinished stage has one owner: then there is nobody to be fair between.
pub(crate) fn turns(
    tx: &mut dyn Db,
    jobs: &[(i64, Vec<StageRow>)],
    now_ms: i64,
) -> Result<Option<BTreeMap<OwnerKey, u64>>> {
    let keys: BTreeSet<OwnerKey> = jobs
        .iter()
        .flat_map(|(_, stages)| stages.iter())
        .filter(|s| !s.is_done())
        .map(|s| s.needs.owner_key())
        .collect();
    if keys.len() <= 1 {
        return Ok(None);
    }
    let ledger = ledger(tx, now_ms)?;
    let running = running_by_owner(tx)?;
    let (accounts, owners) = ledger.standings(&running);
    let keys: Vec<OwnerKey> = keys.into_iter().collect();
    Ok(Some(fair::turns(&keys, &accounts, &owners)))
}

/// Sets the shares of an owner (`account`: false) or an account (> 0; the CLI checks).
pub(crate) fn set_shares(
    b: &mut impl Backend,
    account: bool,
    name: &str,
    shares: f64,
) -> Result<()> {
    let kind = if account { "account" } else { "owner" };
    b.transaction(TxKind::Write, |tx| {
        tx.execute(
            "INSERT INTO shares (kind, name, shares) VALUES ($1, $2, $3)
             ON CONFLICT (kind, name) DO UPDATE SET shares = $3",
            args![kind, name, shares],
        )?;
        Ok(())
    })
}

/// Sets the half-life of recorded usage, ms (> 0; the CLI checks).
pub(crate) fn set_half_life(b: &mut impl Backend, half_life_ms: f64) -> Result<()> {
    b.transaction(TxKind::Write, |tx| {
        let value = half_life_ms.to_string();
        tx.execute(
            "INSERT INTO settings (key, value) VALUES ($1, $2)
             ON CONFLICT (key) DO UPDATE SET value = $2",
            args![HALF_LIFE, value.as_str()],
        )?;
        Ok(())
    })
}

/// Every owner with shares set, usage or running work: shares, usage, slots now.
pub(crate) fn report(b: &mut impl Backend, now_ms: i64) -> Result<FairShare> {
    b.transaction(TxKind::Read, |tx| {
        let ledger = ledger(tx, now_ms)?;
        let running = running_by_owner(tx)?;
        let (_, owners) = ledger.standings(&running);
        let mut rows: Vec<OwnerShare> = owners
            .iter()
            .map(|(key, s)| OwnerShare {
                account: key.0.clone(),
                owner: key.1.clone(),
                shares: s.shares,
                account_shares: key.0.as_deref().map(|a| ledger.account_shares(a)),
                usage_s: s.usage_ms / 1000.0,
                slots: s.running,
            })
            .collect();
        // Owners with shares set and nothing used yet.
        for (name, shares) in &ledger.owner_shares {
            if !rows.iter().any(|r| stored(&r.owner) == name) {
                rows.push(OwnerShare {
                    account: None,
                    owner: named(name.clone()),
                    shares: *shares,
                    account_shares: None,
                    usage_s: 0.0,
                    slots: 0,
                });
            }
        }
        rows.sort_by(|a, b| (&a.account, &a.owner).cmp(&(&b.account, &b.owner)));
        Ok(FairShare {
            half_life_s: ledger.half_life_ms / 1000.0,
            owners: rows,
        })
    })
}

/// How often, per store connection, a flush looks for a fairness split.
const SPLIT_EVERY_MS: i64 = 500;

/// Restores the balance without preemption: when a slot of this worker, freed,
/// would go to another owner (one below its share, or with work of a higher
/// priority, that this worker's class may run), asks this worker to split the
/// fragment holding it right after what it has fed; the rest goes back to pending
/// and the slot's next claim follows the fair order. One fragment per look, at most
/// one look per [`SPLIT_EVERY_MS`] per connection.
pub(crate) fn split(tx: &mut dyn Db, worker: &str, now_ms: i64) -> Result<()> {
    if !tx.plans().fair_split_due(now_ms, SPLIT_EVERY_MS) {
        return Ok(());
    }
    // One read first: a store with one owner (most of them) looks no further.
    let needs = tx.query(
        "SELECT DISTINCT s.needs FROM stages s JOIN jobs j ON j.id = s.job_id
         WHERE j.state = 'running' AND s.state <> $1 AND s.state <> $2",
        args![StageState::Done.as_str(), StageState::Skipped.as_str()],
    )?;
    let mut owners_listed = BTreeSet::new();
    for r in &needs {
        owners_listed.insert(parse::<StageNeeds>(r.str(0), "stage needs")?.owner_key());
    }
    if owners_listed.len() < 2 {
        return Ok(());
    }
    // The unfinished stages of running jobs (read as the claim path reads them),
    // and whether each is ready.
    let mut stages = Vec::new();
    for (_, rows) in super::claim::running_stages(tx, None, now_ms)? {
        let finished: Vec<bool> = rows.iter().map(StageRow::is_done).collect();
        for s in rows.into_iter().filter(|s| !s.is_done()) {
            let ready = s
                .after
                .iter()
                .all(|&a| finished.get(a).copied().unwrap_or(true));
            stages.push((s, ready));
        }
    }
    let owners_seen: BTreeSet<OwnerKey> = stages.iter().map(|(s, _)| s.needs.owner_key()).collect();
    if owners_seen.len() < 2 {
        return Ok(());
    }
    let class = match tx.query_opt("SELECT class FROM workers WHERE id = $1", args![worker])? {
        Some(r) => r.string(0),
        None => return Ok(()),
    };
    // One read for which of the ready stages this class may run have pending work.
    let candidates: Vec<i64> = stages
        .iter()
        .filter(|(s, ready)| {
            *ready && !(s.needs.class_required && s.needs.class.as_deref() != Some(class.as_str()))
        })
        .map(|(s, _)| s.id)
        .collect();
    let with_pending: BTreeSet<i64> = tx
        .query(
            "SELECT DISTINCT stage_id FROM pending WHERE stage_id = ANY($1)",
            args![&candidates],
        )?
        .iter()
        .map(|r| r.i64(0))
        .collect();
    let mut waiting = BTreeMap::<OwnerKey, i64>::new();
    for (s, _) in stages.iter().filter(|(s, _)| with_pending.contains(&s.id)) {
        let top = waiting.entry(s.needs.owner_key()).or_insert(i64::MIN);
        *top = (*top).max(s.needs.priority);
    }
    if waiting.is_empty() {
        return Ok(());
    }
    let mine = tx.query(
        "SELECT f.id, s.needs, f.start_idx FROM fragments f JOIN stages s ON s.id = f.stage_id
         WHERE f.worker = $1 AND f.state = 'running' AND f.split_request IS NULL
         ORDER BY f.claimed_ms",
        args![worker],
    )?;
    if mine.is_empty() {
        return Ok(());
    }
    let ledger = ledger(tx, now_ms)?;
    // The owners the claim path ranks: those of every unfinished stage.
    let keys: Vec<OwnerKey> = owners_seen.into_iter().collect();
    // Slots as they will stand once the splits asked for already are done: each
    // freed slot given to the first owner with work waiting, as claims will (else
    // every worker's look would split again for the same missing slot).
    let mut running = running_by_owner(tx)?;
    let splitting = tx.query(
        "SELECT s.needs FROM fragments f JOIN stages s ON s.id = f.stage_id
         WHERE f.state = 'running' AND f.split_request IS NOT NULL",
        args![],
    )?;
    for r in &splitting {
        let needs: StageNeeds = parse(r.str(0), "stage needs")?;
        if let Some(n) = running.get_mut(&needs.owner_key()) {
            *n = n.saturating_sub(1);
        }
    }
    for _ in &splitting {
        let (accounts, owners) = ledger.standings_by_slots(&running);
        let ranked = fair::rank(&keys, &accounts, &owners);
        if let Some(first) = ranked.iter().find(|o| waiting.contains_key(&o.key)) {
            *running.entry(first.key.clone()).or_default() += 1;
        }
    }
    for r in &mine {
        let needs: StageNeeds = parse(r.str(1), "stage needs")?;
        let me = needs.owner_key();
        let higher = waiting
            .iter()
            .any(|(k, top)| *k != me && *top > needs.priority);
        let mut freed = running.clone();
        if let Some(n) = freed.get_mut(&me) {
            *n = n.saturating_sub(1);
        }
        let (accounts, owners) = ledger.standings_by_slots(&freed);
        let ranked = fair::rank(&keys, &accounts, &owners);
        // The first owner the freed slot could serve (its own tail goes back to
        // pending: this owner counts as waiting too).
        let first = ranked.iter().find(|o| {
            o.key == me
                || waiting
                    .get(&o.key)
                    .is_some_and(|top| *top >= needs.priority)
        });
        let mine_ranked = ranked.iter().find(|o| o.key == me);
        let fairer = match (first, mine_ranked) {
            (Some(f), Some(m)) => f.key != me && f.strictly_before(m),
            _ => false,
        };
        if higher || fairer {
            // At its first item: the worker cuts right after what it has fed.
            tx.execute(
                "UPDATE fragments SET split_request = $2
                 WHERE id = $1 AND state = 'running' AND split_request IS NULL",
                args![r.i64(0), r.i64(2)],
            )?;
            return Ok(());
        }
    }
    Ok(())
}
