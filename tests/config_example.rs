//! `config.example.toml` documents every option; parsing it here keeps it true.

use p2ptun::agent::Protocol;
use p2ptun::config::{ConfigFile, Overrides};
use p2ptun::tunnel::flow::FlowLimits;

#[test]
fn the_example_config_parses_and_says_what_it_shows() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml");
    let file = ConfigFile::load(path.as_ref()).expect("config.example.toml must parse");
    let opts = file
        .into_options(Overrides::default())
        .expect("config.example.toml must be valid");
    assert_eq!(opts.server, "127.0.0.1:7000");
    assert_eq!(opts.exposes.len(), 2);
    assert_eq!(opts.exposes[0].name, "home-ssh");
    assert_eq!(opts.exposes[0].local, "127.0.0.1:22");
    assert_eq!(opts.exposes[0].protocol, Protocol::Tcp);
    assert_eq!(opts.exposes[1].protocol, Protocol::Udp);
    assert_eq!(opts.exposes[1].flows, FlowLimits::default());
    assert_eq!(opts.forwards.len(), 2);
    assert_eq!(opts.forwards[0].bind, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(opts.forwards[1].protocol, Protocol::Udp);
}

#[test]
fn every_commented_key_is_a_real_key() {
    // Uncommenting every `# key = value` line must still give a valid file: no documented
    // option is misspelt or missing from the parser.
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml");
    let text = std::fs::read_to_string(path).expect("readable");
    let uncommented: String = text
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest) if rest.contains(" = ") && !rest.contains("  ") => rest,
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let opts = ConfigFile::parse(&uncommented)
        .and_then(|f| f.into_options(Overrides::default()))
        .unwrap_or_else(|e| panic!("uncommented example is invalid: {e:#}\n{uncommented}"));
    assert_eq!(opts.token.as_deref(), Some("change-me"));
    assert!(opts.server_fingerprint.is_some());
    assert_eq!(opts.state_dir, std::path::PathBuf::from("/var/lib/p2ptun"));
}
