//! The status page on the metrics address: a [`Status`] snapshot that [`collect`] asks S's
//! owners for (the directory, the name registry, the relay sessions, the counters), and its
//! renderings, HTML ([`render_html`], one self-contained page that reloads itself) and JSON.
//! This module keeps no state of its own: every request takes a fresh snapshot.
//!
//! S sees only what passes through it. Two agents it introduced that found a direct path
//! talk past S, so a relay session's byte count that stays still means a direct path or an
//! idle pair, and S cannot tell which; the page says so rather than guess.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::limits::ConnLimits;
use crate::metrics::Metrics;
use crate::shared::{Carrier, Shared};

/// How often the HTML page reloads itself, in seconds.
pub const REFRESH_SECS: u32 = 5;
/// Rows each HTML table shows at most; `/status.json` has them all. Keeps a page for an S
/// with thousands of agents readable and cheap to render.
pub const MAX_ROWS: usize = 500;

/// What the status page shows, taken at one moment.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Status {
    /// When the snapshot was taken, Unix seconds.
    pub taken_unix: u64,
    /// Whether S relays at all (`relay_session_bytes` > 0).
    pub relaying: bool,
    /// The registered agents connected now, by fingerprint.
    pub agents: Vec<AgentRow>,
    /// Every claimed name, by name.
    pub names: Vec<NameRow>,
    /// The relay sessions held now, most bytes first.
    pub sessions: Vec<SessionRow>,
    /// S's counters since it started, and its gauges now.
    pub totals: Totals,
    /// Connections and registrations refused since S started, by the limit that refused.
    pub refusals: Vec<Count>,
    /// Relay sessions closed since S started, by why.
    pub sessions_closed: Vec<Count>,
}

/// A registered agent.
#[derive(Debug, Clone, Serialize)]
pub struct AgentRow {
    /// Its identity, `SHA256:…`.
    pub fingerprint: String,
    /// Its address as S sees it (its NAT's public side).
    pub observed: String,
    /// How its control connection reaches S: `UDP`, or `TCP` (QUIC framed on TCP).
    pub control: &'static str,
    /// The names it exposes (none for an agent that only forwards).
    pub names: Vec<String>,
}

/// A claimed name.
#[derive(Debug, Clone, Serialize)]
pub struct NameRow {
    /// The name.
    pub name: String,
    /// The fingerprint of the identity that claimed it.
    pub owner: String,
    /// Whether an agent connected now exposes it.
    pub live: bool,
    /// When its owner last used it, Unix seconds (recorded at most hourly).
    pub last_used_unix: u64,
}

/// A relay session: made when S introduced two agents, whether or not they then went direct.
#[derive(Debug, Clone, Serialize)]
pub struct SessionRow {
    /// The session ID, in hex.
    pub id: String,
    /// The fingerprint of the agent that asked for the introduction.
    pub forwarder: String,
    /// The fingerprint of the agent it was introduced to.
    pub exposer: String,
    /// Relay payload bytes S carried for it, both ways.
    pub bytes_relayed: u64,
    /// Seconds since a packet crossed it (or since it was made).
    pub idle_secs: u64,
}

/// S's totals.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Totals {
    /// QUIC connections held now.
    pub connections: u64,
    /// Registrations since S started.
    pub registrations: u64,
    /// Introductions since S started.
    pub introductions: u64,
    /// Relay sessions made since S started.
    pub relay_sessions: u64,
    /// Relay payload bytes sent on to agents since S started.
    pub relay_bytes: u64,
}

/// A labelled count.
#[derive(Debug, Clone, Serialize)]
pub struct Count {
    /// What is counted (a configuration key, or a reason).
    pub label: &'static str,
    /// How many.
    pub count: u64,
}

