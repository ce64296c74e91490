//! What is shipped for installing p2ptun: the systemd units in dist/systemd/ and the shell
//! completions and man pages both binaries generate (`completions`, `man`).
//!
//! The units are checked by `systemd-analyze verify` (which needs neither root nor systemd
//! as PID 1) and for the sandbox options they promise; they are not started here, since the
//! test machines do not run systemd. The completions are syntax-checked by the shells that
//! are installed, the man pages by groff or mandoc when either is.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use clap::CommandFactory as _;
use p2ptun_testkit::{agent_bin, relay_bin};

const UNITS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/dist/systemd");

/// One of the two binaries, with what its generated documentation must cover.
struct Bin {
    name: &'static str,
    path: PathBuf,
    /// The subcommands a user can name (clap's `help` aside).
    commands: Vec<String>,
}

fn agent() -> Bin {
    Bin {
        name: "p2ptun",
        path: agent_bin(),
        commands: commands(p2ptun::cli::Cli::command()),
    }
}

fn relay() -> Bin {
    Bin {
        name: "p2ptun-relay",
        path: relay_bin(),
        commands: commands(p2ptun_relay::cli::Cli::command()),
    }
}

fn commands(cmd: clap::Command) -> Vec<String> {
    let names: Vec<String> = cmd
        .get_subcommands()
        .filter(|c| !c.is_hide_set())
        .map(|c| c.get_name().to_owned())
        .collect();
    assert!(names.iter().any(|n| n == "man"), "{names:?}");
    names
}

/// Runs `program args` and returns its output, whatever its exit status.
fn run(program: impl AsRef<std::ffi::OsStr>, args: &[&str], stdin: &[u8]) -> Output {
    use std::io::Write as _;
    let program = program.as_ref();
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program:?}: {e}"));
    let mut input = child.stdin.take().expect("stdin is piped");
    // A program that does not read its stdin closes it; that is no failure here.
    let _ = input.write_all(stdin);
    drop(input);
    child.wait_with_output().expect("the child's output")
}

