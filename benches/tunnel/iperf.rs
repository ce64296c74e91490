//! The UDP rows: `iperf3 -u` through a UDP forward, against `iperf3 -u` to the same server
//! over the same link without the tunnel, in the same run.
//!
//! iperf3 sends its UDP test datagrams to the port its TCP control connection went to, so
//! the pair forwards one port number twice: TCP (iperf3's control) and UDP (the test), to
//! two names the exposer serves from the one iperf3 server. Datagrams are 1,200 bytes
//! (`-l 1200`), which every path carries whole; the offered rate is iperf3's `-b`.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::common::{self, Place};

/// The UDP payload iperf3 sends.
pub const DATAGRAM: &str = "1200";

/// The offered rates and directions measured: "up" is the client sending (through the
/// forwarder toward the exposer), "down" is iperf3's `-R`.
pub const RUNS: [(&str, bool); 4] = [("100M", false), ("100M", true), ("1G", false), ("1G", true)];

/// What one `iperf3 -u` run reported.
#[derive(Debug, Clone, Copy, Default)]
pub struct UdpRun {
    /// What the sender sent, Mbit/s.
    pub sent_mbit: f64,
    /// What the receiver received, Mbit/s.
    pub received_mbit: f64,
    /// Datagrams lost, %.
    pub lost_percent: f64,
    /// The receiver's jitter, ms.
    pub jitter_ms: f64,
    /// Datagrams sent.
    pub packets: u64,
}

impl UdpRun {
    fn json(&self) -> Value {
        json!({"sent_mbit_per_s": self.sent_mbit, "received_mbit_per_s": self.received_mbit,
               "lost_percent": self.lost_percent, "jitter_ms": self.jitter_ms, "datagrams": self.packets})
    }
}

/// One offered rate and direction, through the tunnel and raw.
#[derive(Debug, Clone)]
pub struct UdpRow {
    /// `-b`.
    pub rate: &'static str,
    /// `-R`: the server sends.
    pub reverse: bool,
    /// Through the tunnel.
    pub tunnel: Result<UdpRun, String>,
    /// Over the same link without it.
    pub raw: Result<UdpRun, String>,
}

impl UdpRow {
    fn label(&self) -> String {
        format!(
            "{} offered, {}",
            self.rate,
            if self.reverse { "down" } else { "up" }
        )
    }

    /// The row as JSON.
    pub fn json(&self) -> Value {
        let run = |r: &Result<UdpRun, String>| match r {
            Ok(r) => r.json(),
            Err(e) => json!({"error": e}),
        };
        json!({"offered": self.rate, "direction": if self.reverse { "down" } else { "up" },
               "datagram_bytes": DATAGRAM, "p2ptun": run(&self.tunnel), "raw_udp": run(&self.raw)})
    }
}

/// Runs `iperf3 -c HOST -p PORT -u -b RATE -l 1200 -t SECS [-R] -J` in `place`; what the
/// receiving side reported.
pub async fn client(
    place: &Place,
    logs: &std::path::Path,
    host: IpAddr,
    port: u16,
    rate: &str,
    reverse: bool,
    secs: u64,
) -> Result<UdpRun> {
    let mut cmd = place.command("iperf3")?;
    cmd.args(["-c", &host.to_string(), "-p", &port.to_string(), "-u"])
        .args(["-b", rate, "-l", DATAGRAM, "-t", &secs.to_string(), "-J"]);
    if reverse {
        cmd.arg("-R");
    }
    let out = common::run_command(
        "iperf3-client",
        cmd,
        None,
        Duration::from_secs(secs + 20),
        logs,
    )
    .await;
    let report: Value = serde_json::from_str(&out.stdout)
        .with_context(|| format!("iperf3 printed no JSON\n{}", out.describe()))?;
    if let Some(e) = report["error"].as_str() {
        bail!("iperf3: {e}");
    }
    let (sent, received) = (&report["end"]["sum_sent"], &report["end"]["sum_received"]);
    let number = |v: &Value, what: &str| {
        v.as_f64()
            .with_context(|| format!("iperf3's JSON has no {what}\n{}", out.stdout))
    };
    Ok(UdpRun {
        sent_mbit: number(&sent["bits_per_second"], "sum_sent.bits_per_second")? / 1e6,
        received_mbit: number(&received["bits_per_second"], "sum_received.bits_per_second")? / 1e6,
        lost_percent: number(&received["lost_percent"], "sum_received.lost_percent")?,
        jitter_ms: number(&received["jitter_ms"], "sum_received.jitter_ms")?,
        packets: number(&sent["packets"], "sum_sent.packets")? as u64,
    })
}

/// The table's UDP section; `counts` are the agents' datagram counts after it.
pub fn table(o: &mut String, rows: &[UdpRow], note: Option<&str>, counts: &Value) {
    use std::fmt::Write as _;
    let _ = writeln!(
        o,
        "\nUDP, iperf3 -u with {DATAGRAM}-byte datagrams, direct path (Mbit/s received; loss; jitter)"
    );
    if let Some(n) = note {
        let _ = writeln!(o, "  {n}");
    }
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        o,
        "  {:<20} {:>26} {:>26} {:>10}",
        "", "p2ptun", "raw UDP", "p2ptun/raw"
    );
    let cell = |r: &Result<UdpRun, String>| match r {
        Ok(r) => format!(
            "{:.0} ({:.2}%, {:.3} ms)",
            r.received_mbit, r.lost_percent, r.jitter_ms
        ),
        Err(_) => "FAILED".to_owned(),
    };
    for r in rows {
        let ratio = match (&r.tunnel, &r.raw) {
            (Ok(t), Ok(w)) if w.received_mbit > 0.0 => {
                format!("{:.1}%", t.received_mbit / w.received_mbit * 100.0)
            }
            _ => "n/a".to_owned(),
        };
        let _ = writeln!(
            o,
            "  {:<20} {:>26} {:>26} {:>10}",
            r.label(),
            cell(&r.tunnel),
            cell(&r.raw),
            ratio
        );
    }
    for who in ["forwarder", "exposer"] {
        let c = &counts[who];
        if c.is_object() {
            let _ =
                writeln!(
                o,
                "  {who}'s datagrams over all runs: from the local side {}, into the tunnel {}, \
                 too large {}, dropped {}; from the tunnel {}, to the local side {}, dropped {}",
                c["from_local"], c["to_tunnel"], c["too_large"], c["dropped_in"],
                c["from_tunnel"], c["to_local"], c["dropped_out"]
            );
        }
    }
}