fn counts(pairs: Vec<(&'static str, u64)>) -> Vec<Count> {
    pairs
        .into_iter()
        .map(|(label, count)| Count { label, count })
        .collect()
}

/// Takes a snapshot from the owners. One lock at a time, each released before the next
/// (names before the directory, as everywhere), so a page never holds up S for long; the
/// parts may therefore be a moment apart.
pub fn collect(shared: &Shared, limits: &ConnLimits) -> Status {
    let claims = shared.names().claims();
    let online = shared.directory().list();
    let relaying = shared.relay().enabled();
    let sessions = shared.relay().list(Instant::now());
    let metrics = &shared.metrics;

    let mut agents: Vec<AgentRow> = online
        .into_iter()
        .map(|(fingerprint, names, agent)| AgentRow {
            fingerprint: fingerprint.to_string(),
            observed: agent.remote().to_string(),
            control: match agent.carrier {
                Carrier::Udp => "UDP",
                Carrier::Tcp { .. } => "TCP",
            },
            names,
        })
        .collect();
    agents.sort_by(|a, b| a.fingerprint.cmp(&b.fingerprint));
    let live: std::collections::HashSet<&str> = agents
        .iter()
        .flat_map(|a| a.names.iter().map(String::as_str))
        .collect();
    let names = claims
        .into_iter()
        .map(|(name, owner, last_used_unix)| NameRow {
            live: live.contains(name.as_str()),
            name,
            owner: owner.to_string(),
            last_used_unix,
        })
        .collect();
    let mut sessions: Vec<SessionRow> = sessions
        .into_iter()
        .map(|s| SessionRow {
            id: format!("{:016x}", s.id),
            forwarder: s.forwarder.fingerprint.to_string(),
            exposer: s.exposer.fingerprint.to_string(),
            bytes_relayed: s.bytes,
            idle_secs: s.idle.as_secs(),
        })
        .collect();
    sessions.sort_by(|a, b| (b.bytes_relayed, &a.id).cmp(&(a.bytes_relayed, &b.id)));
    Status {
        taken_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        relaying,
        agents,
        names,
        sessions,
        totals: Totals {
            connections: limits.total().into(),
            registrations: Metrics::get(&metrics.registrations_total),
            introductions: Metrics::get(&metrics.sessions_total),
            relay_sessions: Metrics::get(&metrics.relay_sessions_total),
            relay_bytes: Metrics::get(&metrics.relay_bytes_total),
        },
        refusals: counts(metrics.refusals()),
        sessions_closed: counts(metrics.relay_closed_counts()),
    }
}

/// `s` made safe to put in HTML text and in quoted attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// "12 s", "5 min", "3 h", "2 d": the largest whole unit.
fn ago(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s} s"),
        s if s < 2 * 3600 => format!("{} min", s / 60),
        s if s < 2 * 86400 => format!("{} h", s / 3600),
        s => format!("{} d", s / 86400),
    }
}

