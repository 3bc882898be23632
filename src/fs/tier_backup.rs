//! Metadata backups into the object-store tier, and `restore` of a datastore from its bucket.
//!
//! A backup is a consistent copy of every metadata table as of one read snapshot, written to
//! a fresh redb file, zstd-compressed, uploaded after every pack it may reference (the active
//! pack is sealed and every sealed pack uploaded first), then named by `meta/latest.json`.
//! Objects of packs removed by compaction are deleted only once a backup taken after their
//! removal is in the bucket, so the newest backup never references a deleted object. The
//! bucket alone then rebuilds the datastore as of the last backup: the metadata RPO is the
//! backup interval plus the time the upload takes.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use redb::{
    Database, ReadTransaction, ReadableDatabase, TableDefinition, TableError, WriteTransaction,
};

use super::{Engine, FsError, FsResult, META_FILE, PACK_DIR};
use crate::schema::*;
use crate::store::remote::{Remote, TierConfig};
use crate::store::tier::{BackupInfo, CACHE_DIR, LATEST};

/// How long a backup waits for the uploads before it: made no progress for this long, it
/// fails (and is retried at the next interval).
const DRAIN_PATIENCE: Duration = Duration::from_secs(300);
/// Default interval of metadata backups while the datastore changes.
pub const BACKUP_EVERY: Duration = Duration::from_secs(300);

/// Copy one table (absent in `rtx`: nothing to copy). Returns the rows copied.
fn copy<K: redb::Key + 'static, V: redb::Value + 'static>(
    rtx: &ReadTransaction,
    w: &WriteTransaction,
    def: TableDefinition<K, V>,
) -> FsResult<u64> {
    let src = match rtx.open_table(def) {
        Ok(t) => t,
        Err(TableError::TableDoesNotExist(_)) => return Ok(0),
        Err(e) => return Err(e.into()),
    };
    let mut dst = w.open_table(def)?;
    let mut n = 0;
    for r in redb::ReadableTable::iter(&src)? {
        let (k, v) = r?;
        dst.insert(k.value(), v.value())?;
        n += 1;
    }
    Ok(n)
}

/// Every table of the current format, from `rtx` into the empty database `dst`.
fn copy_all(rtx: &ReadTransaction, dst: &Database) -> FsResult<u64> {
    let mut w = dst.begin_write()?;
    w.set_durability(redb::Durability::Immediate)
        .map_err(|e| FsError::BadMeta(e.to_string()))?;
    let mut n = 0;
    n += copy(rtx, &w, SUPER)?;
    n += copy(rtx, &w, INODES)?;
    n += copy(rtx, &w, DIRENTS)?;
    n += copy(rtx, &w, DIRCOOKIE)?;
    n += copy(rtx, &w, SYMLINKS)?;
    n += copy(rtx, &w, XATTRS)?;
    n += copy(rtx, &w, NODES)?;
    n += copy(rtx, &w, NODEREFS)?;
    n += copy(rtx, &w, CHUNKS)?;
    n += copy(rtx, &w, CHUNK_ALIASES)?;
    n += copy(rtx, &w, PACKS)?;
    n += copy(rtx, &w, PACK_DEFERRED)?;
    n += copy(rtx, &w, COUNTERS)?;
    n += copy(rtx, &w, ORPHANS)?;
    n += copy(rtx, &w, SNAPSHOTS)?;
    n += copy(rtx, &w, SNAP_SCHEDULES)?;
    n += copy(rtx, &w, REPL_STATE)?;
    w.commit()?;
    Ok(n)
}

