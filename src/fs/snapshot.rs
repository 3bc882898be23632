//! Snapshots: read-only point-in-time copies of a file or a VM folder, O(1) in its size.
//!
//! A snapshot is a clone (`clone.rs`: the chunk maps are shared, nothing is copied) whose
//! inodes carry `FLAG_SNAPSHOT`, kept in the hidden folder `/.snapshots` in a tree that
//! mirrors the datastore's: the snapshot `before-patch` of `/vms/desk01` is
//! `/.snapshots/vms/desk01@before-patch`. Readers (the mount, NFS, `tessera du`) see it as an
//! ordinary read-only folder; `/.snapshots` is left out of the root's listing, so hypervisors
//! and scans of the datastore do not see it, but can be entered by name. Every change to a
//! snapshot's inodes is refused (`FsError::ReadOnly`): at each entry point and, as a
//! backstop, when a transaction stores an inode (`W::put_inode`).
//!
//! Table `snapshots` lists them by (path, name). A snapshot is one transaction, so a folder's
//! snapshot is atomic. Rolling back replaces what the path holds with the snapshot's content
//! in one transaction and keeps every snapshot, newer ones included; files that exist in both
//! keep their inode numbers (NFS handles and open files stay valid). Reclamation needs nothing
//! special: a snapshot holds references to its chunk-map nodes like any clone.
//!
//! Limits: a snapshot belongs to the path it was taken of (a renamed VM folder leaves its
//! snapshots under the old path); hard links inside a folder become separate files in its
//! snapshots, as in clones.

use std::collections::BTreeMap;

use redb::ReadableTable;
use serde::{Deserialize, Serialize};

use super::clone::{children, clone_tree, CloneAs};
use super::dir::{add_entry, lookup_in, new_inode, remove_entry};
use super::inode::{Inode, InodeId, Kind, Time, FLAG_REPLICA, FLAG_SNAPSHOT};
use super::{Engine, FsError, FsResult, W};
use crate::schema::{K_SNAP_ROOT, SNAPSHOTS, SNAP_SCHEDULED, SNAP_SCHEDULES};

/// Name of the hidden folder at the root that holds every snapshot.
pub const SNAP_DIR: &[u8] = b".snapshots";

/// Longest snapshot name, in bytes (the mirror entry `base@name` must fit in 255).
pub const NAME_MAX: usize = 100;

/// One snapshot, as listed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// The path it was taken of, inside the datastore (`/vms/desk01`).
    pub path: String,
    pub name: String,
    /// Unix seconds (UTC).
    pub created: u64,
    /// `created` as RFC 3339 UTC.
    pub created_utc: String,
    /// Taken by a schedule (its retention rules prune it).
    pub scheduled: bool,
    /// Where it can be read, inside the datastore (`/.snapshots/vms/desk01@before-patch`).
    pub location: String,
}

/// Retention rules, like a backup tool's prune: keep the `last` newest, and the newest of each
/// of the last `hourly` hours and `daily` days (UTC) that have one. A snapshot any rule keeps
/// is kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Keep {
    pub last: u64,
    pub hourly: u64,
    pub daily: u64,
}

impl Keep {
    pub fn is_empty(&self) -> bool {
        self.last == 0 && self.hourly == 0 && self.daily == 0
    }

    /// Which of `created` (unix seconds, newest first) to keep.
    pub fn choose(&self, created: &[u64]) -> Vec<bool> {
        let mut keep = vec![false; created.len()];
        for k in keep.iter_mut().take(self.last as usize) {
            *k = true;
        }
        for (period, count) in [(3600u64, self.hourly), (86_400, self.daily)] {
            let mut last_bucket = None;
            let mut kept = 0;
            for (i, &t) in created.iter().enumerate() {
                if kept >= count {
                    break;
                }
                let b = t / period;
                if last_bucket != Some(b) {
                    keep[i] = true;
                    last_bucket = Some(b);
                    kept += 1;
                }
            }
        }
        keep
    }
}

/// A schedule of snapshots of one path, run by the serving process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    pub path: String,
    /// Seconds between snapshots (the recovery point objective).
    pub every: u64,
    pub keep: Keep,
}

/// What one run of the schedules did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleRun {
    pub created: Vec<SnapshotInfo>,
    pub pruned: Vec<SnapshotInfo>,
}