/// Bytes with a binary unit, e.g. "1.5 MiB"; exact below a KiB.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}\
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.4em 0 .4em}\
table{border-collapse:collapse;background:#fff}th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}\
th{background:#eee}td.n{text-align:right;font-variant-numeric:tabular-nums}\
code{font:12px ui-monospace,monospace}.muted{color:#777}.live{color:#070;font-weight:600}\
.hit{color:#a00;font-weight:600}.note{max-width:60em;color:#555}\
dl{display:grid;grid-template-columns:max-content max-content;gap:.1em 1em}dt{color:#555}dd{margin:0;text-align:right}";

/// Writes a table: its header row, then at most [`MAX_ROWS`] rows, then a line saying how
/// many were left out; `empty` is said instead of an empty table.
fn table<T>(out: &mut String, heads: &[&str], rows: &[T], empty: &str, row: impl Fn(&T) -> String) {
    if rows.is_empty() {
        let _ = writeln!(out, "<p class=\"muted\">{}</p>", escape(empty));
        return;
    }
    out.push_str("<table><tr>");
    for h in heads {
        let _ = write!(out, "<th>{}</th>", escape(h));
    }
    out.push_str("</tr>\n");
    for r in rows.iter().take(MAX_ROWS) {
        let _ = writeln!(out, "<tr>{}</tr>", row(r));
    }
    out.push_str("</table>\n");
    if rows.len() > MAX_ROWS {
        let _ = writeln!(
            out,
            "<p class=\"muted\">{} more not shown; <a href=\"/status.json\">/status.json</a> has them all.</p>",
            rows.len() - MAX_ROWS
        );
    }
}

/// The whole page: plain HTML with inline CSS, no script and nothing fetched from elsewhere.
/// Every string that came from an agent or from disk goes through [`escape`].
pub fn render_html(status: &Status) -> String {
    let mut out = String::with_capacity(8192);
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_SECS}\">\
         <meta name=\"viewport\" content=\"width=device-width\">\
         <title>p2ptun S status</title><style>{STYLE}</style></head><body>\n\
         <h1>p2ptun S: status</h1>\n<p class=\"muted\">Reloads every {REFRESH_SECS} s. \
         Also as <a href=\"/status.json\">JSON</a>; counters for Prometheus on \
         <a href=\"/metrics\">/metrics</a>.</p>\n"
    );
    let t = &status.totals;
    let _ = writeln!(
        out,
        "<dl id=\"totals\"><dt>agents online</dt><dd>{}</dd><dt>names claimed</dt><dd>{}</dd>\
         <dt>connections held</dt><dd>{}</dd><dt>registrations since start</dt><dd>{}</dd>\
         <dt>introductions since start</dt><dd>{}</dd><dt>relay sessions held</dt><dd>{}</dd>\
         <dt>relay sessions since start</dt><dd>{}</dd>\
         <dt>bytes relayed since start</dt><dd id=\"relay-bytes\">{} ({})</dd></dl>",
        status.agents.len(),
        status.names.len(),
        t.connections,
        t.registrations,
        t.introductions,
        status.sessions.len(),
        t.relay_sessions,
        t.relay_bytes,
        bytes(t.relay_bytes),
    );
    if !status.relaying {
        out.push_str("<p class=\"hit\">Relaying is off (relay_session_bytes = 0).</p>\n");
    }

    let _ = writeln!(out, "<h2>Agents ({})</h2>", status.agents.len());
    table(
        &mut out,
        &["fingerprint", "observed address", "control", "names"],
        &status.agents,
        "No agent is registered.",
        |a| {
            let names = if a.names.is_empty() {
                "<span class=\"muted\">none (forwards only)</span>".to_string()
            } else {
                escape(&a.names.join(", "))
            };
            format!(
                "<td><code>{}</code></td><td><code>{}</code></td><td>{}</td><td>{names}</td>",
                escape(&a.fingerprint),
                escape(&a.observed),
                escape(a.control)
            )
        },
    );

    let _ = writeln!(out, "<h2>Names ({})</h2>", status.names.len());
    table(
        &mut out,
        &["name", "owner", "live", "last used"],
        &status.names,
        "No name is claimed.",
        |n| {
            let live = if n.live {
                "<span class=\"live\">live</span>"
            } else {
                "<span class=\"muted\">offline</span>"
            };
            format!(
                "<td>{}</td><td><code>{}</code></td><td>{live}</td><td>{} ago</td>",
                escape(&n.name),
                escape(&n.owner),
                ago(status.taken_unix.saturating_sub(n.last_used_unix))
            )
        },
    );

    let names_of: HashMap<&str, &[String]> = status
        .agents
        .iter()
        .map(|a| (a.fingerprint.as_str(), a.names.as_slice()))
        .collect();
    let _ = writeln!(out, "<h2>Relay sessions ({})</h2>", status.sessions.len());
    out.push_str(
        "<p class=\"note\">S opens a relay session for every introduction, so that the first \
         packets never wait for a punch. <b>S cannot see direct paths</b>: once two agents \
         find one, their traffic no longer passes S and their session's byte count stops \
         growing, just as it does for an idle pair. S cannot tell the two apart.</p>\n",
    );
    table(
        &mut out,
        &["session", "forwarder", "exposer", "bytes relayed", "idle"],
        &status.sessions,
        "No relay session is held.",
        |s| {
            let exposes = names_of
                .get(s.exposer.as_str())
                .filter(|n| !n.is_empty())
                .map(|n| {
                    format!(
                        "<br><span class=\"muted\">exposes {}</span>",
                        escape(&n.join(", "))
                    )
                })
                .unwrap_or_default();
            format!(
                "<td><code>{}</code></td><td><code>{}</code></td><td><code>{}</code>{exposes}</td>\
                 <td class=\"n\" data-bytes=\"{}\">{}</td><td class=\"n\">{}</td>",
                escape(&s.id),
                escape(&s.forwarder),
                escape(&s.exposer),
                s.bytes_relayed,
                bytes(s.bytes_relayed),
                ago(s.idle_secs)
            )
        },
    );
    let closed: Vec<String> = status
        .sessions_closed
        .iter()
        .map(|c| format!("{}: {}", escape(c.label), c.count))
        .collect();
    let _ = writeln!(
        out,
        "<p class=\"muted\">Closed since start: {}.</p>",
        closed.join(", ")
    );

    out.push_str("<h2>Limits hit</h2>\n<p class=\"note\">Connections and registrations refused since S started, by the limit (configuration key) that refused them.</p>\n");
    table(&mut out, &["limit", "refused"], &status.refusals, "", |c| {
        let class = if c.count > 0 { "n hit" } else { "n" };
        format!(
            "<td><code>{}</code></td><td class=\"{class}\">{}</td>",
            escape(c.label),
            c.count
        )
    });
    out.push_str("</body></html>\n");
    out
}

/// The snapshot as JSON, for scripts.
pub fn render_json(status: &Status) -> String {
    // Serializing plain strings and numbers cannot fail; the fallback keeps this total.
    serde_json::to_string_pretty(status).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Status {
        Status {
            taken_unix: 10_000,
            relaying: true,
            agents: vec![
                AgentRow {
                    fingerprint: "SHA256:exposer".into(),
                    observed: "198.51.100.7:40112".into(),
                    control: "UDP",
                    names: vec!["home".into()],
                },
                AgentRow {
                    fingerprint: "SHA256:forwarder".into(),
                    observed: "203.0.113.9:5000".into(),
                    control: "TCP",
                    names: vec![],
                },
            ],
            names: vec![
                NameRow {
                    name: "home".into(),
                    owner: "SHA256:exposer".into(),
                    live: true,
                    last_used_unix: 9_000,
                },
                NameRow {
                    name: "old".into(),
                    owner: "SHA256:gone".into(),
                    live: false,
                    last_used_unix: 1_000,
                },
            ],
            sessions: vec![SessionRow {
                id: "00000000000000ff".into(),
                forwarder: "SHA256:forwarder".into(),
                exposer: "SHA256:exposer".into(),
                bytes_relayed: 3 * 1024 * 1024,
                idle_secs: 4,
            }],
            totals: Totals {
                connections: 2,
                registrations: 2,
                introductions: 1,
                relay_sessions: 1,
                relay_bytes: 3 * 1024 * 1024,
            },
            refusals: vec![
                Count {
                    label: "max_connections",
                    count: 0,
                },
                Count {
                    label: "max_unregistered_per_ip",
                    count: 7,
                },
            ],
            sessions_closed: vec![Count {
                label: "idle",
                count: 2,
            }],
        }
    }

    #[test]
    fn the_page_shows_agents_names_sessions_and_limits() {
        let html = render_html(&sample());
        assert!(html.starts_with("<!DOCTYPE html>"));
        assert!(html.contains("<meta http-equiv=\"refresh\" content=\"5\">"));
        for needle in [
            "<code>SHA256:exposer</code>",
            "<code>198.51.100.7:40112</code>",
            "<td>TCP</td>",
            "none (forwards only)",
            "<td>home</td>",
            "<span class=\"live\">live</span>",
            "<span class=\"muted\">offline</span>",
            "16 min ago",
            "2 h ago",
            "<code>00000000000000ff</code>",
            "data-bytes=\"3145728\">3.0 MiB",
            "exposes home",
            "S cannot see direct paths",
            "idle: 2",
            "<td class=\"n hit\">7</td>",
            "<code>max_connections</code></td><td class=\"n\">0</td>",
        ] {
            assert!(html.contains(needle), "{needle:?} missing from\n{html}");
        }
        // Nothing is fetched from elsewhere.
        assert!(!html.contains("http://") && !html.contains("https://") && !html.contains("src="));
    }

    #[test]
    fn a_hostile_string_is_escaped() {
        let evil = "<script>alert('x')</script>\"&<img src=x onerror=alert(1)>";
        assert_eq!(
            escape(evil),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&quot;&amp;&lt;img src=x \
             onerror=alert(1)&gt;"
        );
        let mut status = sample();
        status.agents[0].fingerprint = evil.into();
        status.agents[0].observed = evil.into();
        status.agents[0].names = vec![evil.into()];
        status.names[0].name = evil.into();
        status.names[0].owner = evil.into();
        status.sessions[0].forwarder = evil.into();
        status.sessions[0].exposer = evil.into();
        status.sessions[0].id = evil.into();
        let html = render_html(&status);
        assert!(!html.contains("<script"), "{html}");
        assert!(!html.contains("<img"), "{html}");
        assert!(html.contains("&lt;script&gt;alert(&#39;x&#39;)"));
    }

    #[test]
    fn empty_tables_say_so_and_long_ones_are_cut() {
        let html = render_html(&Status::default());
        assert!(html.contains("No agent is registered."));
        assert!(html.contains("No relay session is held."));
        assert!(html.contains("Relaying is off"));
        let mut status = sample();
        status.names = (0..MAX_ROWS + 3)
            .map(|i| NameRow {
                name: format!("n{i}"),
                owner: "SHA256:o".into(),
                live: false,
                last_used_unix: 0,
            })
            .collect();
        let html = render_html(&status);
        assert!(html.contains("3 more not shown"), "{html}");
        assert!(!html.contains(&format!("<td>n{}</td>", MAX_ROWS)));
    }

    #[test]
    fn the_json_carries_the_snapshot() {
        let json: serde_json::Value = serde_json::from_str(&render_json(&sample())).unwrap();
        assert_eq!(json["agents"][0]["fingerprint"], "SHA256:exposer");
        assert_eq!(json["sessions"][0]["bytes_relayed"], 3 * 1024 * 1024);
        assert_eq!(json["names"][1]["live"], false);
        assert_eq!(json["refusals"][1]["label"], "max_unregistered_per_ip");
        assert_eq!(json["totals"]["relay_bytes"], 3 * 1024 * 1024);
    }

    #[test]
    fn sizes_and_ages_read_well() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(5 << 30), "5.0 GiB");
        assert_eq!(ago(59), "59 s");
        assert_eq!(ago(600), "10 min");
        assert_eq!(ago(3 * 86400), "3 d");
    }
}
