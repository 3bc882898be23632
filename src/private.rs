//! Private by default: a datastore's folders are 0700 and every file in them 0600, whatever
//! the umask. The packs hold every desktop's disk, so a world-readable pack is a leak.
//!
//! New files are created with these modes (the umask can only make them stricter); datastores
//! made before this rule are tightened when their owner next opens them
//! ([`tighten_datastore`]). The FUSE mount is not affected: what guests see carries the modes
//! of the guest files.

use std::fs::{DirBuilder, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Mode of the datastore folder and of `packs/`.
pub const DIR_MODE: u32 = 0o700;
/// Mode of every file in the datastore (packs, metadata, its backup, lock, reserve, socket).
pub const FILE_MODE: u32 = 0o600;

/// Bits a datastore entry must not have: any access by group or others.
const OPEN_BITS: u32 = 0o077;

/// Create one folder with mode 0700 (the umask can only narrow it).
pub fn create_dir(path: &Path) -> io::Result<()> {
    DirBuilder::new().mode(DIR_MODE).create(path)
}

/// Open options that create files with mode 0600.
pub fn open_options() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.mode(FILE_MODE);
    o
}

/// Take group and other access away from `path` (not following symlinks). Returns true if its
/// mode changed.
pub fn make_private(path: &Path) -> io::Result<bool> {
    let m = std::fs::symlink_metadata(path)?;
    if m.file_type().is_symlink() || m.mode() & OPEN_BITS == 0 {
        return Ok(false);
    }
    let mode = m.mode() & 0o7777 & !OPEN_BITS;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(true)
}

/// Tighten a datastore made before it was private by default: the folder, `packs/` and every
/// file in them lose group and other access. Called by whoever takes the datastore's lock
/// (chmod works for the folder's owner and root; for others it fails, and that is logged).
/// Logs once, at info, what was changed. Returns the number of entries changed.
pub fn tighten_datastore(dir: &Path, pack_dir: &str) -> usize {
    let mut changed = Vec::new();
    let mut failed = None;
    let mut visit = |p: &Path| match make_private(p) {
        Ok(true) => changed.push(p.to_path_buf()),
        Ok(false) => {}
        Err(e) => {
            failed.get_or_insert_with(|| format!("{}: {e}", p.display()));
        }
    };
    // The folder first: from then on nothing below it is reachable by others.
    visit(dir);
    for d in [dir.to_path_buf(), dir.join(pack_dir)] {
        if d != dir {
            visit(&d);
        }
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| !t.is_dir()) {
                visit(&e.path());
            }
        }
    }
    if let Some(f) = failed {
        tracing::warn!("cannot make datastore {} private: {f}", dir.display());
    }
    if !changed.is_empty() {
        let shown: Vec<String> = changed
            .iter()
            .take(8)
            .map(|p| {
                p.strip_prefix(dir)
                    .ok()
                    .filter(|r| !r.as_os_str().is_empty())
                    .map_or_else(|| ".".into(), |r| r.display().to_string())
            })
            .collect();
        tracing::info!(
            "made datastore {} private: {} entries lost group/other access ({}{})",
            dir.display(),
            changed.len(),
            shown.join(", "),
            if changed.len() > shown.len() {
                ", ..."
            } else {
                ""
            }
        );
    }
    changed.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn tightens_an_open_datastore_once() {
        let d = tempfile::tempdir().unwrap();
        let ds = d.path().join("ds");
        std::fs::create_dir(&ds).unwrap();
        std::fs::create_dir(ds.join("packs")).unwrap();
        std::fs::write(ds.join("meta.redb"), b"x").unwrap();
        std::fs::write(ds.join("packs/00000001.pack"), b"x").unwrap();
        for (p, m) in [
            (ds.clone(), 0o755),
            (ds.join("packs"), 0o775),
            (ds.join("meta.redb"), 0o644),
            (ds.join("packs/00000001.pack"), 0o666),
        ] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(m)).unwrap();
        }
        assert_eq!(tighten_datastore(&ds, "packs"), 4);
        assert_eq!(mode(&ds), 0o700);
        assert_eq!(mode(&ds.join("packs")), 0o700);
        assert_eq!(mode(&ds.join("meta.redb")), 0o600);
        assert_eq!(mode(&ds.join("packs/00000001.pack")), 0o600);
        // Already private: nothing to do, nothing logged.
        assert_eq!(tighten_datastore(&ds, "packs"), 0);
    }

    #[test]
    fn new_files_and_folders_are_private_whatever_the_umask() {
        let d = tempfile::tempdir().unwrap();
        create_dir(&d.path().join("f")).unwrap();
        open_options()
            .write(true)
            .create_new(true)
            .open(d.path().join("f/x"))
            .unwrap();
        assert_eq!(mode(&d.path().join("f")) & OPEN_BITS, 0);
        assert_eq!(mode(&d.path().join("f/x")) & OPEN_BITS, 0);
    }
}
