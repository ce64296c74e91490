//! S's config file (`FileConfig::parse`, `into_config`, `validate`) and what S derives from
//! it at start: the alternate STUN address and the relay budgets. A config that validates
//! has a usable alternate STUN address and budgets S can run with.
#![no_main]

use std::path::Path;
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use p2ptun_relay::config::FileConfig;
use p2ptun_relay::relay::Sessions;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(file) = FileConfig::parse(text, Path::new("relay.toml")) else {
        return;
    };
    let Ok(config) = file.into_config() else {
        return;
    };
    let _ = format!("{config:?}");
    if config.validate().is_err() {
        return;
    }
    let alt = config
        .stun_alt_bind()
        .expect("a valid config has an alternate STUN address");
    assert!(alt != config.listen || alt.port() == 0);
    let sessions = Sessions::<()>::new(config.relay);
    let _ = sessions.sweep_every();
    let mut sessions = sessions;
    let _ = sessions.sweep(Instant::now());
});