/// Runs a binary of ours and returns its stdout, panicking (with its stderr) if it fails.
fn stdout_of(bin: &Bin, args: &[&str]) -> String {
    let out = run(&bin.path, args, b"");
    assert!(
        out.status.success(),
        "{} {args:?}: {}\n{}",
        bin.name,
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Says why a check is skipped; on CI (CI=true), where every tool is installed, fails instead.
fn skip(why: &str) {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{why} (CI=true: nothing may be skipped)");
    }
    eprintln!("SKIPPED: {why}");
}

fn read_unit(name: &str) -> String {
    let path = Path::new(UNITS).join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The values of `key=` in a unit, in order (comments aside).
fn values<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .collect()
}

#[test]
fn the_units_pass_systemd_analyze_verify() {
    if !have("systemd-analyze") {
        return skip("systemd-analyze is not installed (Debian: apt-get install systemd)");
    }
    let dir = tempfile::tempdir().unwrap();
    // verify checks that ExecStart's binary exists: the units run the binaries just built
    // instead of /usr/local/bin's.
    let (agent, relay) = (agent(), relay());
    let mut units = Vec::new();
    for (file, copies, bin) in [
        (
            "p2ptun-relay.service",
            &["p2ptun-relay.service"][..],
            &relay,
        ),
        (
            "p2ptun@.service",
            &["p2ptun@.service", "p2ptun@example.service"][..],
            &agent,
        ),
    ] {
        let text = read_unit(file);
        let installed = format!("ExecStart=/usr/local/bin/{} ", bin.name);
        assert!(text.contains(&installed), "{file} runs {installed}");
        let text = text.replace(&installed, &format!("ExecStart={} ", bin.path.display()));
        for copy in copies {
            let path = dir.path().join(copy);
            std::fs::write(&path, &text).unwrap();
            units.push(path.display().to_string());
        }
    }
    // verify also looks up each Documentation=man:PAGE: MANPATH points it at the pages the
    // binaries generate, which are not installed here.
    let man1 = dir.path().join("man/man1");
    for bin in [&agent, &relay] {
        stdout_of(bin, &["man", "--dir", man1.to_str().unwrap()]);
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&units)
        .env("MANPATH", dir.path().join("man"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify {units:?}: {}\n{said}",
        out.status
    );
}

#[test]
fn the_units_keep_their_sandbox_and_state_directory() {
    for file in ["p2ptun-relay.service", "p2ptun@.service"] {
        let unit = read_unit(file);
        for line in [
            "DynamicUser=yes",
            "CapabilityBoundingSet=",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "ProtectHome=yes",
            "PrivateTmp=yes",
            "PrivateDevices=yes",
            "RestrictNamespaces=yes",
            "LockPersonality=yes",
            "MemoryDenyWriteExecute=yes",
            "SystemCallFilter=@system-service",
            "Restart=on-failure",
        ] {
            assert!(unit.lines().any(|l| l == line), "{file} lacks {line}");
        }
        assert!(values(&unit, "AmbientCapabilities").is_empty(), "{file}");
        // With ProtectSystem=strict the state directory is the one place the service may
        // write: the program must be told to keep its state there.
        let state = values(&unit, "StateDirectory");
        assert_eq!(state.len(), 1, "{file}: {state:?}");
        let told = format!("%S/{}", state[0]);
        let exec = values(&unit, "ExecStart").join(" ");
        let env = values(&unit, "Environment").join(" ");
        assert!(
            exec.contains(&format!("--state-dir {told}"))
                || env.contains(&format!("P2PTUN_STATE_DIR={told}")),
            "{file}: the program is not told to keep its state in {told}"
        );
    }
    let agent = read_unit("p2ptun@.service");
    let families = values(&agent, "RestrictAddressFamilies").join(" ");
    // getifaddrs (the agent's own addresses) asks the kernel over netlink; the status
    // socket is a Unix socket.
    for family in ["AF_INET", "AF_INET6", "AF_UNIX", "AF_NETLINK"] {
        assert!(families.split(' ').any(|f| f == family), "{families}");
    }
    // Port mapping reads the default gateway from /proc/net/route.
    assert!(values(&agent, "ProcSubset").is_empty());
}

#[test]
fn completions_cover_every_command_and_parse() {
    for bin in [agent(), relay()] {
        for shell in ["bash", "zsh", "fish"] {
            let script = stdout_of(&bin, &["completions", shell]);
            assert!(!script.trim().is_empty(), "{} {shell}", bin.name);
            for command in &bin.commands {
                assert!(
                    script.contains(command.as_str()),
                    "{} {shell}: no {command}",
                    bin.name
                );
            }
            let check: &[&str] = match shell {
                "bash" => &["-n"],
                "zsh" => &["-n"],
                _ => &["--no-execute"],
            };
            if !have(shell) {
                // Only bash is expected on the test machines; zsh and fish are optional.
                if shell == "bash" {
                    skip("bash is not installed");
                } else {
                    eprintln!("{shell} is not installed: its script is not syntax-checked");
                }
                continue;
            }
            let out = run(shell, check, script.as_bytes());
            assert!(
                out.status.success() && out.stderr.is_empty(),
                "{shell} {check:?} on `{} completions {shell}`: {}",
                bin.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let out = run(&bin.path, &["completions", "tcsh"], b"");
        assert!(!out.status.success(), "{}: tcsh accepted", bin.name);
    }
}

#[test]
fn man_pages_are_written_for_every_command_and_parse() {
    let dir = tempfile::tempdir().unwrap();
    for bin in [agent(), relay()] {
        // A directory that does not exist yet is made.
        let pages = dir.path().join(bin.name).join("man1");
        stdout_of(&bin, &["man", "--dir", pages.to_str().unwrap()]);
        let written: BTreeSet<String> = std::fs::read_dir(&pages)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        let expected: BTreeSet<String> = std::iter::once(format!("{}.1", bin.name))
            .chain(bin.commands.iter().map(|c| format!("{}-{c}.1", bin.name)))
            .collect();
        assert_eq!(written, expected, "{}", bin.name);

        for page in &expected {
            let path = pages.join(page);
            let text = std::fs::read_to_string(&path).unwrap();
            let title = page.trim_end_matches(".1");
            let version = format!("\"{} {}\"", bin.name, env!("CARGO_PKG_VERSION"));
            assert!(
                text.lines()
                    .any(|l| l.starts_with(&format!(".TH {title} 1 ")) && l.contains(&version)),
                "{page}: no .TH {title} 1 ... {version}"
            );
            for section in [".SH NAME", ".SH SYNOPSIS", ".SH DESCRIPTION"] {
                assert!(text.lines().any(|l| l == section), "{page}: no {section}");
            }
            lint_man_page(&path);
        }
        // Without --dir: the main page, on stdout.
        let main = std::fs::read_to_string(pages.join(format!("{}.1", bin.name))).unwrap();
        assert_eq!(stdout_of(&bin, &["man"]), main, "{}", bin.name);

        // A directory that cannot be made is an error that says which, not a panic.
        let blocked = dir.path().join(format!("{}-file", bin.name));
        std::fs::write(&blocked, "").unwrap();
        let target = blocked.join("man1");
        let out = run(&bin.path, &["man", "--dir", target.to_str().unwrap()], b"");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.code() == Some(1) && err.contains(&*target.to_string_lossy()),
            "{}: {}: {err}",
            bin.name,
            out.status
        );
    }
}

/// groff (with every warning) or mandoc must read `page` without a word.
fn lint_man_page(page: &Path) {
    let page_arg = page.to_str().unwrap();
    let (program, args) = if have("groff") {
        ("groff", vec!["-man", "-Tutf8", "-ww", "-z", page_arg])
    } else if have("mandoc") {
        ("mandoc", vec!["-T", "lint", "-W", "warning", page_arg])
    } else {
        return skip(&format!(
            "neither groff nor mandoc is installed (Debian: groff-base): {page_arg} is not linted"
        ));
    };
    let out = run(program, &args, b"");
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_relay_runs_no_server_flags_with_a_documentation_command() {
    let out = run(
        relay_bin(),
        &["--listen", "127.0.0.1:1", "completions", "bash"],
        b"",
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(2) && err.contains("cannot be used with"),
        "{}: {err}",
        out.status
    );
}
