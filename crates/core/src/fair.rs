//! Fair share between owners, and the accounts above them, across every unfinished
//! job. Each owner (and account) has `shares`; its standing is the slots it runs now
//! per share, then its recent usage (slot-ms with exponential decay) per share. A
//! free slot serves the best-standing owner with ready work, after priority: so
//! owners of equal priority hold slots in proportion to their shares, and of two
//! owners at their share, the one that used less lately goes first. Running work is
//! never preempted; new claims restore the balance. The store's claim path and the
//! simulator both rank owners here.

use std::collections::BTreeMap;

/// Half-life of recorded usage unless the store's setting says otherwise.
pub const DEFAULT_HALF_LIFE_MS: f64 = 10.0 * 60_000.0;

/// Shares of an owner or account nobody set.
pub const DEFAULT_SHARES: f64 = 1.0;

/// Recent usage, slot-ms, decayed: `slot_ms` as of `at_ms`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Usage {
    /// Slot-ms used, as of `at_ms`.
    pub slot_ms: f64,
    /// When `slot_ms` was last brought up to date, unix ms.
    pub at_ms: i64,
}

impl Usage {
    /// The usage decayed to `now_ms` with `half_life_ms`.
    pub fn at(&self, now_ms: i64, half_life_ms: f64) -> f64 {
        let age = (now_ms - self.at_ms).max(0) as f64;
        if half_life_ms <= 0.0 {
            return if age > 0.0 { 0.0 } else { self.slot_ms };
        }
        self.slot_ms * 0.5f64.powf(age / half_life_ms)
    }

    /// This usage with `slot_ms` more, used up to `now_ms`.
    pub fn add(&self, slot_ms: f64, now_ms: i64, half_life_ms: f64) -> Usage {
        Usage {
            slot_ms: self.at(now_ms, half_life_ms) + slot_ms.max(0.0),
            at_ms: now_ms.max(self.at_ms),
        }
    }
}

/// Who work is for: an owner, within an optional account. `None` owners form one
/// owner (shown as `-`).
pub type OwnerKey = (Option<String>, Option<String>);

/// What the ranking knows of one owner or account.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Standing {
    /// Its shares (> 0).
    pub shares: f64,
    /// Slots it runs now.
    pub running: u64,
    /// Recent usage, slot-ms, decayed to now.
    pub usage_ms: f64,
}

impl Standing {
    fn shares(&self) -> f64 {
        if self.shares > 0.0 {
            self.shares
        } else {
            DEFAULT_SHARES
        }
    }
}

/// Sort keys of the contenders of one level (accounts, or the owners of one
/// account), smaller first: how far the slots each runs stand above its quota of
/// the slots all of them run plus the one being given (slots - (all + 1) x share /
/// all shares; the quota method, so each stays within one slot of its
/// entitlement), then its usage per share.
fn level_keys<'a, K: Ord + Clone>(
    level: impl Iterator<Item = (K, &'a Standing)>,
) -> BTreeMap<K, (f64, f64)> {
    let level: BTreeMap<K, &Standing> = level.collect();
    let slots: u64 = level.values().map(|s| s.running).sum();
    let shares: f64 = level.values().map(|s| s.shares()).sum();
    level
        .into_iter()
        .map(|(k, s)| {
            let quota = (slots + 1) as f64 * s.shares() / shares;
            (k, (s.running as f64 - quota, s.usage_ms / s.shares()))
        })
        .collect()
}

/// One owner in the fair order: its key, its account's (quota, usage) key and its
/// own within the account. Smaller keys go first.
#[derive(Clone, Debug, PartialEq)]
pub struct Ranked {
    /// The owner.
    pub key: OwnerKey,
    /// Its account's slots above quota, and usage per share.
    pub account: (f64, f64),
    /// Its own slots above quota within the account, and usage per share.
    pub owner: (f64, f64),
}