/// A snapshot command, as the CLI sends it to the serving process (or runs it itself).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum SnapAction {
    Create {
        path: String,
        name: Option<String>,
    },
    /// Every snapshot of the datastore.
    List,
    Delete {
        path: String,
        name: String,
    },
    Rollback {
        path: String,
        name: String,
    },
    Restore {
        path: String,
        name: String,
        dst: String,
    },
    Prune {
        path: String,
        keep: Keep,
        dry_run: bool,
    },
    /// Set the schedule of `path` (`every` seconds), or remove it (`every: None`).
    Schedule {
        path: String,
        every: Option<u64>,
        keep: Keep,
    },
    Schedules,
}

impl Engine {
    /// Run a snapshot command; the result as JSON (a `SnapshotInfo`, a list of them, or a list
    /// of `Schedule`s).
    pub fn snapshot_action(&self, a: &SnapAction) -> FsResult<serde_json::Value> {
        Ok(match a {
            SnapAction::Create { path, name } => v(&self.snapshot_create(path, name.as_deref())?),
            SnapAction::List => v(&self.snapshot_list(None)?),
            SnapAction::Delete { path, name } => {
                self.snapshot_delete(path, name)?;
                serde_json::Value::Null
            }
            SnapAction::Rollback { path, name } => {
                self.snapshot_rollback(path, name)?;
                serde_json::Value::Null
            }
            SnapAction::Restore { path, name, dst } => {
                self.snapshot_restore(path, name, dst)?;
                serde_json::Value::Null
            }
            SnapAction::Prune {
                path,
                keep,
                dry_run,
            } => v(&self.snapshot_prune(path, *keep, false, *dry_run)?),
            SnapAction::Schedule { path, every, keep } => {
                self.snapshot_schedule(path, every.map(|e| (e, *keep)))?;
                serde_json::Value::Null
            }
            SnapAction::Schedules => v(&self.snapshot_schedules()?),
        })
    }
}

fn v<T: Serialize>(x: &T) -> serde_json::Value {
    serde_json::to_value(x).unwrap_or_default()
}

/// `path` as stored: components joined by `/`, no leading or trailing `/`, no `.`.
pub(crate) fn norm(path: &str) -> FsResult<String> {
    let mut parts = Vec::new();
    for c in path.split('/').filter(|c| !c.is_empty() && *c != ".") {
        if c == ".." {
            return Err(FsError::Invalid("`..` in a snapshot path"));
        }
        parts.push(c);
    }
    Ok(parts.join("/"))
}

pub(crate) fn check_snap_name(name: &str) -> FsResult<()> {
    if name.is_empty() || name.len() > NAME_MAX {
        return Err(FsError::Invalid("a snapshot name is 1 to 100 bytes"));
    }
    if name.starts_with('.') || name.contains(['/', '@', '\0']) {
        return Err(FsError::Invalid(
            "a snapshot name cannot start with `.` or hold `/`, `@` or NUL",
        ));
    }
    Ok(())
}

/// `2026-11-30T05:20:11Z` for unix seconds `t`.
pub fn rfc3339(t: u64) -> String {
    let (y, m, d) = civil_from_days((t / 86_400) as i64);
    let s = t % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// The default name of a snapshot taken at `t`: `20261130-052011` (UTC).
pub fn default_name(t: u64) -> String {
    rfc3339(t)
        .replace(['-', ':'], "")
        .replace('T', "-")
        .trim_end_matches('Z')
        .to_string()
}

/// Proleptic Gregorian (year, month, day) of day `z` since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn now_secs() -> u64 {
    Time::now().secs.max(0) as u64
}

fn info(path: &str, name: &str, created: u64, flags: u64) -> SnapshotInfo {
    let (dirs, base) = match path.rsplit_once('/') {
        Some((d, b)) => (format!("{d}/"), b),
        None => (String::new(), path),
    };
    SnapshotInfo {
        path: format!("/{path}"),
        name: name.to_string(),
        created,
        created_utc: rfc3339(created),
        scheduled: flags & SNAP_SCHEDULED != 0,
        location: format!("/{}/{dirs}{base}@{name}", String::from_utf8_lossy(SNAP_DIR)),
    }
}

