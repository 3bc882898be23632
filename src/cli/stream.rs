//! `tessera send`, `tessera receive`, `tessera promote`: replicate snapshots between datastores
//! over any pipe (`tessera send ... | ssh host tessera receive ...`), and fail over.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};

use tessera::control::{self, Request};
use tessera::fs::receive::ReceiveReport;
use tessera::fs::send::SendReport;

/// Write a snapshot (or what changed since an older one) to stdout as a stream for `tessera
/// receive`. Chunks go as stored (compressed), each once.
#[derive(clap::Args, Debug)]
pub struct SendArgs {
    /// PATH@SNAPSHOT: a snapshot of a file or folder on a Tessera mount or in a datastore folder.
    pub snapshot: String,
    /// Send only what changed since this older snapshot of the same path (the receiver must
    /// hold it: it received it before).
    #[arg(long, value_name = "OLDER")]
    pub from: Option<String>,
    /// Print the report as JSON on stderr.
    #[arg(long)]
    pub json: bool,
}

/// Read a stream of `tessera send` from stdin into a datastore, as a read-only replica with the
/// sender's snapshot.
#[derive(clap::Args, Debug)]
pub struct ReceiveArgs {
    /// The datastore (folder or mount), or a path inside it to put the replica at (default:
    /// the path it was sent from).
    pub target: PathBuf,
    /// Apply an incremental stream to a path that is writable (promoted after a failover),
    /// replacing what changed there since the stream's base snapshot: the failback step.
    #[arg(long)]
    pub force: bool,
    #[arg(long)]
    pub json: bool,
}