impl Ranked {
    /// Whether this owner stands strictly before `other` by slots against quota
    /// alone (not usage, not names): what justifies taking a slot from `other`.
    pub fn strictly_before(&self, other: &Ranked) -> bool {
        const EPS: f64 = 1e-9;
        if self.account.0 < other.account.0 - EPS {
            return true;
        }
        if self.account.0 > other.account.0 + EPS || self.key.0 != other.key.0 {
            return false;
        }
        self.owner.0 < other.owner.0 - EPS
    }
}

/// The owners (with their accounts) in the order free slots should serve them:
/// accounts by standing, then owners within the account by standing; ties by name.
/// `accounts` (owners without one: the account "") and `owners` hold the standings;
/// an account or owner missing from them stands at nothing used, default shares.
pub fn rank(
    keys: &[OwnerKey],
    accounts: &BTreeMap<String, Standing>,
    owners: &BTreeMap<OwnerKey, Standing>,
) -> Vec<Ranked> {
    let none = Standing {
        shares: DEFAULT_SHARES,
        ..Standing::default()
    };
    let account_of = |k: &OwnerKey| k.0.clone().unwrap_or_default();
    let names: std::collections::BTreeSet<String> = keys.iter().map(account_of).collect();
    let account_keys = level_keys(
        names
            .iter()
            .map(|a| (a.clone(), accounts.get(a).unwrap_or(&none))),
    );
    let mut ranked = Vec::new();
    for account in &names {
        let members = keys.iter().filter(|k| account_of(k) == *account);
        let owner_keys = level_keys(members.map(|k| (k, owners.get(k).unwrap_or(&none))));
        for (k, key) in owner_keys {
            ranked.push(Ranked {
                key: k.clone(),
                account: account_keys[account],
                owner: key,
            });
        }
    }
    let by = |x: (f64, f64), y: (f64, f64)| x.0.total_cmp(&y.0).then(x.1.total_cmp(&y.1));
    ranked.sort_by(|a, b| {
        by(a.account, b.account)
            .then_with(|| account_of(&a.key).cmp(&account_of(&b.key)))
            .then_with(|| by(a.owner, b.owner))
            .then_with(|| a.key.cmp(&b.key))
    });
    ranked
}

/// Each owner's turn in [`rank`]'s order (0 first).
pub fn turns(
    keys: &[OwnerKey],
    accounts: &BTreeMap<String, Standing>,
    owners: &BTreeMap<OwnerKey, Standing>,
) -> BTreeMap<OwnerKey, u64> {
    rank(keys, accounts, owners)
        .into_iter()
        .enumerate()
        .map(|(i, r)| (r.key, i as u64))
        .collect()
}

/// Usage per owner and per account, kept as a running ledger: the simulator's
/// bookkeeping of what the store keeps in its `owners` table.
#[derive(Clone, Debug, Default)]
pub struct UsageLedger {
    /// Per owner (within its account).
    pub owners: BTreeMap<OwnerKey, Usage>,
    /// Per account ("" for owners without one).
    pub accounts: BTreeMap<String, Usage>,
}

