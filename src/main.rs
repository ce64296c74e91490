//! The `p2ptun` agent binary.

use std::process::ExitCode;

use clap::{CommandFactory as _, Parser};
use p2ptun::agent::Protocol;
use p2ptun::agent::{self, ping, ping::PingRequest};
use p2ptun::cli::{Cli, Command};
use p2ptun::config::{default_state_dir, ConfigFile, ExposeEntry, ForwardEntry, Overrides};
use p2ptun::tunnel::Identity;
use tokio::sync::mpsc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match runtime(cli.global.threads) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The async runtime: on the calling thread for one thread, else a pool of `threads`.
///
/// One quinn connection is driven by one task, so a pool adds cross-core wake-ups between
/// that task, the socket and the stream copies: in the benchmark one thread moved about a
/// sixth more through one direct connection than two, hence the default of one.
fn runtime(threads: u16) -> std::io::Result<tokio::runtime::Runtime> {
    if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.into())
            .enable_all()
            .build()
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let g = cli.global;
    let portmap = g.portmap_mode();
    let over = Overrides {
        server: g.server,
        token: g.token,
        server_fingerprint: g.server_fingerprint,
        state_dir: g.state_dir,
        bind: g.bind,
        portmap,
    };
    let file = match cli.command {
        Command::Doc(doc) => return doc.run(Cli::command()),
        Command::Id => {
            let dir = over.state_dir.unwrap_or_else(default_state_dir);
            let id = Identity::load_or_create(&agent::identity_path(&dir))?;
            println!("{}", id.fingerprint());
            return Ok(());
        }
        Command::Status { json } => {
            let dir = over.state_dir.unwrap_or_else(default_state_dir);
            let statuses = agent::socket::query(&dir).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&statuses)?);
            } else {
                print!("{}", agent::status::render(&statuses));
            }
            return Ok(());
        }
        Command::Ping {
            name,
            count,
            interval,
        } => {
            let req = PingRequest {
                name,
                count,
                interval_ms: interval.as_millis().try_into().unwrap_or(u64::MAX),
            };
            return ping(req, over).await;
        }
        Command::Netcheck { json } => {
            let server = over
                .server
                .unwrap_or_else(|| p2ptun::config::DEFAULT_SERVER.to_owned());
            // A cluster's S share one network view; the first one answers for all.
            let server = p2ptun::config::parse_servers(&server)
                .map_err(anyhow::Error::msg)?
                .into_iter()
                .next()
                .unwrap_or_default();
            let bind = over
                .bind
                .unwrap_or_else(|| std::net::SocketAddr::from(([0u16; 8], 0)));
            let report = agent::netcheck(&server, bind, over.portmap.unwrap_or_default()).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("S:          {server}");
                print!("{report}");
            }
            return Ok(());
        }
        Command::Release { name } => {
            let opts = ConfigFile::default().connection_options(over)?;
            let server = opts.server.clone();
            agent::release(opts, &name).await?;
            println!("released '{name}': any key may claim it on {server} now");
            return Ok(());
        }
        Command::Reload => {
            let dir = over.state_dir.unwrap_or_else(default_state_dir);
            println!("reloaded: {}", agent::socket::reload(&dir).await?);
            return Ok(());
        }
        Command::Up { config } => {
            let opts = ConfigFile::load(&config)?.into_options(over.clone())?;
            let source = agent::services::Source::new(config, move |path| {
                ConfigFile::load(path)?.into_options(over.clone())
            });
            return agent::run(opts, Some(source)).await;
        }
        Command::Expose {
            local,
            name,
            allow,
            udp,
        } => ConfigFile {
            expose: vec![ExposeEntry {
                name,
                local,
                allow,
                protocol: protocol(udp),
                idle_timeout_secs: None,
                max_flows: None,
            }],
            ..Default::default()
        },
        Command::Forward { name, local, udp } => ConfigFile {
            forward: vec![ForwardEntry {
                name,
                local: local.to_string(),
                protocol: protocol(udp),
                idle_timeout_secs: None,
                max_flows: None,
            }],
            ..Default::default()
        },
    };
    agent::run(file.into_options(over)?, None).await
}

/// `p2ptun ping`: through the agent running with the state directory, or an agent of its
/// own; prints each event as it comes, then a summary. Fails if no ping was answered.
async fn ping(req: PingRequest, over: Overrides) -> anyhow::Result<()> {
    let dir = over.state_dir.clone().unwrap_or_else(default_state_dir);
    let (tx, mut rx) = mpsc::channel(16);
    let print = async {
        let mut events = Vec::new();
        while let Some(event) = rx.recv().await {
            // A failure to start is the command's error, said once at the end.
            if !matches!(event, ping::PingEvent::Failed { .. }) {
                println!("{}", ping::render(&req.name, &event));
            }
            events.push(event);
        }
        events
    };
    let ask = async {
        if dir.exists() && agent::socket::ping(&dir, &req, tx.clone()).await? {
            return anyhow::Ok(());
        }
        // No agent runs here: one of our own, serving nothing, for as long as the pings last.
        let own = agent::Agent::start(ConfigFile::default().connection_options(over)?).await?;
        own.ping(&req, tx).await;
        own.shutdown().await;
        Ok(())
    };
    let (asked, events) = tokio::join!(ask, print);
    asked?;
    println!("{}", ping::summary(&req.name, &events));
    if let Some(ping::PingEvent::Failed { reason }) = events.last() {
        anyhow::bail!("{reason}");
    }
    if !events
        .iter()
        .any(|e| matches!(e, ping::PingEvent::Pong { .. }))
    {
        anyhow::bail!("no ping to '{}' was answered", req.name);
    }
    Ok(())
}

/// The protocol of a service given `--udp` or not.
fn protocol(udp: bool) -> Protocol {
    if udp {
        Protocol::Udp
    } else {
        Protocol::Tcp
    }
}
