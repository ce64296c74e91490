//! The nftables rule sets of the lab's NAT routers, and the block rules.
//!
//! A router gets `table ip lab` (its preset) and `table ip labblock` (rules added by
//! `Lab::block`); one with IPv6 on also gets `table ip6 lab6` (its IPv6 policy, no NAT66)
//! and `table ip6 labblock6`. The tables and their sets are created once; later changes (a
//! new UDP timeout, blocks) flush and refill chains, so the full-cone map and the restricted
//! set keep their entries, and the sequential NAT's counter (chain `seqnat`, never flushed)
//! keeps counting.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};

use super::{Block, Ipv6, Nat};

/// The WAN interface of every router (and of public hosts).
pub const WAN: &str = "wan";
/// The LAN bridge of every router.
pub const LAN: &str = "lan";

/// What the rules of one router depend on.
#[derive(Debug, Clone)]
pub struct RouterRules {
    /// The behaviour (never `Public` or `Double`: a double NAT is two `Easy` routers).
    pub nat: Nat,
    pub wan_ip: Ipv4Addr,
    /// The LAN prefix, e.g. "10.3.0.0/24"; only these sources are translated.
    pub lan_net: String,
    /// S's addresses (for `TcpToSOnly`).
    pub s_addrs: [Ipv4Addr; 2],
    /// Lifetime of full-cone/restricted state without outbound traffic, in seconds.
    pub state_timeout: u32,
    /// Whether LAN hosts can reach each other through the router's public address.
    pub hairpin: bool,
    /// Whether a port-mapping daemon (miniupnpd, see `upnpd`) runs on the router: its port
    /// forwards (DNAT) are let in from the WAN, and so are S's STUN answers to the router
    /// itself (the daemon's RFC 5780 test asks S to answer from its other address).
    pub port_forwarding: bool,
    /// No input firewall: unsolicited packets from the WAN side reach the router itself
    /// (IPv4 and IPv6).
    pub open_wan: bool,
    /// Sequential port allocation for TCP and UDP: (first port, step, how many ports before
    /// the counter wraps). See `RouterSpec::sequential_step`.
    pub sequential: Option<(u16, u16, u32)>,
    /// The IPv6 forwarding policy (`Off`: no ip6 tables at all).
    pub ipv6: Ipv6,
    /// S's IPv6 addresses (for `TcpToSOnly` with IPv6 on).
    pub s_addrs6: [Ipv6Addr; 2],
}

/// How many ports the sequential NAT hands out, from `first` with `step`, before it wraps
/// (at most 4096, so the rule stays small).
pub fn sequential_span(first: u16, step: u16) -> u32 {
    let step = u32::from(step.max(1));
    ((65535 - u32::from(first)) / step + 1).min(4096)
}

/// The tables, sets and base chains, without rules (but with the sequential NAT's rule,
/// which is never reloaded: reloading would restart its counter).
pub fn skeleton(r: &RouterRules) -> String {
    let t = r.state_timeout;
    let mut out = format!(
        "table ip lab {{
  map fc {{ type inet_service : ipv4_addr . inet_service; flags dynamic,timeout; timeout {t}s; }}
  set rs {{ type ipv4_addr . inet_service . ipv4_addr; flags dynamic,timeout; timeout {t}s; }}
  chain prerouting {{ type nat hook prerouting priority dstnat; policy accept; }}
  chain postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}
  chain track {{ type filter hook postrouting priority srcnat + 10; policy accept; }}
  chain forward {{ type filter hook forward priority filter; policy accept; }}
  chain input {{ type filter hook input priority filter; policy accept; }}
}}
"
    );
    if let Some((first, step, span)) = r.sequential {
        // A NAT chain sees only the first packet of each connection, so the counter moves
        // once per new mapping. The ports come from a map: `numgen ... offset` yields a
        // host-order number that snat reads as network order (nft 1.0.6), i.e. byte-swapped.
        let ports: Vec<String> = (0..span)
            .map(|i| format!("{i} : {}", u32::from(first) + i * u32::from(step)))
            .collect();
        let _ = write!(
            out,
            "table ip lab {{
  chain seqnat {{ type nat hook postrouting priority srcnat - 5; policy accept;
    oifname \"{WAN}\" ip saddr {} meta l4proto {{ tcp, udp }} snat ip to {} : numgen inc mod {span} map {{ {} }}
  }}
}}
",
            r.lan_net,
            r.wan_ip,
            ports.join(", ")
        );
    }
    if r.ipv6 != Ipv6::Off {
        out += "table ip6 lab6 {
  chain forward { type filter hook forward priority filter; policy accept; }
  chain input { type filter hook input priority filter; policy accept; }
}
";
    }
    out + &block_skeleton(r.ipv6 != Ipv6::Off)
}

