//! `tessera completions SHELL`: the shell completion script on stdout (the Debian package
//! installs them; `tessera completions bash > /etc/bash_completion.d/tessera` otherwise).

use anyhow::Result;
use clap::CommandFactory;

/// Print a completion script for bash, zsh, fish, elvish or powershell.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

pub fn run(a: Args) -> Result<()> {
    let mut cmd = super::Cli::command();
    clap_complete::generate(a.shell, &mut cmd, "tessera", &mut std::io::stdout());
    Ok(())
}
