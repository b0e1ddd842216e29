//! Running one fragment of a stage as a child process, speaking the task protocol.
//!
//! Batch mode starts the command once per fragment, feeds item values on stdin
//! lazily (a bounded window beyond the last ack, so the unfed tail can be split
//! off), reads acks and tagged commands on fd 3 (protocol version 2, see
//! `protocol`), and yields by closing stdin, then SIGTERM, then SIGKILL. Per-item
//! mode runs the command once per item with `{}` replaced by the value; an exit of
//! 0 is the item's ack. Items are byte strings throughout. When a task exits, its
//! process group is killed and its pipes are drained of what it wrote: nothing it
//! left behind can hold the fragment. Threads, not an async runtime: a fragment is
//! a handful of blocking pipes.

mod batch;
mod blob;
mod data;
mod drain;
mod items;
#[cfg(feature = "s3")]
mod object;
mod per_item;
pub mod protocol;
mod run;
mod sample;
mod sys;

pub use blob::{Blob, BlobError};
pub use data::{sweep, Cache, DataError, DataStore, Fetched, Pin, StoredFile};
pub use items::{ItemIter, ItemSource, ItemsError, LinesFile};
pub use run::{
    failed_before_start, feed_window, run_fragment, unavailable_before_start, Checkpoint, Control,
    Echo, Failure, FragmentJob, OutputTee, Progress, RunReport, Unflushed,
};
pub use sample::{detect, Detected, Gpu, Sample, Sampler};
pub use sys::random_hex;
