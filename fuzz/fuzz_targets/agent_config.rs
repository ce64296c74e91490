//! The agent's config file (`ConfigFile::parse`, then `into_options`) and the address forms
//! of its flags (`parse_target`, `parse_server`, `parse_bind`). Errors are errors; what
//! parses is what the forms promise.
#![no_main]

use libfuzzer_sys::fuzz_target;
use p2ptun::config::{parse_bind, parse_server, parse_target, ConfigFile, Overrides};
use p2ptun::proto::validate_name;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(file) = ConfigFile::parse(text) {
        if let Ok(options) = file.into_options(Overrides::default()) {
            assert!(!options.exposes.is_empty() || !options.forwards.is_empty());
            assert!(parse_server(&options.server).is_ok());
            for e in &options.exposes {
                assert!(validate_name(&e.name).is_ok());
                assert!(parse_target(&e.local).is_ok());
            }
            for f in &options.forwards {
                assert!(validate_name(&f.name).is_ok());
            }
        }
    }
    for line in text.lines() {
        if let Ok(target) = parse_target(line) {
            // Normalised forms parse again to themselves.
            assert_eq!(parse_target(&target).as_deref(), Ok(target.as_str()));
        }
        let _ = parse_server(line);
        if let Ok(bind) = parse_bind(line) {
            assert_eq!(parse_bind(&bind.to_string()), Ok(bind));
        }
    }
});
