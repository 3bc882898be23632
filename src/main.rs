//! The `tessera` binary: parses the command line, runs the subcommand, maps errors to a
//! one-line message and exit code 1 (2 for usage errors, from clap).

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
                // refused peers (nfs3_server::tcp) stay visible.
                .unwrap_or_else(|_| {
                    "info,fuser=error,nfs3_server=off,nfs3_server::tcp=warn".into()
                }),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tessera: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
