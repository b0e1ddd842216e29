//! `granule submit`: record a spec in the store (and what `run` shares of it).

use super::{open_store, StateArg};
use crate::{host, BadInput, EXIT_DONE};
use anyhow::Result;
use granule_spec::JobSpec;
use granule_store::{NewJob, NewStage, Store, StoreError, Submitted};
use std::path::PathBuf;

#[derive(clap::Args)]
pub(crate) struct SubmitArgs {
    /// The job spec (TOML).
    spec: PathBuf,
    #[command(flatten)]
    state: StateArg,
    /// Discard the stored state of a job of the same name and start over.
    #[arg(long)]
    fresh: bool,
}

/// The store's view of a spec.
fn new_job(spec: &JobSpec) -> NewJob {
    let index = |name: &String| {
        spec.stages
            .iter()
            .position(|s| &s.name == name)
            .expect("validated")
    };
    NewJob {
        name: spec.name.clone(),
        spec_hash: granule_spec::job_hash(spec),
        spec_json: serde_json::to_string(spec).expect("plain data"),
        stages: spec
            .stages
            .iter()
            .map(|s| NewStage {
                name: s.name.clone(),
                items: s.items.count(),
                after: s.after.iter().chain(&s.after_any).map(index).collect(),
                after_any: s.after_any.iter().map(index).collect(),
                sources: match &s.items {
                    granule_spec::ItemsSpec::Stream { from, .. } => {
                        from.iter().map(index).collect()
                    }
                    _ => Vec::new(),
                },
                from_results: matches!(
                    s.items,
                    granule_spec::ItemsSpec::Stream { results: true, .. }
                ),
                retries: s.retries,
                sizer: s.sizer.clone(),
                needs: {
                    // Before any history, a stage without a declared class prefers
                    // the one its name and command suggest.
                    let mut needs = s.needs.clone();
                    if needs.class.is_none() {
                        needs.guess =
                            granule_core::guess_class(&s.name, &s.command).map(Into::into);
                    }
                    needs
                },
                cost_key: granule_spec::cost_key(s),
            })
            .collect(),
    }
}

/// Submits a job; a changed spec under an existing name is refused, naming an
/// items file that changed since the job was submitted when that is the change.
pub(crate) fn submit_job(store: &mut dyn Store, spec: &JobSpec, fresh: bool) -> Result<Submitted> {
    match store.submit(&new_job(spec), host::now_ms(), fresh) {
        Err(StoreError::SpecChanged(name)) => {
            let stored = store
                .job(&name)?
                .and_then(|r| serde_json::from_str::<JobSpec>(&r.spec_json).ok());
            let changed = stored.and_then(|old| changed_items_file(&old, spec));
            match changed {
                Some(path) => Err(BadInput(format!(
                    "job \"{name}\": items file {} changed since the job was submitted; restore it, or rerun with --fresh to start over with the new file",
                    path.display()
                ))
                .into()),
                None => Err(StoreError::SpecChanged(name).into()),
            }
        }
        other => Ok(other?),
    }
}

/// The first `lines` file whose content differs between two versions of a spec,
/// when nothing else differs.
fn changed_items_file(old: &JobSpec, new: &JobSpec) -> Option<std::path::PathBuf> {
    use granule_spec::ItemsSpec;
    if old.stages.len() != new.stages.len() {
        return None;
    }
    let mut changed = None;
    let mut unpinned = old.clone();
    for (o, n) in unpinned.stages.iter_mut().zip(&new.stages) {
        if let (ItemsSpec::Lines { path: op, .. }, ItemsSpec::Lines { path: np, .. }) =
            (&o.items, &n.items)
        {
            if op == np && o.items != n.items {
                changed.get_or_insert(np.clone());
                o.items = n.items.clone();
            }
        }
    }
    unpinned.name = new.name.clone();
    (unpinned == *new).then_some(changed).flatten()
}

/// Records the spec in the store without running it.
pub(crate) fn submit(args: SubmitArgs) -> Result<u8> {
    let spec = granule_spec::load(&args.spec)?;
    let mut store = open_store(&args.state)?;
    let what = match submit_job(store.as_mut(), &spec, args.fresh)? {
        Submitted::Created(_) => "submitted",
        Submitted::Resumed(_) => "already submitted, unfinished",
        Submitted::AlreadyFinished(_) => "already finished",
    };
    let items: u64 = spec.stages.iter().map(|s| s.items.count()).sum();
    eprintln!(
        "granule: job \"{}\" {what}: {}, {}",
        spec.name,
        super::plural(spec.stages.len() as u64, "stage"),
        super::plural(items, "item")
    );
    Ok(EXIT_DONE)
}
