//! The `tessera` command line: argument definitions and the helpers subcommands share.
//! One file per subcommand; each turns its arguments into one engine or control-socket call.

pub mod clone;
pub mod completions;
pub mod du;
pub mod fsck;
pub mod gc;
pub mod init;
pub mod mount;
pub mod restore;
pub mod scrub;
pub mod serve;
pub mod snapshot;
pub mod stats;
pub mod stream;
pub mod warm;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};

use tessera::control::{self, LockError};
use tessera::fs::{Engine, Tuning, META_FILE, PACK_DIR};

/// Tessera: a deduplicating datastore for virtual desktop images.
#[derive(Parser, Debug)]
#[command(name = "tessera", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    Init(init::Args),
    Restore(restore::Args),
    Mount(mount::Args),
    Serve(serve::Args),
    Clone(clone::Args),
    Stats(stats::Args),
    Du(du::Args),
    Fsck(fsck::Args),
    Gc(gc::Args),
    Scrub(scrub::Args),
    Warm(warm::Args),
    Snapshot(snapshot::Args),
    Send(stream::SendArgs),
    Receive(stream::ReceiveArgs),
    Promote(stream::PromoteArgs),
    Replicate(stream::ReplicateArgs),
    Completions(completions::Args),
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Init(a) => init::run(a),
        Cmd::Restore(a) => restore::run(a),
        Cmd::Mount(a) => mount::run(a),
        Cmd::Serve(a) => serve::run(a),
        Cmd::Clone(a) => clone::run(a),
        Cmd::Stats(a) => stats::run(a),
        Cmd::Du(a) => du::run(a),
        Cmd::Fsck(a) => fsck::run(a),
        Cmd::Gc(a) => gc::run(a),
        Cmd::Scrub(a) => scrub::run(a),
        Cmd::Warm(a) => warm::run(a),
        Cmd::Snapshot(a) => snapshot::run(a),
        Cmd::Send(a) => stream::send(a),
        Cmd::Receive(a) => stream::receive(a),
        Cmd::Promote(a) => stream::promote(a),
        Cmd::Replicate(a) => stream::replicate(a),
        Cmd::Completions(a) => completions::run(a),
    }
}

/// Is `dir` a datastore folder?
pub fn is_datastore(dir: &Path) -> bool {
    dir.join(META_FILE).is_file() && dir.join(PACK_DIR).is_dir()
}

/// The datastore folder given on the command line, checked.
pub fn datastore_arg(dir: &Path) -> Result<PathBuf> {
    let abs = std::fs::canonicalize(dir)
        .with_context(|| format!("{}: no such datastore folder", dir.display()))?;
    if !is_datastore(&abs) {
        bail!(
            "{} is not a Tessera datastore (create one with `tessera init {}`)",
            dir.display(),
            dir.display()
        );
    }
    Ok(abs)
}

/// Either this process owns the datastore, or another process serves it.
pub enum Access {
    Own(control::DatastoreLock, Box<Engine>),
    Served(PathBuf),
}

/// Open the datastore ourselves if nobody holds it, else find the process that serves it.
pub fn access(dir: &Path) -> Result<Access> {
    match control::lock(dir) {
        Ok(lock) => {
            let engine = Engine::open(dir, Tuning::default())
                .map_err(|e| anyhow!("cannot open datastore {}: {e}", dir.display()))?;
            Ok(Access::Own(lock, Box::new(engine)))
        }
        Err(LockError::Busy(pid)) => {
            match control::call(dir, &control::Request::Ping, Duration::from_secs(5)) {
                Ok(r) if r.ok => Ok(Access::Served(dir.to_path_buf())),
                _ => bail!(
                    "datastore {} is busy: process {pid} holds it but does not answer on its control socket; \
                     wait for it to finish or stop it",
                    dir.display()
                ),
            }
        }
        Err(LockError::Io(e)) => Err(anyhow!("cannot lock datastore {}: {e}", dir.display())),
    }
}

