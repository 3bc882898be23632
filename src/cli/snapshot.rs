//! `tessera snapshot`: read-only point-in-time copies of files and VM folders, rollback,
//! restore, retention and schedules, through the serving process when the datastore is served.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};

use tessera::control::Request;
use tessera::fs::du::Usage;
use tessera::fs::snapshot::{Keep, Schedule, SnapAction, SnapshotInfo};

/// Snapshots of files and VM folders: instant, read-only, under `/.snapshots` of the datastore.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub cmd: Sub,
}

#[derive(clap::Subcommand, Debug)]
pub enum Sub {
    /// Take a snapshot of a file or folder (one atomic, durable step; no data is copied).
    Create {
        /// A file or folder on a Tessera mount or inside a datastore folder.
        path: PathBuf,
        /// Its name (default: the UTC time, like 20261130-052011).
        name: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// List the snapshots of PATH and of everything under it (a datastore or mount: all).
    List {
        #[arg(default_value = ".")]
        path: PathBuf,
        /// Also show what each snapshot holds alone and what deleting it frees (walks it).
        #[arg(long)]
        du: bool,
        #[arg(long)]
        json: bool,
    },
    /// Delete a snapshot; the space it holds alone is given back by reclamation.
    Delete { path: PathBuf, name: String },
    /// Make PATH hold exactly what snapshot NAME holds. Newer snapshots are kept. Stop the VM
    /// first: its disk changes under it.
    Rollback { path: PathBuf, name: String },
    /// Make a writable copy of snapshot NAME of PATH at DST (which must not exist).
    Restore {
        path: PathBuf,
        name: String,
        dst: PathBuf,
    },
    /// Delete the snapshots of PATH the rules do not keep.
    Prune {
        path: PathBuf,
        #[command(flatten)]
        keep: KeepArgs,
        /// Only say what would be deleted.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
    /// Snapshot PATH on a schedule in the serving process, pruning the schedule's own snapshots
    /// by its rules. Without options, show the schedules.
    Schedule {
        path: PathBuf,
        /// Interval: 30m, 1h, 1d (at least 1m).
        #[arg(long, value_parser = parse_interval)]
        every: Option<u64>,
        #[command(flatten)]
        keep: KeepArgs,
        /// Remove the schedule of PATH (its snapshots stay).
        #[arg(long, conflicts_with = "every")]
        off: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args, Debug, Clone, Copy)]
pub struct KeepArgs {
    /// Keep the N newest.
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_last: u64,
    /// Keep the newest of each of the last N hours that have one.
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_hourly: u64,
    /// Keep the newest of each of the last N days (UTC) that have one.
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_daily: u64,
}

impl From<KeepArgs> for Keep {
    fn from(k: KeepArgs) -> Keep {
        Keep {
            last: k.keep_last,
            hourly: k.keep_hourly,
            daily: k.keep_daily,
        }
    }
}

/// `90s`, `30m`, `1h`, `1d` (or plain seconds) as seconds.
pub fn parse_interval(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 's')) => (&s[..i], 1),
        Some((i, 'm')) => (&s[..i], 60),
        Some((i, 'h')) => (&s[..i], 3600),
        Some((i, 'd')) => (&s[..i], 86_400),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{s}: give an interval like 30m, 1h or 1d"))
}

/// Run `action` on the datastore holding `path`, through its serving process if it has one.
fn act(datastore: &Path, action: SnapAction) -> Result<serde_json::Value> {
    match super::access(datastore)? {
        super::Access::Served(d) => super::ask(&d, &Request::Snapshot { action }),
        super::Access::Own(_lock, engine) => {
            engine.snapshot_action(&action).map_err(|e| anyhow!("{e}"))
        }
    }
}

fn name_error(e: anyhow::Error, path: &Path, name: &str) -> anyhow::Error {
    match e.to_string().as_str() {
        "no such file or directory" => anyhow!(
            "{} has no snapshot {name} (or the path does not exist): see tessera snapshot list {}",
            path.display(),
            path.display()
        ),
        _ => anyhow!("{}: {e}", path.display()),
    }
}

