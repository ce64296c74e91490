//! The `p2ptun-relay` binary: parses the command line, sets up logging and runs S.

use std::io::IsTerminal as _;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{CommandFactory as _, Parser};
use p2ptun_relay::cli::Cli;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report(&e);
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(doc) = &cli.doc {
        return doc.run(Cli::command());
    }
    let config = cli.into_config().context("invalid configuration")?;
    if config.tokens.is_empty() {
        eprintln!(
            "WARNING: open registration: anyone who can reach this server can claim names. \
             Set `tokens` in the configuration or pass --token."
        );
    }
    p2ptun_relay::run(config).await
}

/// Prints an error and its causes, one per line, without a backtrace: the messages are
/// written to say what to do. A cause already spelled out in the line above is skipped.
fn report(e: &anyhow::Error) {
    let mut last = e.to_string();
    eprintln!("error: {last}");
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !last.contains(&text) {
            eprintln!("  caused by: {text}");
        }
        last = text;
    }
}