impl UsageLedger {
    /// Records `slot_ms` of use by `owner` ending at `now_ms`.
    pub fn add(&mut self, owner: &OwnerKey, slot_ms: f64, now_ms: i64, half_life_ms: f64) {
        let u = self.owners.entry(owner.clone()).or_default();
        *u = u.add(slot_ms, now_ms, half_life_ms);
        let u = self
            .accounts
            .entry(owner.0.clone().unwrap_or_default())
            .or_default();
        *u = u.add(slot_ms, now_ms, half_life_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(account: Option<&str>, owner: &str) -> OwnerKey {
        (account.map(Into::into), Some(owner.into()))
    }

    fn standing(shares: f64, running: u64, usage_ms: f64) -> Standing {
        Standing {
            shares,
            running,
            usage_ms,
        }
    }

    #[test]
    fn usage_halves_every_half_life_and_adds_up() {
        let u = Usage {
            slot_ms: 1000.0,
            at_ms: 0,
        };
        assert!((u.at(60_000, 60_000.0) - 500.0).abs() < 1e-9);
        assert!((u.at(120_000, 60_000.0) - 250.0).abs() < 1e-9);
        let v = u.add(100.0, 60_000, 60_000.0);
        assert!((v.slot_ms - 600.0).abs() < 1e-9);
        assert_eq!(v.at_ms, 60_000);
        // A clock that went back never grows usage.
        assert!((v.at(0, 60_000.0) - 600.0).abs() < 1e-9);
    }

    #[test]
    fn an_owner_that_used_little_lately_goes_first_at_equal_slots() {
        let (ada, bob) = (key(None, "ada"), key(None, "bob"));
        let owners = BTreeMap::from([
            (ada.clone(), standing(1.0, 2, 50_000.0)),
            (bob.clone(), standing(1.0, 2, 1_000.0)),
        ]);
        let t = turns(&[ada.clone(), bob.clone()], &BTreeMap::new(), &owners);
        assert!(t[&bob] < t[&ada]);
    }

    #[test]
    fn accounts_come_before_owners() {
        // physics runs 3 slots over two owners, bio 1: bio's owner goes first even
        // though a physics owner runs fewer slots than it.
        let (p1, p2, b1) = (
            key(Some("physics"), "p1"),
            key(Some("physics"), "p2"),
            key(Some("bio"), "b1"),
        );
        let accounts = BTreeMap::from([
            ("physics".to_string(), standing(1.0, 3, 0.0)),
            ("bio".to_string(), standing(1.0, 1, 0.0)),
        ]);
        let owners = BTreeMap::from([
            (p1.clone(), standing(1.0, 3, 0.0)),
            (p2.clone(), standing(1.0, 0, 0.0)),
            (b1.clone(), standing(1.0, 1, 0.0)),
        ]);
        let t = turns(&[p1.clone(), p2.clone(), b1.clone()], &accounts, &owners);
        assert_eq!((t[&b1], t[&p2], t[&p1]), (0, 1, 2));
    }

    #[test]
    fn only_a_whole_slot_below_quota_justifies_taking_a_slot() {
        let (ada, bob) = (key(None, "ada"), key(None, "bob"));
        let ranked = |a: u64, b: u64| {
            let owners = BTreeMap::from([
                (ada.clone(), standing(1.0, a, 0.0)),
                (bob.clone(), standing(1.0, b, 500.0)),
            ]);
            rank(&[ada.clone(), bob.clone()], &BTreeMap::new(), &owners)
        };
        // 3 slots, one of ada's freed: 1 against 1 is a tie, not a reason.
        let r = ranked(1, 1);
        assert!(!r[0].strictly_before(&r[1]) && !r[1].strictly_before(&r[0]));
        // 4 slots all ada's, one freed: 3 against 0.
        let r = ranked(3, 0);
        assert_eq!(r[0].key, bob);
        assert!(r[0].strictly_before(&r[1]));
    }

    proptest! {
        /// Serving the first turn, one slot at a time, gives owners slots in
        /// proportion to their shares (within one slot).
        #[test]
        fn slots_follow_shares(shares in proptest::collection::vec(1u32..5, 2..5), slots in 1u64..60) {
            let keys: Vec<OwnerKey> = (0..shares.len()).map(|i| key(None, &format!("o{i}"))).collect();
            let mut running = vec![0u64; shares.len()];
            for _ in 0..slots {
                let owners = keys.iter().zip(&running).zip(&shares)
                    .map(|((k, &r), &s)| (k.clone(), standing(s as f64, r, 0.0)))
                    .collect();
                let t = turns(&keys, &BTreeMap::new(), &owners);
                let first = keys.iter().position(|k| t[k] == 0).unwrap();
                running[first] += 1;
            }
            let total: u32 = shares.iter().sum();
            for (r, s) in running.iter().zip(&shares) {
                let entitled = slots as f64 * *s as f64 / total as f64;
                prop_assert!((*r as f64 - entitled).abs() <= 1.0 + 1e-9, "{running:?} for shares {shares:?}");
            }
        }
    }
}