/// Make a replica writable: the failover step. Its snapshots stay.
#[derive(clap::Args, Debug)]
pub struct PromoteArgs {
    pub path: PathBuf,
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

pub fn send(a: SendArgs) -> Result<()> {
    let (path, snap) = a
        .snapshot
        .rsplit_once('@')
        .ok_or_else(|| anyhow!("{}: name a snapshot as PATH@SNAPSHOT", a.snapshot))?;
    let mut stdout = std::io::stdout().lock();
    if stdout.is_terminal() {
        bail!(
            "the stream is binary: redirect it (tessera send {} > FILE, or | tessera receive DS)",
            a.snapshot
        );
    }
    let l = super::locate(&PathBuf::from(path))?;
    let t0 = Instant::now();
    let rep: SendReport = match super::access(&l.datastore)? {
        super::Access::Served(d) => {
            let r = control::call_send(
                &d,
                &Request::Send {
                    path: l.inner.clone(),
                    snap: snap.to_string(),
                    from: a.from.clone(),
                },
                &mut stdout,
            )
            .with_context(|| format!("sending {}", a.snapshot))?;
            if !r.ok {
                bail!("{}", fix(&r.error, path, snap));
            }
            serde_json::from_value(r.result)?
        }
        super::Access::Own(_lock, engine) => {
            let pb = super::progress_bar(0, "sending");
            let r = engine
                .send(
                    &l.inner,
                    snap,
                    a.from.as_deref(),
                    &mut stdout,
                    None,
                    &|d, t| {
                        pb.set_length(t);
                        pb.set_position(d);
                    },
                )
                .map_err(|e| anyhow!("{}", fix(&e.to_string(), path, snap)));
            pb.finish_and_clear();
            r?
        }
    };
    stdout.flush()?;
    let s = t0.elapsed().as_secs_f64();
    if a.json {
        eprintln!("{}", serde_json::to_string(&rep)?);
    } else {
        eprintln!(
            "sent {}{}: {} entries, {} chunks ({:.1} MiB as stored), {:.1} MiB stream in {s:.1} s",
            a.snapshot,
            a.from
                .as_ref()
                .map(|f| format!(" since {f}"))
                .unwrap_or_default(),
            rep.entries,
            rep.chunks,
            mib(rep.chunk_bytes),
            mib(rep.stream_bytes)
        );
    }
    Ok(())
}

/// Errors in the user's terms.
fn fix(e: &str, path: &str, snap: &str) -> String {
    if e.ends_with("no such file or directory") {
        format!("{path} has no snapshot {snap} (or no --from snapshot of that name): see tessera snapshot list {path}")
    } else {
        e.to_string()
    }
}

pub fn receive(a: ReceiveArgs) -> Result<()> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        bail!(
            "receive reads a stream from stdin: tessera send PATH@SNAP | tessera receive {}",
            a.target.display()
        );
    }
    let l = super::locate(&a.target)?;
    let target = (!l.inner.trim_matches('/').is_empty()).then(|| l.inner.clone());
    let t0 = Instant::now();
    let pb = super::progress_bar(0, "receiving");
    pb.set_style(
        indicatif::ProgressStyle::with_template("{msg} {pos} entries ({elapsed})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    let rep: Result<ReceiveReport> = match super::access(&l.datastore)? {
        super::Access::Served(d) => (|| {
            let r = control::call_receive(
                &d,
                &Request::Receive {
                    target: target.clone(),
                    force: a.force,
                },
                Box::new(stdin),
                &|done, _| pb.set_position(done),
            )
            .with_context(|| format!("the process serving {} did not answer", d.display()))?;
            if !r.ok {
                bail!("{}", r.error);
            }
            Ok(serde_json::from_value(r.result)?)
        })(),
        super::Access::Own(_lock, engine) => engine
            .receive(Box::new(stdin), target.as_deref(), a.force, &|done, _| {
                pb.set_position(done)
            })
            .map_err(|e| anyhow!("receive failed: {e}")),
    };
    pb.finish_and_clear();
    let rep = rep.map_err(|e| match e.to_string() {
        s if s.ends_with("already exists") => anyhow!(
            "{} already exists: receive a full stream into a new path (tessera receive DS/NEW/PATH), or send with --from a snapshot it holds",
            target.as_deref().unwrap_or("the stream's path")
        ),
        _ => e,
    })?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rep)?);
    } else {
        let snap = rep
            .snapshot
            .as_ref()
            .map(|s| s.name.as_str())
            .unwrap_or("?");
        println!(
            "received {}@{snap}{}: {} entries, {} chunks ({} already here), {:.1} MiB in {:.1} s; read-only until tessera promote",
            rep.path,
            if rep.incremental { " (incremental)" } else { "" },
            rep.entries,
            rep.chunks,
            rep.chunks_already_held,
            mib(rep.stream_bytes),
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

pub fn promote(a: PromoteArgs) -> Result<()> {
    let l = super::locate(&a.path)?;
    let n: u64 = match super::access(&l.datastore)? {
        super::Access::Served(d) => {
            let v = super::ask(
                &d,
                &Request::Promote {
                    path: l.inner.clone(),
                },
            )?;
            v["inodes"].as_u64().unwrap_or(0)
        }
        super::Access::Own(_lock, engine) => engine
            .promote(&l.inner)
            .map_err(|e| anyhow!("{}: {e}", a.path.display()))?,
    };
    println!(
        "{} is writable now ({n} files and folders); its snapshots stay",
        a.path.display()
    );
    Ok(())
}

/// Replicate a file or VM folder to another datastore's `tessera serve --replication` over TCP:
/// a new point in time, sent from the newest one both sides hold, only data new to the target
/// crossing. With --every, the serving process does it on that schedule (the RPO).
#[derive(clap::Args, Debug)]
pub struct ReplicateArgs {
    /// A file or folder on a Tessera mount or in a datastore folder.
    pub path: PathBuf,
    /// The receiver: HOST:PORT of `tessera serve --replication` on the target.
    #[arg(long, value_name = "HOST:PORT", required_unless_present = "off")]
    pub to: Option<String>,
    /// Where the receiver puts it (default: the same path).
    #[arg(long, value_name = "PATH")]
    pub target: Option<String>,
    /// MiB per second at most (0: unlimited).
    #[arg(long, value_name = "MIB_PER_S", default_value_t = 0)]
    pub max_rate: u64,
    /// Replicate on this schedule in the serving process instead of now: 15m, 1h, 1d.
    #[arg(long, value_parser = super::snapshot::parse_interval)]
    pub every: Option<u64>,
    /// Remove the schedule of PATH.
    #[arg(long, conflicts_with_all = ["every", "to"])]
    pub off: bool,
    #[arg(long)]
    pub json: bool,
}

pub fn replicate(a: ReplicateArgs) -> Result<()> {
    let l = super::locate(&a.path)?;
    if a.off || a.every.is_some() {
        let d = match super::access(&l.datastore)? {
            super::Access::Served(d) => d,
            super::Access::Own(..) => bail!(
                "nothing serves {}: schedules run in the serving process; start `tessera serve {} --nfs` (or --mount) first",
                l.datastore.display(),
                l.datastore.display()
            ),
        };
        super::ask(
            &d,
            &Request::ReplicateSchedule {
                path: l.inner.clone(),
                to: a.to.clone().unwrap_or_default(),
                every: a.every,
                max_rate_mib: a.max_rate,
            },
        )
        .map_err(|e| match e.to_string() {
            s if a.off && s.ends_with("no such file or directory") => {
                anyhow!("{} has no replication schedule", a.path.display())
            }
            _ => e,
        })?;
        match a.every {
            Some(s) => println!(
                "{} is replicated to {} every {s} s by the serving process; see tessera stats",
                a.path.display(),
                a.to.as_deref().unwrap_or("?")
            ),
            None => println!("replication schedule of {} removed", a.path.display()),
        }
        return Ok(());
    }
    let to = a.to.clone().expect("required by clap");
    let t0 = Instant::now();
    let rep: tessera::replicate::ReplicateReport = match super::access(&l.datastore)? {
        super::Access::Served(d) => serde_json::from_value(super::ask_with_progress(
            &d,
            &Request::Replicate {
                path: l.inner.clone(),
                to: to.clone(),
                target: a.target.clone(),
                max_rate_mib: a.max_rate,
            },
            "replicating",
        )?)?,
        super::Access::Own(_lock, engine) => {
            let pb = super::progress_bar(0, "replicating");
            let o = tessera::replicate::Options {
                target: a.target.clone(),
                max_rate: (a.max_rate > 0).then_some(a.max_rate << 20),
            };
            let r = tessera::replicate::run(&engine, &l.inner, &to, &o, &|d, t| {
                pb.set_length(t);
                pb.set_position(d);
            });
            pb.finish_and_clear();
            r.map_err(|e| anyhow!("replication of {} to {to} failed: {e}", a.path.display()))?
        }
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rep)?);
    } else {
        println!(
            "replicated {} to {to} as {}{}{}: {} chunks sent ({:.1} MiB as stored), {} the target held, {:.1} MiB on the wire in {:.1} s",
            a.path.display(),
            rep.snapshot,
            rep.base.as_ref().map(|b| format!(" (since {b})")).unwrap_or_else(|| " (full)".into()),
            if rep.resumed { ", resumed" } else { "" },
            rep.sent.chunks,
            mib(rep.sent.chunk_bytes),
            rep.sent.chunks_held_by_receiver,
            mib(rep.sent.stream_bytes),
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