/// The mirror folder of `/.snapshots` for the parent of `path`, created (flagged) as needed.
pub(crate) fn mirror_parent(w: &mut W<'_>, path: &str) -> FsResult<InodeId> {
    let mut cur = snap_root(w, true)?.expect("created");
    let comps: Vec<&str> = path.split('/').collect();
    for c in &comps[..comps.len() - 1] {
        cur = match lookup_in(w, cur, c.as_bytes())? {
            Some((ino, _)) => {
                if w.inode(ino)?.kind != Kind::Dir {
                    return Err(FsError::Exists);
                }
                ino
            }
            None => {
                let d = flagged_dir(w, cur)?;
                add_entry(w, cur, c.as_bytes(), d, true)?;
                d
            }
        };
    }
    Ok(cur)
}

/// A new read-only folder for the mirror tree, owned like the root.
pub(crate) fn flagged_dir(w: &mut W<'_>, like: InodeId) -> FsResult<InodeId> {
    let owner = w.inode(like)?;
    let mut i = Inode::new(
        Kind::Dir,
        0o555,
        owner.uid,
        owner.gid,
        super::inode::Generation(0),
    );
    i.flags = FLAG_SNAPSHOT;
    Ok(new_inode(w, i)?.0)
}

/// `/.snapshots`, created on demand.
pub(crate) fn snap_root(w: &mut W<'_>, create: bool) -> FsResult<Option<InodeId>> {
    if let Some(v) = w.sup.get(K_SNAP_ROOT)? {
        return Ok(Some(InodeId(v.value())));
    }
    if !create {
        return Ok(None);
    }
    if lookup_in(w, InodeId::ROOT, SNAP_DIR)?.is_some() {
        return Err(FsError::Invalid(
            "the datastore's root holds a file named .snapshots: rename it to take snapshots",
        ));
    }
    let d = flagged_dir(w, InodeId::ROOT)?;
    add_entry(w, InodeId::ROOT, SNAP_DIR, d, true)?;
    w.sup.insert(K_SNAP_ROOT, d.0)?;
    Ok(Some(d))
}

/// The entry name of a snapshot in its mirror folder.
pub(crate) fn entry_name(path: &str, name: &str) -> Vec<u8> {
    let base = path.rsplit('/').next().unwrap_or(path);
    format!("{base}@{name}").into_bytes()
}

impl Engine {
    /// Take a snapshot of the file or folder at `path` (inside the datastore) named `name`
    /// (default: the UTC time, `20261130-052011`), in one durable transaction.
    pub fn snapshot_create(&self, path: &str, name: Option<&str>) -> FsResult<SnapshotInfo> {
        self.snapshot_create_at(path, name, now_secs(), false)
    }

    fn snapshot_create_at(
        &self,
        path: &str,
        name: Option<&str>,
        now: u64,
        scheduled: bool,
    ) -> FsResult<SnapshotInfo> {
        let p = norm(path)?;
        if p.is_empty() {
            return Err(FsError::Invalid(
                "snapshot a file or a folder inside the datastore, not its root",
            ));
        }
        let name = match name {
            Some(n) => n.to_string(),
            None if scheduled => format!("auto-{}", default_name(now)),
            None => default_name(now),
        };
        check_snap_name(&name)?;
        let entry = entry_name(&p, &name);
        if entry.len() > super::NAME_MAX {
            return Err(FsError::NameTooLong);
        }
        // What was written before the snapshot was asked for is in it: flush first, as a
        // clone does.
        self.flush_for(&p)?;
        let flags = if scheduled { SNAP_SCHEDULED } else { 0 };
        self.txn(true, |w| {
            w.snapshots_writable = true;
            let src = super::dir::resolve_in(&w.dirents, p.as_bytes())?;
            if w.inode(src)?.is_snapshot() {
                return Err(FsError::Invalid("cannot snapshot a snapshot"));
            }
            let mut t = w.txn.open_table(SNAPSHOTS)?;
            if t.get((p.as_bytes(), name.as_bytes()))?.is_some() {
                return Err(FsError::Exists);
            }
            let parent = mirror_parent(w, &p)?;
            if lookup_in(w, parent, &entry)?.is_some() {
                return Err(FsError::Exists);
            }
            let top = clone_tree(w, src, parent, &entry, CloneAs::Snapshot)?;
            t.insert((p.as_bytes(), name.as_bytes()), (top.0, now, flags))?;
            Ok(())
        })?;
        Ok(info(&p, &name, now, flags))
    }

