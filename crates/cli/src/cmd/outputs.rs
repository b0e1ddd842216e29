//! `granule outputs`: what a stage published (each output with the upstream item
//! it came from), listed, as JSON lines, or written to a folder.

use super::StageArg;
use crate::{BadInput, EXIT_DONE};
use anyhow::{Context, Result};
use granule_core::Output;
use granule_exec::DataStore;
use granule_store::OutputRow;
use std::io::Write;
use std::path::PathBuf;

#[derive(clap::Args)]
pub(crate) struct OutputsArgs {
    #[command(flatten)]
    stage: StageArg,
    /// Write the outputs to DIR: records to DIR/records (one per line, in
    /// published order), each file as DIR/ITEM.ORDINAL.NAME.
    #[arg(long, conflicts_with = "json")]
    out: Option<PathBuf>,
    /// One JSON object per output: index, upstream item, ordinal, and the record
    /// (`value`, or `value_hex` for bytes that are not UTF-8) or file.
    #[arg(long)]
    json: bool,
    /// Where output files are (as given to the workers that made them).
    #[arg(long, env = "GRANULE_BLOBS")]
    blobs: Option<String>,
}

/// Lists or writes out a stage's committed outputs.
pub(crate) fn outputs(args: OutputsArgs) -> Result<u8> {
    let (mut store, job) = args.stage.open()?;
    let status = store.status(Some(&job))?;
    if !status
        .iter()
        .flat_map(|j| &j.stages)
        .any(|s| s.name == args.stage.stage)
    {
        return Err(BadInput(format!(
            "job \"{job}\" has no stage named \"{}\"",
            args.stage.stage
        ))
        .into());
    }
    let rows = store.outputs(&job, &args.stage.stage)?;
    let mut stdout = std::io::stdout().lock();
    match (&args.out, args.json) {
        (Some(dir), _) => {
            let location = args
                .blobs
                .clone()
                .unwrap_or_else(|| args.stage.state.state.join("blobs").display().to_string());
            let data =
                DataStore::open(&location, 3).map_err(|e| BadInput(format!("--blobs: {e}")))?;
            write_out(&rows, dir, &data)?;
            eprintln!(
                "granule: {} outputs written to {}",
                rows.len(),
                dir.display()
            );
        }
        (None, true) => {
            for row in &rows {
                writeln!(stdout, "{}", json_of(row))?;
            }
        }
        (None, false) => {
            for row in &rows {
                write!(stdout, "{}\t", row.item)?;
                match &row.output {
                    Output::Record(v) => stdout.write_all(v)?,
                    Output::File { name, bytes, key } => {
                        write!(stdout, "file {name} ({bytes} bytes, {key})")?
                    }
                    Output::Result(id) => write!(stdout, "result {id}")?,
                }
                stdout.write_all(b"\n")?;
            }
        }
    }
    Ok(EXIT_DONE)
}

fn json_of(row: &OutputRow) -> serde_json::Value {
    let mut v = serde_json::json!({
        "index": row.index,
        "item": row.item,
        "ordinal": row.ordinal,
        "fragment": row.fragment,
    });
    match &row.output {
        Output::Record(bytes) => match std::str::from_utf8(bytes) {
            Ok(s) => v["value"] = s.into(),
            Err(_) => {
                let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
                v["value_hex"] = hex.into();
            }
        },
        Output::File { key, name, bytes } => {
            v["file"] = serde_json::json!({ "name": name, "bytes": bytes, "key": key });
        }
        Output::Result(id) => v["result"] = (*id).into(),
    }
    v
}

/// Records to `dir/records`, files fetched (and checked) to `dir/ITEM.ORDINAL.NAME`.
fn write_out(rows: &[OutputRow], dir: &std::path::Path, data: &DataStore) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut records = Vec::new();
    for row in rows {
        match &row.output {
            Output::Record(v) => {
                records.extend_from_slice(v);
                records.push(b'\n');
            }
            Output::File { key, name, .. } => {
                let name = name.rsplit('/').next().unwrap_or("file");
                let target = dir.join(format!("{}.{}.{name}", row.item, row.ordinal));
                let _ = std::fs::remove_file(&target);
                data.fetch(key, &target)
                    .with_context(|| format!("output of item {}", row.item))?;
            }
            Output::Result(_) => {}
        }
    }
    super::results::write_new(dir, "records", &records)
}