/// `table ip labblock` with empty chains (also used on public hosts), and with `v6`
/// `table ip6 labblock6` likewise.
pub fn block_skeleton(v6: bool) -> String {
    let mut out = String::new();
    for (family, table) in block_tables(v6) {
        let _ = write!(
            out,
            "table {family} {table} {{
  chain forward {{ type filter hook forward priority filter - 10; policy accept; }}
  chain input {{ type filter hook input priority filter - 10; policy accept; }}
  chain output {{ type filter hook output priority filter - 10; policy accept; }}
}}
"
        );
    }
    out
}

fn block_tables(v6: bool) -> &'static [(&'static str, &'static str)] {
    if v6 {
        &[("ip", "labblock"), ("ip6", "labblock6")]
    } else {
        &[("ip", "labblock")]
    }
}

/// ICMPv6 neighbour discovery, which every IPv6 drop rule lets through (without it nothing
/// on the link is reachable, see lab-facts).
const ND: &str =
    "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit, nd-router-advert }";

/// The rules of the preset, as "flush chain" + "add rule" commands.
pub fn rules(r: &RouterRules) -> String {
    let (wan, lan, lan_net, wan_ip, t) = (WAN, LAN, &r.lan_net, r.wan_ip, r.state_timeout);
    let mut pre = Vec::<String>::new();
    let mut post = Vec::<String>::new();
    let mut track = Vec::<String>::new();
    let mut fwd = Vec::<String>::new();
    let mut input = Vec::<String>::new();

    // The router itself takes no unsolicited traffic from its WAN side (unless `open_wan`).
    if !r.open_wan {
        input.push(format!(
            r#"iifname "{wan}" ct state established,related accept"#
        ));
        if r.port_forwarding {
            input.push(format!(
                r#"iifname "{wan}" ip saddr {{ {}, {} }} meta l4proto udp accept"#,
                r.s_addrs[0], r.s_addrs[1]
            ));
        }
        input.push(format!(r#"iifname "{wan}" drop"#));
    }

    // Source NAT for the LAN prefix only (the router's own packets keep their address).
    let random = if r.nat == Nat::Hard { " random" } else { "" };
    post.push(format!(
        r#"oifname "{wan}" ip saddr {lan_net} masquerade{random}"#
    ));

    // The external port -> internal address:port map, refreshed by outbound UDP: for
    // connections opened from inside (reply tuple holds the external port) and for replies on
    // connections opened from outside (original tuple holds it).
    track.push(format!(
        r#"oifname "{wan}" meta l4proto udp ct direction original ct original ip saddr {lan_net} update @fc {{ ct reply proto-dst timeout {t}s : ct original ip saddr . ct original proto-src }}"#
    ));
    track.push(format!(
        r#"oifname "{wan}" meta l4proto udp ct direction reply ct reply ip saddr {lan_net} update @fc {{ ct original proto-dst timeout {t}s : ct reply ip saddr . ct reply proto-src }}"#
    ));

    let inbound_map = matches!(r.nat, Nat::FullCone | Nat::Restricted);
    if inbound_map {
        pre.push(format!(
            r#"iifname "{wan}" ip daddr {wan_ip} meta l4proto udp dnat ip addr . port to udp dport map @fc"#
        ));
    }
    if r.hairpin {
        pre.push(format!(
            r#"iifname "{lan}" ip daddr {wan_ip} meta l4proto udp dnat ip addr . port to udp dport map @fc"#
        ));
        post.push(format!(
            r#"oifname "{lan}" ip saddr {lan_net} ct status dnat snat ip to {wan_ip}"#
        ));
    }

    match r.nat {
        Nat::UdpBlocked => fwd.push("meta l4proto udp drop".to_owned()),
        Nat::TcpToSOnly => {
            fwd.push("ct state established,related accept".to_owned());
            fwd.push(format!(
                r#"iifname "{lan}" ip daddr {{ {}, {} }} meta l4proto tcp ct state new accept"#,
                r.s_addrs[0], r.s_addrs[1]
            ));
            fwd.push("drop".to_owned());
        }
        Nat::Restricted => fwd.push(format!(
            r#"iifname "{lan}" ip saddr {lan_net} update @rs {{ ip saddr . udp sport . ip daddr timeout {t}s }}"#
        )),
        _ => {}
    }
    fwd.push(format!(
        r#"iifname "{wan}" ct state established,related accept"#
    ));
    if r.port_forwarding && r.nat != Nat::FullCone {
        // What miniupnpd forwards; its own filter chain would accept the same packets, but an
        // accept there does not override this table's drop.
        fwd.push(format!(r#"iifname "{wan}" ct status dnat accept"#));
    }
    match r.nat {
        Nat::FullCone => fwd.push(format!(r#"iifname "{wan}" ct status dnat accept"#)),
        Nat::Restricted => fwd.push(format!(
            r#"iifname "{wan}" ct status dnat ip daddr . udp dport . ip saddr @rs accept"#
        )),
        _ => {}
    }
    fwd.push(format!(r#"iifname "{wan}" drop"#));

    let mut out = String::new();
    for (chain, list) in [
        ("prerouting", pre),
        ("postrouting", post),
        ("track", track),
        ("forward", fwd),
        ("input", input),
    ] {
        let _ = writeln!(out, "flush chain ip lab {chain}");
        for rule in list {
            let _ = writeln!(out, "add rule ip lab {chain} {rule}");
        }
    }
    if r.ipv6 != Ipv6::Off {
        out += &rules6(r);
    }
    out
}

/// The IPv6 rules (`table ip6 lab6`): no NAT66; the router's own input as for IPv4 but with
/// neighbour discovery let in; forwarding as the policy says, after the preset's own
/// restrictions (udp-blocked, tcp-to-S-only) which apply to IPv6 as well.
fn rules6(r: &RouterRules) -> String {
    let (wan, lan) = (WAN, LAN);
    let mut fwd = Vec::<String>::new();
    let mut input = Vec::<String>::new();
    input.push(format!(r#"iifname "{wan}" {ND} accept"#));
    if !r.open_wan {
        input.push(format!(
            r#"iifname "{wan}" ct state established,related accept"#
        ));
        input.push(format!(r#"iifname "{wan}" drop"#));
    }
    match r.nat {
        Nat::UdpBlocked => fwd.push("meta l4proto udp drop".to_owned()),
        Nat::TcpToSOnly => {
            fwd.push("ct state established,related accept".to_owned());
            fwd.push(format!(
                r#"iifname "{lan}" ip6 daddr {{ {}, {} }} meta l4proto tcp ct state new accept"#,
                r.s_addrs6[0], r.s_addrs6[1]
            ));
            fwd.push("drop".to_owned());
        }
        _ => {}
    }
    match r.ipv6 {
        Ipv6::Off | Ipv6::Open => {}
        Ipv6::Firewall => {
            fwd.push(format!(
                r#"iifname "{wan}" ct state established,related accept"#
            ));
            fwd.push(format!(r#"iifname "{wan}" drop"#));
        }
        Ipv6::Drop => fwd.push("drop".to_owned()),
    }
    let mut out = String::new();
    for (chain, list) in [("forward", fwd), ("input", input)] {
        let _ = writeln!(out, "flush chain ip6 lab6 {chain}");
        for rule in list {
            let _ = writeln!(out, "add rule ip6 lab6 {chain} {rule}");
        }
    }
    out
}

/// The block rules: `on_router` blocks forwarded traffic; otherwise (a public host) the
/// host's own input and output, except loopback (and, for IPv6, neighbour discovery). `v6`:
/// the namespace has IPv6 on, and the same blocks go into `table ip6 labblock6`.
pub fn block_rules(blocks: &[Block], on_router: bool, v6: bool) -> String {
    let mut out = String::new();
    for &(family, table) in block_tables(v6) {
        for chain in ["forward", "input", "output"] {
            let _ = writeln!(out, "flush chain {family} {table} {chain}");
        }
        let matches: Vec<&str> = blocks
            .iter()
            .map(|b| match b {
                Block::Udp => "meta l4proto udp",
                Block::Tcp => "meta l4proto tcp",
                Block::All => "",
            })
            .collect();
        if !on_router && family == "ip6" && !matches.is_empty() {
            for chain in ["input", "output"] {
                let _ = writeln!(out, "add rule {family} {table} {chain} {ND} accept");
            }
        }
        for m in matches {
            if on_router {
                let _ = writeln!(out, "add rule {family} {table} forward {m} drop");
            } else {
                let _ = writeln!(
                    out,
                    r#"add rule {family} {table} input iifname != "lo" {m} drop"#
                );
                let _ = writeln!(
                    out,
                    r#"add rule {family} {table} output oifname != "lo" {m} drop"#
                );
            }
        }
    }
    out
}
