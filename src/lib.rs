//! bida (必达, "must arrive"): a message broker on its own commit log.
//!
//! Layers, bottom up (each calls only the ones below it):
//! - [`log`]: the storage engine, a library on its own. A segmented,
//!   memory-mapped commit log with a checksum on every record, `Sync` (group
//!   commit) or `Async` flushing, torn-tail recovery, retention, and a window
//!   of inner-msg-ids that makes a retried append store nothing new.
//! - [`protocol`]: the wire format, pure codecs (docs/PROTOCOL.md).
//! - [`broker`]: topics of partitions, consumer groups, delayed and half
//!   messages; it owns when a request is acknowledged.
//! - [`server`]: the wire edge above the broker: the TCP listener, one
//!   file per opcode family, memory admission, and the admin HTTP listener.
//! - [`kafka`]: a second edge above the broker: the Kafka-protocol
//!   listener (docs/KAFKA.md), off by default.
//! - [`client`]: the Rust client: producer with retries, consumer, and the
//!   idempotent-consumer helper.
//! - [`tls`]: optional TLS (rustls) around the protocol and the admin
//!   listener.
//! - `cli` (in the binary): `bida serve`, `produce`, `consume`, `topics`,
//!   `bench`, `inspect`, `append`, `read`, `torture`, `attack`.
//!
//! See `docs/ARCHITECTURE.md`.

pub mod broker;
pub mod client;
pub mod kafka;
pub mod log;
pub mod net;
pub mod protocol;
pub mod server;
mod sync;
pub mod tls;
