//! `granule shares`: fair share between owners and accounts across jobs — set
//! their shares and the half-life of usage, and show each owner's standing.

use super::{open_existing_store, open_store, StateArg};
use crate::{host, BadInput, EXIT_DONE};
use anyhow::Result;
use granule_store::FairShare;

#[derive(clap::Args)]
pub(crate) struct SharesArgs {
    /// Shares to set, as NAME=SHARES (`ada=3 bob=1`): owners, or with --account accounts.
    #[arg(value_name = "NAME=SHARES")]
    set: Vec<String>,
    /// The names given are accounts, not owners.
    #[arg(long)]
    account: bool,
    /// How fast recorded usage fades: it halves every this long (default 10m).
    #[arg(long, value_parser = super::duration, value_name = "DURATION")]
    half_life: Option<std::time::Duration>,
    #[command(flatten)]
    state: StateArg,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

/// Sets what was given, then shows every owner's shares, usage and slots now.
pub(crate) fn shares(args: SharesArgs) -> Result<u8> {
    let parsed = args
        .set
        .iter()
        .map(|a| parse(a))
        .collect::<Result<Vec<_>, _>>()?;
    let writes = !parsed.is_empty() || args.half_life.is_some();
    let mut store = if writes {
        open_store(&args.state)?
    } else {
        open_existing_store(&args.state)?
    };
    for (name, shares) in &parsed {
        store.set_shares(args.account, name, *shares)?;
    }
    if let Some(h) = args.half_life {
        if h.is_zero() {
            return Err(BadInput("--half-life must be longer than 0".into()).into());
        }
        store.set_half_life(h.as_secs_f64() * 1000.0)?;
    }
    let fair = store.fair_share(host::now_ms())?;
    if args.json {
        println!("{}", serde_json::to_string(&fair)?);
    } else {
        print(&fair);
    }
    Ok(EXIT_DONE)
}

/// `NAME=SHARES`, checked.
fn parse(arg: &str) -> Result<(String, f64), BadInput> {
    let bad = |why: String| BadInput(format!("shares \"{arg}\": {why}"));
    let (name, value) = arg
        .split_once('=')
        .ok_or_else(|| bad("give NAME=SHARES, such as ada=3".into()))?;
    granule_spec::check_name(name).map_err(|why| bad(format!("the name {why}")))?;
    let shares: f64 = value
        .trim()
        .parse()
        .map_err(|_| bad(format!("\"{value}\" is not a number")))?;
    if !(shares.is_finite() && shares > 0.0) {
        return Err(bad("shares must be a number above 0".into()));
    }
    Ok((name.to_string(), shares))
}

/// Each owner a line: account, shares, recent usage, slots now.
pub(crate) fn print(fair: &FairShare) {
    println!(
        "fair share (usage halves every {}):",
        humantime::format_duration(std::time::Duration::from_secs(
            fair.half_life_s.round().max(1.0) as u64
        ))
    );
    if fair.owners.is_empty() {
        println!("  no owner has run anything or been given shares yet");
    }
    for o in &fair.owners {
        let account = match (&o.account, o.account_shares) {
            (Some(a), Some(s)) => format!(" (account {a}, {})", shares_of(s)),
            _ => String::new(),
        };
        println!(
            "  owner {}{account}: {}, {:.1} slot-s used lately, {} now",
            o.owner.as_deref().unwrap_or("-"),
            shares_of(o.shares),
            o.usage_s,
            crate::cmd::plural(o.slots, "slot")
        );
    }
}

/// `1 share`, `3 shares`, `0.5 shares`.
fn shares_of(x: f64) -> String {
    if x == 1.0 {
        "1 share".into()
    } else {
        format!("{x} shares")
    }
}
