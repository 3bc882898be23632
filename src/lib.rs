//! Tessera: a deduplicating filesystem for VDI datastores.
//!
//! # Code map
//! Layers depend one way only: `store` <- `fs` <- (`fuse`, `nfs`, `control`, `replicate`,
//! `metrics`) <- `cli`.
//!
//! - [`store`]: chunks (blake3 ids, zstd), append-only pack files behind the [`store::pack::PackIo`]
//!   seam, the chunk index and reference counts. Knows nothing of inodes.
//! - [`schema`]: every table of the metadata database (redb), keys and value encodings.
//! - [`fs`]: the engine in POSIX terms: inodes, directories, copy-on-write chunk maps, the
//!   write-back buffer, clones, fsck, stats. **The engine never imports fuser, an NFS crate or
//!   clap**; front ends translate their requests into engine calls and engine errors into
//!   their own (one exhaustive `match` each).
//! - [`fuse`]: the FUSE adapter (fuser).
//! - [`nfs`]: the NFSv3 adapter (nfs3_server, vendored with patches), the portmapper and the
//!   client allow-list.
//! - [`control`]: the Unix-socket protocol by which the CLI asks a serving process to clone or
//!   report stats, and the datastore lock.
//! - [`replicate`]: network replication of snapshots between datastores (TCP), over the
//!   engine's send and receive.
//! - [`allow`]: client allow-lists (addresses and networks) of the network front ends.
//! - [`private`]: file modes of a datastore (0700 folders, 0600 files), used by every layer
//!   that creates files in it.
//! - `cli` (in the binary): one file per subcommand.

pub mod allow;
pub mod control;
#[cfg(test)]
pub(crate) mod deadlock;
pub mod fs;
pub mod fuse;
pub mod metrics;
pub mod nfs;
pub mod private;
pub mod replicate;
pub mod schema;
pub mod store;