/// Ask the serving process; turn its error into ours.
pub fn ask(dir: &Path, req: &control::Request) -> Result<serde_json::Value> {
    let r = control::call(dir, req, Duration::from_secs(600))
        .with_context(|| format!("the process serving {} did not answer", dir.display()))?;
    if !r.ok {
        bail!("{}", r.error);
    }
    Ok(r.result)
}

/// `ask` with a progress bar on a terminal for a long request (gc, scrub, warm).
pub fn ask_with_progress(
    dir: &Path,
    req: &control::Request,
    what: &str,
) -> Result<serde_json::Value> {
    let pb = progress_bar(0, what);
    let r = control::call_with_progress(dir, req, Duration::from_secs(600), &|done, total| {
        pb.set_length(total);
        pb.set_position(done);
    });
    pb.finish_and_clear();
    let r = r.with_context(|| format!("the process serving {} did not answer", dir.display()))?;
    if !r.ok {
        bail!("{}", r.error);
    }
    Ok(r.result)
}

/// Where a user-given path lives: its datastore and the path inside it.
#[derive(Debug, PartialEq, Eq)]
pub struct Located {
    pub datastore: PathBuf,
    /// Path inside the datastore, starting with `/`.
    pub inner: String,
    /// The mount point it was found through, if any.
    pub mount: Option<PathBuf>,
}

impl Located {
    /// Where a user reads `inner` (a path inside this datastore): under the mount it was found
    /// through, else named inside the datastore.
    pub fn datastore_path(&self, inner: &str) -> String {
        match &self.mount {
            Some(m) => m.join(inner.trim_start_matches('/')).display().to_string(),
            None => format!(
                "{inner} (inside {}: mount it or export it over NFS)",
                self.datastore.display()
            ),
        }
    }
}

/// Tessera FUSE mounts: (mount point, datastore folder). The mount's source is the datastore.
fn tessera_mounts() -> Vec<(PathBuf, PathBuf)> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let unescape = |s: &str| {
        s.replace("\\040", " ")
            .replace("\\011", "\t")
            .replace("\\012", "\n")
            .replace("\\134", "\\")
    };
    let mut out = Vec::new();
    for line in info.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let pre: Vec<&str> = pre.split(' ').collect();
        let post: Vec<&str> = post.split(' ').collect();
        // fuser's own mount code does not set the subtype: recognise the datastore by its source.
        if pre.len() > 4 && post.len() > 1 && (post[0] == "fuse" || post[0] == "fuse.tessera") {
            let source = PathBuf::from(unescape(post[1]));
            if is_datastore(&source) {
                out.push((PathBuf::from(unescape(pre[4])), source));
            }
        }
    }
    out
}

/// An absolute, normalised path (`.` and `..` resolved textually after the longest existing
/// prefix is canonicalised), so paths that do not exist yet can be located.
fn absolute(p: &Path) -> Result<PathBuf> {
    let abs = std::path::absolute(p).with_context(|| format!("bad path {}", p.display()))?;
    let mut existing = abs.clone();
    let mut rest = Vec::new();
    while std::fs::symlink_metadata(&existing).is_err() {
        match (existing.file_name(), existing.parent()) {
            (Some(n), Some(parent)) => {
                rest.push(n.to_os_string());
                existing = parent.to_path_buf();
            }
            _ => break,
        }
    }
    let mut out = std::fs::canonicalize(&existing).unwrap_or(existing);
    for n in rest.into_iter().rev() {
        if n == ".." {
            out.pop();
        } else if n != "." {
            out.push(n);
        }
    }
    Ok(out)
}

