//! The nftables rule sets of the lab's NAT routers, and the block rules.
//!
//! A router gets `table ip lab` (its preset) and `table ip labblock` (rules added by
//! `Lab::block`). The tables and their sets are created once; later changes (a new UDP
//! timeout, blocks) flush and refill chains, so the full-cone map and the restricted set keep
//! their entries.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use super::{Block, Nat};

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
}

/// The tables, sets and base chains, without rules.
pub fn skeleton(r: &RouterRules) -> String {
    let t = r.state_timeout;
    format!(
        "table ip lab {{
  map fc {{ type inet_service : ipv4_addr . inet_service; flags dynamic,timeout; timeout {t}s; }}
  set rs {{ type ipv4_addr . inet_service . ipv4_addr; flags dynamic,timeout; timeout {t}s; }}
  chain prerouting {{ type nat hook prerouting priority dstnat; policy accept; }}
  chain postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}
  chain track {{ type filter hook postrouting priority srcnat + 10; policy accept; }}
  chain forward {{ type filter hook forward priority filter; policy accept; }}
  chain input {{ type filter hook input priority filter; policy accept; }}
}}
{}",
        block_skeleton()
    )
}

/// `table ip labblock` with empty chains (also used on public hosts).
pub fn block_skeleton() -> String {
    "table ip labblock {
  chain forward { type filter hook forward priority filter - 10; policy accept; }
  chain input { type filter hook input priority filter - 10; policy accept; }
  chain output { type filter hook output priority filter - 10; policy accept; }
}
"
    .to_owned()
}

/// The rules of the preset, as "flush chain" + "add rule" commands.
pub fn rules(r: &RouterRules) -> String {
    let (wan, lan, lan_net, wan_ip, t) = (WAN, LAN, &r.lan_net, r.wan_ip, r.state_timeout);
    let mut pre = Vec::<String>::new();
    let mut post = Vec::<String>::new();
    let mut track = Vec::<String>::new();
    let mut fwd = Vec::<String>::new();
    let mut input = Vec::<String>::new();

    // The router itself takes no unsolicited traffic from its WAN side.
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
    out
}

/// The block rules: `on_router` blocks forwarded traffic; otherwise (a public host) the
/// host's own input and output, except loopback.
pub fn block_rules(blocks: &[Block], on_router: bool) -> String {
    let mut out = String::new();
    for chain in ["forward", "input", "output"] {
        let _ = writeln!(out, "flush chain ip labblock {chain}");
    }
    let matches: Vec<&str> = blocks
        .iter()
        .map(|b| match b {
            Block::Udp => "meta l4proto udp",
            Block::Tcp => "meta l4proto tcp",
            Block::All => "",
        })
        .collect();
    for m in matches {
        if on_router {
            let _ = writeln!(out, "add rule ip labblock forward {m} drop");
        } else {
            let _ = writeln!(
                out,
                r#"add rule ip labblock input iifname != "lo" {m} drop"#
            );
            let _ = writeln!(
                out,
                r#"add rule ip labblock output oifname != "lo" {m} drop"#
            );
        }
    }
    out
}
