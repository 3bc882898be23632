//! The `tessera` binary: parses the command line, runs the subcommand, maps errors to a
//! one-line message and exit code 1 (2 for usage errors, from clap).

mod alloc;
mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TESSERA_LOG")
                // fuser logs unimplemented requests and a harmless second unmount at WARN;
                // nfs3_server logs every client-side error (a NOENT, a bad handle) at ERROR
                // and each connection at INFO. Tessera logs what an admin must see itself;
                // refused peers (nfs3_server::tcp) stay visible. object_store logs each retry
                // at INFO; the tier reports failures that outlast the retries itself.
                .unwrap_or_else(|_| {
                    "info,fuser=error,nfs3_server=off,nfs3_server::tcp=warn,object_store=warn"
                        .into()
                }),
        )
        .with_writer(std::io::stderr)
        .init();
    raise_nofile_limit();
    match cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tessera: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Raise the soft limit on open files to the hard limit. A serving process holds descriptors
/// for packs (up to `MAX_OPEN_PACKS`), NFS clients, FUSE and redb; the soft limit a shell
/// gives (often 1024) is a default for small programs, not a limit an admin chose for us.
fn raise_nofile_limit() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `r` is a valid, writable rlimit for getrlimit to fill in.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 || r.rlim_cur >= r.rlim_max {
        return;
    }
    let want = libc::rlimit {
        rlim_cur: r.rlim_max,
        rlim_max: r.rlim_max,
    };
    // SAFETY: `want` is a valid rlimit; raising the soft limit up to the hard one is always
    // permitted, and a failure only leaves the old limit in place.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } != 0 {
        tracing::debug!(
            "cannot raise the open-file limit: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    /// Protects: the soft open-file limit ends up at the hard limit (packs, NFS clients and
    /// FUSE all need descriptors).
    #[test]
    fn open_file_limit_is_raised_to_the_hard_limit() {
        let get = || {
            let mut r = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: `r` is a valid, writable rlimit.
            assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) }, 0);
            r
        };
        let hard = get().rlim_max;
        // Start from a low soft limit, as a login shell gives.
        let low = libc::rlimit {
            rlim_cur: hard.min(256),
            rlim_max: hard,
        };
        // SAFETY: lowering the soft limit below the hard one is always permitted.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &low) }, 0);
        super::raise_nofile_limit();
        assert_eq!(get().rlim_cur, hard);
    }
}