pub fn run(a: Args) -> Result<()> {
    match a.cmd {
        Sub::Create { path, name, json } => {
            let l = super::locate(&path)?;
            let v = act(
                &l.datastore,
                SnapAction::Create {
                    path: l.inner.clone(),
                    name: name.clone(),
                },
            )
            .map_err(|e| match e.to_string().as_str() {
                "already exists" => anyhow!(
                    "{} already has a snapshot {}: choose another name",
                    path.display(),
                    name.as_deref().unwrap_or("of this second")
                ),
                _ => anyhow!("{}: {e}", path.display()),
            })?;
            let s: SnapshotInfo = serde_json::from_value(v)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!(
                    "snapshot {} of {} taken; read it at {}",
                    s.name,
                    path.display(),
                    l.datastore_path(&s.location)
                );
            }
        }
        Sub::List { path, du, json } => {
            let l = super::locate(&path)?;
            let all: Vec<SnapshotInfo> =
                serde_json::from_value(act(&l.datastore, SnapAction::List)?)?;
            let prefix = l.inner.trim_end_matches('/').to_string();
            let mine: Vec<SnapshotInfo> = all
                .into_iter()
                .filter(|s| {
                    prefix.is_empty()
                        || s.path == prefix
                        || s.path.starts_with(&format!("{prefix}/"))
                })
                .collect();
            let usage: Vec<Option<Usage>> = if du {
                mine.iter()
                    .map(|s| du_of(&l.datastore, &s.location).map(Some))
                    .collect::<Result<_>>()?
            } else {
                vec![None; mine.len()]
            };
            if json {
                let v: Vec<serde_json::Value> = mine
                    .iter()
                    .zip(&usage)
                    .map(|(s, u)| {
                        let mut v = serde_json::to_value(s).unwrap_or_default();
                        if let Some(u) = u {
                            v["unique_bytes"] = u.unique_bytes.into();
                            v["freed_on_delete_bytes"] = u.freed_on_delete_bytes.into();
                        }
                        v
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            if mine.is_empty() {
                println!("no snapshots of {}", path.display());
                return Ok(());
            }
            let w_path = mine.iter().map(|s| s.path.len()).max().unwrap_or(4).max(4);
            let w_name = mine.iter().map(|s| s.name.len()).max().unwrap_or(4).max(4);
            let h = super::stats::human;
            print!(
                "{:<w_path$}  {:<w_name$}  {:<20}  {:<9}",
                "PATH", "NAME", "CREATED (UTC)", "TAKEN BY"
            );
            if du {
                print!("  {:>10}  {:>10}", "UNIQUE", "FREED");
            }
            println!();
            for (s, u) in mine.iter().zip(&usage) {
                print!(
                    "{:<w_path$}  {:<w_name$}  {:<20}  {:<9}",
                    s.path,
                    s.name,
                    s.created_utc,
                    if s.scheduled { "schedule" } else { "user" }
                );
                if let Some(u) = u {
                    print!(
                        "  {:>10}  {:>10}",
                        h(u.unique_bytes),
                        h(u.freed_on_delete_bytes)
                    );
                }
                println!();
            }
            println!("read them under {}", l.datastore_path("/.snapshots"));
        }
        Sub::Delete { path, name } => {
            let l = super::locate(&path)?;
            act(
                &l.datastore,
                SnapAction::Delete {
                    path: l.inner.clone(),
                    name: name.clone(),
                },
            )
            .map_err(|e| name_error(e, &path, &name))?;
            println!("snapshot {name} of {} deleted", path.display());
        }
        Sub::Rollback { path, name } => {
            let l = super::locate(&path)?;
            act(
                &l.datastore,
                SnapAction::Rollback {
                    path: l.inner.clone(),
                    name: name.clone(),
                },
            )
            .map_err(|e| name_error(e, &path, &name))?;
            println!("{} rolled back to snapshot {name}", path.display());
        }
        Sub::Restore { path, name, dst } => {
            let l = super::locate(&path)?;
            let d = super::locate(&dst)?;
            if d.datastore != l.datastore {
                bail!(
                    "{} is in another datastore than {}: a restore shares data and stays in its datastore",
                    dst.display(),
                    path.display()
                );
            }
            act(
                &l.datastore,
                SnapAction::Restore {
                    path: l.inner.clone(),
                    name: name.clone(),
                    dst: d.inner.clone(),
                },
            )
            .map_err(|e| match e.to_string().as_str() {
                "already exists" => anyhow!("{} already exists: choose a new path", dst.display()),
                _ => name_error(e, &path, &name),
            })?;
            println!(
                "snapshot {name} of {} restored to {}",
                path.display(),
                dst.display()
            );
        }
        Sub::Prune {
            path,
            keep,
            dry_run,
            json,
        } => {
            let l = super::locate(&path)?;
            let v = act(
                &l.datastore,
                SnapAction::Prune {
                    path: l.inner.clone(),
                    keep: keep.into(),
                    dry_run,
                },
            )
            .map_err(|e| anyhow!("{}: {e}", path.display()))?;
            let gone: Vec<SnapshotInfo> = serde_json::from_value(v)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&gone)?);
            } else {
                let verb = if dry_run { "would delete" } else { "deleted" };
                for s in &gone {
                    println!("{verb} {} {} ({})", s.path, s.name, s.created_utc);
                }
                println!("{} snapshot(s) {verb}", gone.len());
            }
        }
        Sub::Schedule {
            path,
            every,
            keep,
            off,
            json,
        } => {
            let l = super::locate(&path)?;
            if off || every.is_some() {
                act(
                    &l.datastore,
                    SnapAction::Schedule {
                        path: l.inner.clone(),
                        every,
                        keep: keep.into(),
                    },
                )
                .map_err(|e| match e.to_string().as_str() {
                    "no such file or directory" if off => {
                        anyhow!("{} has no snapshot schedule", path.display())
                    }
                    _ => anyhow!("{}: {e}", path.display()),
                })?;
                if off {
                    println!(
                        "schedule of {} removed (its snapshots stay)",
                        path.display()
                    );
                } else {
                    println!(
                        "{} is snapshotted every {} by the serving process (tessera serve)",
                        path.display(),
                        show_interval(every.unwrap_or(0))
                    );
                }
                return Ok(());
            }
            let all: Vec<Schedule> =
                serde_json::from_value(act(&l.datastore, SnapAction::Schedules)?)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else if all.is_empty() {
                println!("no snapshot schedules");
            } else {
                println!(
                    "{:<30}  {:>6}  {:>9}  {:>11}  {:>10}",
                    "PATH", "EVERY", "KEEP LAST", "KEEP HOURLY", "KEEP DAILY"
                );
                for s in all {
                    println!(
                        "{:<30}  {:>6}  {:>9}  {:>11}  {:>10}",
                        s.path,
                        show_interval(s.every),
                        s.keep.last,
                        s.keep.hourly,
                        s.keep.daily
                    );
                }
            }
        }
    }
    Ok(())
}

fn show_interval(s: u64) -> String {
    match s {
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// `tessera du` of a snapshot's location.
fn du_of(datastore: &Path, location: &str) -> Result<Usage> {
    match super::access(datastore)? {
        super::Access::Served(d) => Ok(serde_json::from_value(super::ask(
            &d,
            &Request::Du {
                path: location.to_string(),
            },
        )?)?),
        super::Access::Own(_lock, engine) => {
            engine.du(location).map_err(|e| anyhow!("{location}: {e}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_parse() {
        assert_eq!(parse_interval("90s"), Ok(90));
        assert_eq!(parse_interval("30m"), Ok(1800));
        assert_eq!(parse_interval("1h"), Ok(3600));
        assert_eq!(parse_interval("2d"), Ok(172_800));
        assert_eq!(parse_interval("600"), Ok(600));
        assert!(parse_interval("h").is_err());
        assert!(parse_interval("1w").is_err());
        assert_eq!(show_interval(3600), "1h");
        assert_eq!(show_interval(90), "90s");
    }
}
