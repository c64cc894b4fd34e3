//! bida (必达, "must arrive"): a message broker on its own commit log.
//!
//! Layers, bottom up (each calls only the one below it):
//! - [`log`]: the storage engine, a library on its own. A segmented,
//!   memory-mapped commit log with a checksum on every record, `Sync` (group
//!   commit) or `Async` flushing, torn-tail recovery, retention, and a window
//!   of inner-msg-ids that makes a retried append store nothing new.
//! - `cli` (in the binary): `bida inspect`, `bida append`, `bida read`.
//!
//! The broker, protocol and client layers build on [`log`]; see
//! `docs/ARCHITECTURE.md`.

pub mod log;