/// Find the datastore of a path on a Tessera mount or inside a datastore folder.
pub fn locate(p: &Path) -> Result<Located> {
    let abs = absolute(p)?;
    let to_inner = |rest: &Path| -> Result<String> {
        let s = rest
            .to_str()
            .ok_or_else(|| anyhow!("{}: path is not valid UTF-8", p.display()))?;
        Ok(format!("/{}", s.trim_start_matches('/')))
    };
    let mut best: Option<(PathBuf, PathBuf)> = None;
    for (mp, ds) in tessera_mounts() {
        if abs.starts_with(&mp)
            && best
                .as_ref()
                .is_none_or(|b| mp.as_os_str().len() > b.0.as_os_str().len())
        {
            best = Some((mp, ds));
        }
    }
    if let Some((mp, ds)) = best {
        let rest = abs.strip_prefix(&mp).expect("prefix checked");
        return Ok(Located {
            datastore: ds,
            inner: to_inner(rest)?,
            mount: Some(mp),
        });
    }
    for anc in abs.ancestors() {
        if is_datastore(anc) {
            let rest = abs.strip_prefix(anc).expect("ancestor");
            return Ok(Located {
                datastore: anc.to_path_buf(),
                inner: to_inner(rest)?,
                mount: None,
            });
        }
    }
    bail!(
        "{} is neither on a Tessera mount nor inside a datastore folder",
        p.display()
    )
}

/// Parse a byte size such as `512M`, `2G`, `1GiB` or `65536`.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits: String = t.chars().take_while(|c| c.is_ascii_digit()).collect();
    let unit = t[digits.len()..].trim().to_ascii_lowercase();
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size (try 512M or 2G)"))?;
    let shift = match unit.as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(format!("{s:?}: unknown unit (use K, M, G or T)")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Parse a byte size that fits 32 bits, such as `16K`, `16KiB`, `64k` or `16384`.
pub fn parse_size(s: &str) -> Result<u32, String> {
    u32::try_from(parse_bytes(s)?).map_err(|_| format!("{s:?} is too large"))
}

/// Run a long engine operation with a progress bar on a terminal (nothing otherwise); the
/// operation reports `(done, total)`.
pub fn with_progress<T, E>(
    what: &str,
    op: impl FnOnce(&dyn Fn(u64, u64)) -> Result<T, E>,
) -> Result<T, E> {
    let pb = progress_bar(0, what);
    let r = op(&|done, total| {
        pb.set_length(total);
        pb.set_position(done);
    });
    pb.finish_and_clear();
    r
}

/// A progress bar on a terminal, nothing otherwise.
pub fn progress_bar(len: u64, what: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(len);
    pb.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} ({eta})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("16K"), Ok(16384));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("8G").is_err());
        assert_eq!(parse_bytes("2G"), Ok(2 << 30));
        assert_eq!(parse_bytes("48M"), Ok(48 << 20));
    }

    #[test]
    fn locate_finds_paths_inside_a_datastore_folder() {
        let d = tempfile::tempdir().unwrap();
        let ds = d.path().join("ds");
        Engine::create(&ds, Default::default()).unwrap();
        let l = locate(&ds.join("templates/x.raw")).unwrap();
        assert_eq!(l.inner, "/templates/x.raw");
        assert_eq!(l.datastore, std::fs::canonicalize(&ds).unwrap());
        assert!(locate(d.path()).is_err());
    }

    /// Protects man/: the pages must match the clap definitions (regenerate with
    /// `UPDATE_MAN=1 cargo test man_pages`).
    #[test]
    fn man_pages_match_cli() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("man");
        let cmd = Cli::command();
        let mut pages = vec![(cmd.get_name().to_string(), cmd.clone())];
        for sub in cmd.get_subcommands() {
            pages.push((format!("tessera-{}", sub.get_name()), sub.clone()));
        }
        for (name, c) in pages {
            let mut buf = Vec::new();
            clap_mangen::Man::new(c.name(&*Box::leak(name.clone().into_boxed_str())))
                .render(&mut buf)
                .unwrap();
            let path = dir.join(format!("{name}.1"));
            if std::env::var_os("UPDATE_MAN").is_some() {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, &buf).unwrap();
            }
            let have = std::fs::read(&path).unwrap_or_default();
            assert!(
                have == buf,
                "{} is out of date: run UPDATE_MAN=1 cargo test man_pages",
                path.display()
            );
        }
    }
}
