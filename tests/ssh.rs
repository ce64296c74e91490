//! A real OpenSSH session through the tunnel: sshd on 127.0.0.1 with a key made for the test,
//! exposed and forwarded (S and the agents in the test process), then `ssh` runs a command
//! that reads a few MiB from stdin.
//!
//! Needs root, `/usr/sbin/sshd` and `ssh`/`ssh-keygen` (Debian: openssh-server,
//! openssh-client). Without them the test prints "SKIPPED: ..." and passes, except under CI
//! (`CI=true`), where it fails.
//!
//! Run: `cargo test --release --test ssh -- --nocapture`.

use p2ptun_testkit as common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

const SSHD: &str = "/usr/sbin/sshd";

fn missing_tool() -> Option<String> {
    if !Path::new(SSHD).exists() {
        return Some(format!(
            "{SSHD} is not installed (apt-get install openssh-server)"
        ));
    }
    // Spawning succeeds if the program is on PATH, whatever it then says.
    for (tool, arg) in [("ssh", "-V"), ("ssh-keygen", "-?")] {
        if Command::new(tool).arg(arg).output().is_err() {
            return Some(format!(
                "{tool} is not installed (apt-get install openssh-client)"
            ));
        }
    }
    if !is_root() {
        return Some("sshd needs root to log users in".into());
    }
    None
}

async fn keygen(lab: &Lab, path: &Path) {
    let mut cmd = Command::new("ssh-keygen");
    cmd.args(["-q", "-t", "ed25519", "-N", "", "-C", "p2ptun-test", "-f"])
        .arg(path);
    let out = run_command(
        "ssh-keygen",
        cmd,
        None,
        Duration::from_secs(30),
        &lab.logs(),
    )
    .await;
    assert_eq!(out.code(), 0, "ssh-keygen failed\n{}", out.describe());
}

/// Reads the SSH banner on `port`, retrying until `timeout`.
async fn wait_banner(port: u16, procs: &[&dyn Runs], timeout: Duration) {
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < timeout {
        assert_all_running(procs, "waiting for the SSH banner");
        match connect(port).await {
            Ok(mut s) => {
                let mut buf = [0u8; 64];
                match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
                    Ok(Ok(n)) if buf[..n].starts_with(b"SSH-2.0-") => return,
                    other => last = format!("{other:?}"),
                }
            }
            Err(e) => last = format!("{e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!(
        "no SSH banner on 127.0.0.1:{port} within {timeout:?} (last: {last})\n{}",
        reports(procs)
    );
}

async fn ssh(lab: &Lab, key: &Path, port: u16, command: &str, stdin: Vec<u8>) -> RunOutput {
    let mut cmd = Command::new("ssh");
    cmd.arg("-p")
        .arg(port.to_string())
        .arg("-i")
        .arg(key)
        .args([
            "-F",
            "/dev/null",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "ConnectTimeout=20",
            "-o",
            "LogLevel=ERROR",
            "root@127.0.0.1",
            command,
        ]);
    run_command(
        "ssh",
        cmd,
        Some(stdin),
        Duration::from_secs(120),
        &lab.logs(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_openssh_session_through_the_tunnel() {
    if let Some(reason) = missing_tool() {
        skip_or_fail(&reason);
        return;
    }
    let lab = Lab::new("ssh");
    let host_key = lab.path().join("host_ed25519");
    let client_key = lab.path().join("client_ed25519");
    keygen(&lab, &host_key).await;
    keygen(&lab, &client_key).await;
    let pubkey = std::fs::read_to_string(lab.path().join("client_ed25519.pub"))
        .expect("read the client's public key");
    let authorized = lab.write("authorized_keys", &pubkey);
    let sshd_port = free_port();
    let config = lab.write(
        "sshd_config",
        &format!(
            "ListenAddress 127.0.0.1\n\
             HostKey {host}\n\
             AuthorizedKeysFile {auth}\n\
             PidFile {pid}\n\
             StrictModes no\n\
             UsePAM no\n\
             PubkeyAuthentication yes\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             PermitRootLogin prohibit-password\n\
             AllowTcpForwarding no\n\
             X11Forwarding no\n\
             PrintMotd no\n\
             MaxStartups 100\n\
             LogLevel VERBOSE\n",
            host = host_key.display(),
            auth = authorized.display(),
            pid = lab.path().join("sshd.pid").display(),
        ),
    );
    // sshd's privilege-separation directory.
    std::fs::create_dir_all("/run/sshd").expect("create /run/sshd");

    let mut cmd = Command::new(SSHD);
    cmd.args(["-D", "-e", "-f"])
        .arg(&config)
        .arg("-p")
        .arg(sshd_port.to_string());
    let sshd = Proc::spawn("sshd", cmd, &lab.logs());
    wait_banner(sshd_port, &[&sshd], Duration::from_secs(15)).await;

    // First without p2ptun: if this fails, the test's sshd setup is at fault, not the tunnel.
    let direct = ssh(&lab, &client_key, sshd_port, "echo direct-ok", Vec::new()).await;
    assert!(
        direct.code() == 0 && direct.stdout.contains("direct-ok"),
        "ssh straight to the test's sshd failed (a problem of the test setup, not of p2ptun)\n{}\n{}",
        direct.describe(),
        sshd.brief()
    );

    // S and the agents in this process: the point is OpenSSH through the tunnel.
    let tunnel = Kit::new(&lab, "home")
        .in_process()
        .start(vec![sshd_port.to_string()])
        .await;
    let port = tunnel.port();
    let mut procs = tunnel.parts();
    procs.insert(0, &sshd);
    wait_banner(port, &procs, TUNNEL_READY).await;

    let mut payload = Vec::new();
    let mut gen = DataGen::new(0x55_4848, 4 << 20);
    while let Some(c) = gen.next_chunk() {
        payload.extend_from_slice(c);
    }
    let want = hex(&Sha256::digest(&payload));
    let out = ssh(
        &lab,
        &client_key,
        port,
        "echo hello-through-p2ptun; sha256sum",
        payload,
    )
    .await;
    assert_eq!(
        out.code(),
        0,
        "ssh through the tunnel failed\n{}\n{}",
        out.describe(),
        reports(&procs)
    );
    assert_eq!(
        out.stdout,
        format!("hello-through-p2ptun\n{want}  -\n"),
        "unexpected output of ssh through the tunnel\n{}",
        out.describe()
    );
    println!("ssh through p2ptun: 4 MiB on stdin, sha256 {want} on both sides");
    for p in procs {
        p.assert_no_panic();
    }
}
