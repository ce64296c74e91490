//! Documentation generated from a clap command: shell completions and man pages.
//!
//! Both binaries, `p2ptun` and `p2ptun-relay`, take these as the subcommands `completions`
//! and `man` (flattened from [`DocCommand`]) and hand them, with their own command, to
//! [`DocCommand::run`]. Nothing here reads a configuration or the state directory.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Subcommand;
use clap_complete::Shell;

/// The subcommands that print documentation generated from the command line itself.
#[derive(Debug, Clone, Subcommand)]
pub enum DocCommand {
    /// Print a shell completion script to stdout.
    ///
    /// Where the shells look for it, NAME being this program's name: bash,
    /// /usr/share/bash-completion/completions/NAME; zsh, _NAME in a directory of $fpath;
    /// fish, ~/.config/fish/completions/NAME.fish.
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: Shell,
    },
    /// Print the man page, or write all of them with --dir.
    Man {
        /// Write NAME.1 and one NAME-COMMAND.1 per command into this directory (made if
        /// missing), instead of printing NAME.1 to stdout.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

impl DocCommand {
    /// Prints or writes what this subcommand asks for, about `cmd` (the binary's whole
    /// command, as `Cli::command()` builds it).
    pub fn run(&self, mut cmd: clap::Command) -> anyhow::Result<()> {
        // Rendered whole first: clap_complete panics on a failed write (a closed pipe).
        let mut text = Vec::new();
        match self {
            DocCommand::Completions { shell } => {
                let name = cmd.get_name().to_owned();
                clap_complete::generate(*shell, &mut cmd, name, &mut text);
            }
            DocCommand::Man { dir: None } => {
                let (cmd, source) = for_pages(cmd);
                clap_mangen::Man::new(cmd)
                    .source(source)
                    .render(&mut text)
                    .context("cannot render the man page")?;
            }
            DocCommand::Man { dir: Some(dir) } => {
                // The pages are for installing; a directory that is not there yet is one the
                // user means to fill, as `install -D` would.
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
                return write_pages(cmd, dir)
                    .with_context(|| format!("cannot write the man pages in {}", dir.display()));
            }
        }
        let mut out = std::io::stdout().lock();
        match out.write_all(&text).and_then(|()| out.flush()) {
            // `| head` has read what it wanted.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            other => other.context("cannot write to stdout"),
        }
    }
}

/// `cmd` made ready for clap_mangen, and the footer its pages carry: the program's name and
/// version.
///
/// Without a `help` subcommand, whose page would only repeat the others'; built, which names
/// each subcommand after its parent (`p2ptun-expose`), as its page is called. clap_mangen
/// would write `expose` alone in the footer of a subcommand's page: subcommands have no
/// version of their own.
fn for_pages(cmd: clap::Command) -> (clap::Command, String) {
    let source = format!(
        "{} {}",
        cmd.get_name(),
        cmd.get_version().unwrap_or_default()
    );
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    (cmd, source.trim_end().to_owned())
}

/// Writes the man page of `cmd` and of each of its subcommands into `dir`.
fn write_pages(cmd: clap::Command, dir: &Path) -> std::io::Result<()> {
    fn write(cmd: &clap::Command, source: &str, dir: &Path) -> std::io::Result<()> {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            write(sub, source, dir)?;
        }
        clap_mangen::Man::new(cmd.clone())
            .source(source)
            .generate_to(dir)
            .map(drop)
    }
    let (cmd, source) = for_pages(cmd);
    write(&cmd, &source, dir)
}
