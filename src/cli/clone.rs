//! `tessera clone`: O(1) clones of files and VM folders, through the serving process when the
//! datastore is mounted.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{anyhow, bail, Result};

use tessera::control::Request;
use tessera::fs::clone::CloneError;

/// Clone a file or folder inside a datastore: instant, no space used until the copies diverge.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Source: a path on a Tessera mount or inside a datastore folder.
    pub src: PathBuf,
    /// Destination (must not exist). With --count, must contain `{n}` or `{n:03}`.
    pub dst: PathBuf,
    /// Make this many clones, numbering them into DST's `{n}`.
    #[arg(long, default_value_t = 1)]
    pub count: u32,
    /// First number for `{n}`.
    #[arg(long, default_value_t = 1)]
    pub start: u64,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Clones from which a terminal shows a progress bar (fewer take a blink).
const PROGRESS_FROM: usize = 100;

/// Expand `{n}` / `{n:0W}` in `pat` with `n`.
pub fn expand(pat: &str, n: u64) -> Result<String> {
    let Some(open) = pat.find("{n") else {
        return Ok(pat.to_string());
    };
    let close = pat[open..]
        .find('}')
        .ok_or_else(|| anyhow!("unclosed `{{n` in {pat}"))?
        + open;
    let spec = &pat[open + 2..close];
    let num = match spec.strip_prefix(':') {
        None if spec.is_empty() => n.to_string(),
        Some(w) if w.starts_with('0') && w.len() > 1 => {
            let width: usize = w[1..]
                .parse()
                .map_err(|_| anyhow!("bad width in {{n{spec}}}"))?;
            format!("{n:0width$}")
        }
        Some(w) => {
            let width: usize = w.parse().map_err(|_| anyhow!("bad width in {{n{spec}}}"))?;
            format!("{n:width$}")
        }
        None => bail!("unknown pattern {{n{spec}}}: use {{n}} or {{n:03}}"),
    };
    Ok(format!("{}{}{}", &pat[..open], num, &pat[close + 1..]))
}

pub fn run(a: Args) -> Result<()> {
    let t0 = Instant::now();
    let dst_s = a
        .dst
        .to_str()
        .ok_or_else(|| anyhow!("destination is not valid UTF-8"))?;
    if a.count == 0 {
        bail!("--count must be at least 1");
    }
    if a.count > 1 && !dst_s.contains("{n") {
        bail!(
            "--count {} needs a numbering pattern in DST, like desk-{{n:03}}",
            a.count
        );
    }
    let src = super::locate(&a.src)?;
    let mut dsts = Vec::with_capacity(a.count as usize);
    for i in 0..u64::from(a.count) {
        let d = super::locate(&PathBuf::from(expand(dst_s, a.start + i)?))?;
        if d.datastore != src.datastore {
            bail!(
                "{} and {} are in different datastores ({} and {}); a clone shares data and cannot cross datastores",
                a.src.display(),
                a.dst.display(),
                src.datastore.display(),
                d.datastore.display()
            );
        }
        dsts.push(d.inner);
    }
    let n = dsts.len();
    match super::access(&src.datastore)? {
        super::Access::Served(dir) => {
            let req = Request::Clone {
                src: src.inner.clone(),
                dsts: dsts.clone(),
            };
            if n >= PROGRESS_FROM {
                super::ask_with_progress(&dir, &req, "cloning")?;
            } else {
                super::ask(&dir, &req)?;
            }
        }
        super::Access::Own(_lock, engine) => {
            let d: Vec<Vec<u8>> = dsts.iter().map(|s| s.clone().into_bytes()).collect();
            let show = n >= PROGRESS_FROM;
            super::with_progress("cloning", |p| {
                engine.clone_paths_progress(
                    src.inner.as_bytes(),
                    &d,
                    if show { p } else { &|_, _| {} },
                )
            })
            .map_err(|e| match e {
                CloneError::Fs(e) => anyhow!("clone failed: {e}"),
                e => anyhow!("{e}"),
            })?;
        }
    }
    let ms = t0.elapsed().as_secs_f64() * 1000.0;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"src": src.inner, "dsts": dsts, "clones": n, "millis": ms})
        );
    } else if n == 1 {
        println!(
            "cloned {} -> {} in {ms:.1} ms",
            a.src.display(),
            expand(dst_s, a.start)?
        );
    } else {
        println!(
            "cloned {} into {n} copies ({} .. {}) in {ms:.1} ms",
            a.src.display(),
            dsts[0],
            dsts[n - 1]
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::expand;

    #[test]
    fn patterns_expand() {
        assert_eq!(expand("desk-{n:03}", 7).unwrap(), "desk-007");
        assert_eq!(expand("desk-{n}.raw", 12).unwrap(), "desk-12.raw");
        assert_eq!(expand("plain", 3).unwrap(), "plain");
        assert!(expand("d-{n:x}", 1).is_err());
    }
}