impl Engine {
    /// Back the metadata up into the bucket (see the module doc). `None` without a tier.
    pub fn backup_metadata(&self) -> FsResult<Option<BackupInfo>> {
        let Some(tier) = self.store.tier_io() else {
            return Ok(None);
        };
        let dir = self
            .dir
            .clone()
            .ok_or(FsError::Invalid("an in-memory datastore has no folder"))?;
        let epoch = tier.begin_backup();
        // The snapshot first: everything it references was appended before it, so sealing
        // after it and uploading every sealed pack covers it. Not through `read_txn`: no pack
        // is read, and holding the pack-deletion gate would stall compaction for the upload.
        let rtx = self.db.read().begin_read()?;
        self.store.seal_active()?;
        tier.drain(DRAIN_PATIENCE)?;
        let tmp = dir.join("meta-backup.tmp");
        let zst = dir.join("meta-backup.tmp.zst");
        let _ = std::fs::remove_file(&tmp);
        let r = (|| -> FsResult<BackupInfo> {
            {
                let copy_db = Database::create(&tmp)?;
                copy_all(&rtx, &copy_db)?;
            }
            drop(rtx);
            crate::private::make_private(&tmp)?;
            let bytes = std::fs::metadata(&tmp)?.len();
            {
                let mut out = crate::private::open_options()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&zst)?;
                zstd::stream::copy_encode(std::fs::File::open(&tmp)?, &mut out, 3)?;
            }
            let info = BackupInfo::new(&dir, bytes);
            tier.put_backup(epoch, &zst, &info)?;
            Ok(info)
        })();
        let _ = std::fs::remove_file(&tmp);
        let _ = std::fs::remove_file(&zst);
        let info = r?;
        tracing::info!(
            object = %info.object,
            bytes = info.bytes,
            "metadata backed up into the bucket"
        );
        Ok(Some(info))
    }

    /// Wait (at most `patience`) for the object deletes the last backup let go; true when
    /// none is left (or there is no tier).
    pub fn finish_deletes(&self, patience: std::time::Duration) -> bool {
        self.store
            .tier_io()
            .is_none_or(|t| t.finish_deletes(patience))
    }

    /// Back the metadata up every `every` while it changes (a thread; it stops when the
    /// engine is dropped).
    pub fn spawn_metadata_backups(
        self: &Arc<Self>,
        every: Duration,
    ) -> Option<std::thread::JoinHandle<()>> {
        self.store.tier_io()?;
        let weak = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("tessera-metabackup".into())
            .spawn(move || {
                let mut last = None;
                let mut slept = Duration::ZERO;
                loop {
                    // Short sleeps, so the thread ends soon after the engine does.
                    std::thread::sleep(Duration::from_millis(500));
                    slept += Duration::from_millis(500);
                    let Some(e) = weak.upgrade() else { return };
                    if slept < every {
                        continue;
                    }
                    slept = Duration::ZERO;
                    let now = e.commits.load(std::sync::atomic::Ordering::SeqCst);
                    if last == Some(now) {
                        continue;
                    }
                    match e.backup_metadata() {
                        Ok(_) => last = Some(now),
                        Err(err) => tracing::error!(
                            "cannot back the metadata up into the bucket (will retry): {err}"
                        ),
                    }
                }
            })
            .ok()
    }
}

/// Rebuild a datastore in the new folder `ds` from the bucket of `cfg` alone: its newest
/// metadata backup, with every pack read from the bucket (through the local cache).
pub fn restore(cfg: &TierConfig, ds: &Path) -> FsResult<BackupInfo> {
    restore_from(&Remote::connect(cfg)?, cfg, ds)
}

/// [`restore`] through a given client (tests use an in-memory store).
pub fn restore_from(remote: &Remote, cfg: &TierConfig, ds: &Path) -> FsResult<BackupInfo> {
    let latest = remote.get(LATEST)?.ok_or_else(|| {
        FsError::BadMeta(format!(
            "{} holds no metadata backup ({LATEST}): nothing to restore",
            cfg.url
        ))
    })?;
    let info: BackupInfo = serde_json::from_slice(&latest.0)
        .map_err(|e| FsError::BadMeta(format!("{LATEST} in {} is damaged: {e}", cfg.url)))?;
    std::fs::create_dir_all(ds)?;
    if std::fs::read_dir(ds)?.next().is_some() {
        return Err(FsError::Exists);
    }
    crate::private::make_private(ds)?;
    crate::private::create_dir(&ds.join(PACK_DIR))?;
    crate::private::create_dir(&ds.join(CACHE_DIR))?;
    let zst = ds.join("meta-restore.tmp.zst");
    let total = remote
        .list("meta")?
        .into_iter()
        .find(|(n, _)| *n == info.object)
        .map(|(_, s)| s)
        .ok_or_else(|| {
            FsError::BadMeta(format!(
                "{} names {} but the bucket does not hold it",
                LATEST, info.object
            ))
        })?;
    {
        use std::io::Write;
        let mut out = crate::private::open_options()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&zst)?;
        let mut at = 0;
        while at < total {
            let end = (at + (8 << 20)).min(total);
            out.write_all(&remote.get_range(&info.object, at..end)?)?;
            at = end;
        }
        out.sync_all()?;
    }
    {
        let mut out = crate::private::open_options()
            .write(true)
            .create_new(true)
            .open(ds.join(META_FILE))?;
        zstd::stream::copy_decode(std::fs::File::open(&zst)?, &mut out)?;
        out.sync_all()?;
    }
    std::fs::remove_file(&zst)?;
    // Opens as a database, or the backup is damaged.
    Database::open(ds.join(META_FILE))?;
    cfg.save(ds)?;
    std::fs::File::open(ds)?.sync_all()?;
    Ok(info)
}