    /// Flush what is dirty at `p` (a file) or everywhere (a folder), so a snapshot or rollback
    /// sees every write acknowledged before it was asked for.
    fn flush_for(&self, p: &str) -> FsResult<()> {
        match self.resolve(p.as_bytes()) {
            Ok(ino) if self.getattr(ino).is_ok_and(|a| a.inode.kind != Kind::Dir) => {
                self.flush_ino(ino, false)
            }
            _ => {
                let inos: Vec<InodeId> = self.files.iter().map(|e| *e.key()).collect();
                for ino in inos {
                    self.flush_ino(ino, false)?;
                }
                Ok(())
            }
        }
    }

    /// Snapshots of `path` (all of them with `None`), oldest first per path.
    pub fn snapshot_list(&self, path: Option<&str>) -> FsResult<Vec<SnapshotInfo>> {
        let rtx = self.read_txn()?;
        let t = match rtx.open_table(SNAPSHOTS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let want = path.map(norm).transpose()?;
        let mut out = Vec::new();
        for r in t.iter()? {
            let (k, v) = r?;
            let (p, n) = k.value();
            let p = String::from_utf8_lossy(p).into_owned();
            if want.as_ref().is_some_and(|w| *w != p) {
                continue;
            }
            let (_, created, flags) = v.value();
            out.push(info(&p, &String::from_utf8_lossy(n), created, flags));
        }
        out.sort_by(|a, b| (&a.path, a.created, &a.name).cmp(&(&b.path, b.created, &b.name)));
        Ok(out)
    }

    /// The top inode of snapshot `name` of `p` (normalised).
    pub(crate) fn snapshot_ino(&self, p: &str, name: &str) -> FsResult<InodeId> {
        let rtx = self.read_txn()?;
        let t = match rtx.open_table(SNAPSHOTS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Err(FsError::NotFound),
            Err(e) => return Err(e.into()),
        };
        let v = t
            .get((p.as_bytes(), name.as_bytes()))?
            .ok_or(FsError::NotFound)?;
        Ok(InodeId(v.value().0))
    }

    /// Delete snapshot `name` of `path`. Its chunks nothing else uses become reclaimable.
    pub fn snapshot_delete(&self, path: &str, name: &str) -> FsResult<()> {
        let p = norm(path)?;
        let mut gone = Vec::new();
        self.txn(true, |w| {
            w.snapshots_writable = true;
            let mut t = w.txn.open_table(SNAPSHOTS)?;
            if t.remove((p.as_bytes(), name.as_bytes()))?.is_none() {
                return Err(FsError::NotFound);
            }
            let root = snap_root(w, false)?.ok_or(FsError::NotFound)?;
            // The mirror folders down to the snapshot, to drop those left empty.
            let comps: Vec<&str> = p.split('/').collect();
            let mut chain = vec![root];
            for c in &comps[..comps.len() - 1] {
                let d = *chain.last().expect("non-empty");
                match lookup_in(w, d, c.as_bytes())? {
                    Some((ino, _)) => chain.push(ino),
                    None => {
                        return Err(FsError::BadMeta(format!("snapshot mirror of /{p} missing")))
                    }
                }
            }
            let parent = *chain.last().expect("non-empty");
            self.remove_tree(w, parent, &entry_name(&p, name), &mut gone)?;
            for i in (1..chain.len()).rev() {
                if !children(w, chain[i])?.is_empty() {
                    break;
                }
                self.remove_tree(w, chain[i - 1], comps[i - 1].as_bytes(), &mut gone)?;
            }
            Ok(())
        })?;
        for ino in gone {
            self.drop_state(ino);
        }
        Ok(())
    }

    /// A writable copy of snapshot `name` of `path` at `dst` (which must not exist), in one
    /// durable transaction; O(1) in the data's size, like a clone.
    pub fn snapshot_restore(&self, path: &str, name: &str, dst: &str) -> FsResult<InodeId> {
        let p = norm(path)?;
        let d = norm(dst)?;
        let snap = self.snapshot_ino(&p, name)?;
        let (dp, dn) = d.rsplit_once('/').unwrap_or(("", &d));
        if dn.is_empty() {
            return Err(FsError::Invalid("restore needs a destination path"));
        }
        super::check_name(dn.as_bytes())?;
        self.txn(true, |w| {
            let parent = super::dir::resolve_in(&w.dirents, dp.as_bytes())?;
            if w.inode(parent)?.kind != Kind::Dir {
                return Err(FsError::NotDir);
            }
            if lookup_in(w, parent, dn.as_bytes())?.is_some() {
                return Err(FsError::Exists);
            }
            clone_tree(w, snap, parent, dn.as_bytes(), CloneAs::Restore)
        })
    }

    /// Roll `path` back to snapshot `name`: afterwards it holds exactly what the snapshot
    /// holds. One durable transaction; every snapshot is kept, newer ones included. Files
    /// present in both keep their inodes; files the snapshot lacks are deleted.
    pub fn snapshot_rollback(&self, path: &str, name: &str) -> FsResult<()> {
        let p = norm(path)?;
        let snap = self.snapshot_ino(&p, name)?;
        // Files with unflushed state are flushed and held while the transaction runs, so no
        // flush of older data lands on top of the rolled-back content.
        let held: Vec<(InodeId, std::sync::Arc<super::data::FileEntry>)> = {
            let mut v: Vec<_> = self
                .files
                .iter()
                .map(|e| (*e.key(), e.value().clone()))
                .collect();
            v.sort_by_key(|(i, _)| *i);
            v
        };
        let flush_guards: Vec<_> = held.iter().map(|(_, e)| e.flush.lock()).collect();
        let mut states: Vec<_> = held.iter().map(|(_, e)| e.state.write()).collect();
        for ((ino, _), g) in held.iter().zip(states.iter_mut()) {
            self.flush_locked(*ino, g, false, None)?;
        }
        let mut gone = Vec::new();
        self.txn(true, |w| {
            let (pp, base) = p.rsplit_once('/').unwrap_or(("", &p));
            let parent = super::dir::resolve_in(&w.dirents, pp.as_bytes())?;
            match lookup_in(w, parent, base.as_bytes())? {
                Some((cur, _)) => self.rollback_one(
                    w,
                    parent,
                    base.as_bytes(),
                    cur,
                    snap,
                    CloneAs::Restore,
                    &mut gone,
                ),
                // Deleted since: rolling back brings it back.
                None => clone_tree(w, snap, parent, base.as_bytes(), CloneAs::Restore).map(|_| ()),
            }
        })?;
        drop(states);
        drop(flush_guards);
        for ino in gone {
            self.drop_state(ino);
        }
        Ok(())
    }

    /// Make `parent/name` (inode `cur`) hold what snapshot inode `snap` holds; what has to be
    /// copied in is cloned `how`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn rollback_one(
        &self,
        w: &mut W<'_>,
        parent: InodeId,
        name: &[u8],
        cur: InodeId,
        snap: InodeId,
        how: CloneAs,
        gone: &mut Vec<InodeId>,
    ) -> FsResult<()> {
        // (live folder, snapshot folder) pairs whose entries are still to reconcile.
        let mut todo = Vec::new();
        let ci = w.inode(cur)?;
        let si = w.inode(snap)?;
        if ci.kind != si.kind || !matches!(ci.kind, Kind::File | Kind::Dir) {
            self.remove_tree(w, parent, name, gone)?;
            clone_tree(w, snap, parent, name, how)?;
        } else {
            restore_in_place(w, cur, snap, how)?;
            if ci.kind == Kind::Dir {
                todo.push((cur, snap));
            }
        }
        while let Some((d, s)) = todo.pop() {
            let want: BTreeMap<Vec<u8>, InodeId> = children(w, s)?.into_iter().collect();
            for (n, _) in children(w, d)? {
                if !want.contains_key(&n) {
                    self.remove_tree(w, d, &n, gone)?;
                }
            }
            for (n, sc) in want {
                match lookup_in(w, d, &n)? {
                    None => {
                        clone_tree(w, sc, d, &n, how)?;
                    }
                    Some((c, _)) => {
                        let (ck, sk) = (w.inode(c)?.kind, w.inode(sc)?.kind);
                        if ck == sk && matches!(ck, Kind::File | Kind::Dir) {
                            restore_in_place(w, c, sc, how)?;
                            if ck == Kind::Dir {
                                todo.push((c, sc));
                            }
                        } else {
                            self.remove_tree(w, d, &n, gone)?;
                            clone_tree(w, sc, d, &n, how)?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Remove `parent/name` and, for a folder, everything under it (files with other links
    /// elsewhere stay, open files live until closed). Inodes deleted are added to `gone`.
    pub(crate) fn remove_tree(
        &self,
        w: &mut W<'_>,
        parent: InodeId,
        name: &[u8],
        gone: &mut Vec<InodeId>,
    ) -> FsResult<()> {
        let (top, cookie) = lookup_in(w, parent, name)?.ok_or(FsError::NotFound)?;
        let top_dir = w.inode(top)?.kind == Kind::Dir;
        if top_dir {
            // Folders top-down, then emptied bottom-up: no recursion, any depth.
            let mut dirs = vec![top];
            let mut i = 0;
            while i < dirs.len() {
                for (_, c) in children(w, dirs[i])? {
                    if w.inode(c)?.kind == Kind::Dir {
                        dirs.push(c);
                    }
                }
                i += 1;
            }
            for &d in dirs.iter().rev() {
                for (n, c) in children(w, d)? {
                    let (_, ck) = lookup_in(w, d, &n)?.ok_or(FsError::NotFound)?;
                    let is_dir = w.inode(c)?.kind == Kind::Dir;
                    remove_entry(w, d, &n, ck, is_dir)?;
                    if self.drop_link(w, c)? {
                        gone.push(c);
                    }
                }
            }
        }
        remove_entry(w, parent, name, cookie, top_dir)?;
        if self.drop_link(w, top)? {
            gone.push(top);
        }
        Ok(())
    }

    /// Snapshot schedules, by path.
    pub fn snapshot_schedules(&self) -> FsResult<Vec<Schedule>> {
        let rtx = self.read_txn()?;
        let t = match rtx.open_table(SNAP_SCHEDULES) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        for r in t.iter()? {
            let (k, v) = r?;
            let (every, last, hourly, daily) = v.value();
            out.push(Schedule {
                path: format!("/{}", String::from_utf8_lossy(k.value())),
                every,
                keep: Keep {
                    last,
                    hourly,
                    daily,
                },
            });
        }
        Ok(out)
    }

    /// Set (or with `None`, remove) the snapshot schedule of `path`: a snapshot every `every`
    /// seconds, pruned by `keep` (only snapshots the schedule took).
    pub fn snapshot_schedule(&self, path: &str, s: Option<(u64, Keep)>) -> FsResult<()> {
        let p = norm(path)?;
        if p.is_empty() {
            return Err(FsError::Invalid(
                "schedule snapshots of a file or a folder inside the datastore, not its root",
            ));
        }
        if let Some((every, keep)) = s {
            if every < 60 {
                return Err(FsError::Invalid("a schedule runs at most once a minute"));
            }
            if keep.is_empty() {
                return Err(FsError::Invalid(
                    "a schedule needs a retention rule (--keep-last, --keep-hourly or --keep-daily)",
                ));
            }
            self.resolve(p.as_bytes())?;
        }
        self.meta_txn(|w| {
            let mut t = w.txn.open_table(SNAP_SCHEDULES)?;
            match s {
                Some((every, k)) => {
                    t.insert(p.as_bytes(), (every, k.last, k.hourly, k.daily))?;
                }
                None => {
                    if t.remove(p.as_bytes())?.is_none() {
                        return Err(FsError::NotFound);
                    }
                }
            }
            Ok(())
        })
    }

    /// Delete the snapshots of `path` that `keep` does not keep (only those a schedule took,
    /// with `scheduled_only`). With `dry_run`, only say which. Returns the ones (to be) deleted.
    pub fn snapshot_prune(
        &self,
        path: &str,
        keep: Keep,
        scheduled_only: bool,
        dry_run: bool,
    ) -> FsResult<Vec<SnapshotInfo>> {
        if keep.is_empty() {
            return Err(FsError::Invalid(
                "prune needs a retention rule (--keep-last, --keep-hourly or --keep-daily)",
            ));
        }
        let mut snaps: Vec<SnapshotInfo> = self
            .snapshot_list(Some(path))?
            .into_iter()
            .filter(|s| s.scheduled || !scheduled_only)
            .collect();
        snaps.sort_by(|a, b| (b.created, &b.name).cmp(&(a.created, &a.name)));
        let created: Vec<u64> = snaps.iter().map(|s| s.created).collect();
        let chosen = keep.choose(&created);
        let doomed: Vec<SnapshotInfo> = snaps
            .into_iter()
            .zip(chosen)
            .filter(|(_, k)| !k)
            .map(|(s, _)| s)
            .collect();
        if !dry_run {
            for s in &doomed {
                self.snapshot_delete(&s.path, &s.name)?;
            }
        }
        Ok(doomed)
    }

    /// Run the schedules as of `now` (unix seconds): snapshot each path whose newest scheduled
    /// snapshot is `every` old or older, then prune its scheduled snapshots. A path that is
    /// gone is skipped (and logged) until it comes back.
    pub fn run_snapshot_schedules(&self, now: u64) -> FsResult<ScheduleRun> {
        let mut run = ScheduleRun::default();
        for s in self.snapshot_schedules()? {
            let newest = self
                .snapshot_list(Some(&s.path))?
                .into_iter()
                .filter(|x| x.scheduled)
                .map(|x| x.created)
                .max();
            if newest.is_some_and(|t| now < t + s.every) {
                continue;
            }
            match self.snapshot_create_at(&s.path, None, now, true) {
                Ok(i) => run.created.push(i),
                Err(FsError::NotFound) => {
                    tracing::warn!(path = %s.path, "scheduled snapshot skipped: the path does not exist");
                    continue;
                }
                // Two runs in one second: the name is taken, the snapshot exists.
                Err(FsError::Exists) => {}
                Err(e) => return Err(e),
            }
            run.pruned
                .extend(self.snapshot_prune(&s.path, s.keep, true, false)?);
        }
        Ok(run)
    }

    /// Run the snapshot schedules every `interval` while serving. The thread holds no strong
    /// reference while it waits and ends once the engine is dropped.
    pub fn spawn_snapshot_scheduler(
        self: &std::sync::Arc<Self>,
        interval: std::time::Duration,
    ) -> std::thread::JoinHandle<()> {
        self.spawn_periodic("tessera-snap", interval, |e| {
            match e.run_snapshot_schedules(now_secs()) {
                Ok(r) => {
                    for c in &r.created {
                        tracing::info!(path = %c.path, name = %c.name, "scheduled snapshot taken");
                    }
                    for p in &r.pruned {
                        tracing::info!(path = %p.path, name = %p.name, "scheduled snapshot pruned");
                    }
                }
                Err(err) => tracing::warn!("snapshot schedule failed (will retry): {err}"),
            }
        })
    }
}

/// Make file or folder `cur` look like snapshot inode `snap` (same kind): content and size for
/// a file, owner, mode, times and extended attributes for both. Not its inode number, link
/// count or a folder's entries (the caller reconciles those). Its flags become those of a
/// copy made `how` (a replica's inodes stay read-only, a rolled-back file is writable).
fn restore_in_place(w: &mut W<'_>, cur: InodeId, snap: InodeId, how: CloneAs) -> FsResult<()> {
    let si = w.inode(snap)?;
    let mut ci = w.inode(cur)?;
    ci.flags = match how {
        CloneAs::Replica => FLAG_REPLICA,
        _ => 0,
    };
    if si.kind == Kind::File {
        if ci.root != si.root {
            w.tree().incref_node(si.root.node)?;
            w.tree().decref_node(ci.root.node)?;
        }
        ci.root = si.root;
        ci.aux = si.aux;
        ci.size = si.size;
    }
    ci.perm = si.perm;
    ci.uid = si.uid;
    ci.gid = si.gid;
    ci.atime = si.atime;
    ci.mtime = si.mtime;
    ci.ctime = Time::now();
    w.put_inode(cur, &ci)?;
    let old: Vec<Vec<u8>> = w
        .xattrs
        .range((cur.0, [].as_slice())..(cur.0 + 1, [].as_slice()))?
        .map(|r| r.map(|(k, _)| k.value().1.to_vec()))
        .collect::<Result<_, _>>()?;
    for n in old {
        w.xattrs.remove((cur.0, n.as_slice()))?;
    }
    let new: Vec<(Vec<u8>, Vec<u8>)> = w
        .xattrs
        .range((snap.0, [].as_slice())..(snap.0 + 1, [].as_slice()))?
        .map(|r| r.map(|(k, v)| (k.value().1.to_vec(), v.value().to_vec())))
        .collect::<Result<_, _>>()?;
    for (k, v) in new {
        w.xattrs.insert((cur.0, k.as_slice()), v.as_slice())?;
    }
    Ok(())
}
