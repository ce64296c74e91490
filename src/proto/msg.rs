//! Control messages between an agent and S.
//!
//! An agent opens one bidirectional stream on its control connection and sends
//! [`ClientMsg::Register`]; S answers [`ServerMsg::Registered`] (or [`ServerMsg::Error`]) and
//! keeps that stream open to push [`ServerMsg::Incoming`] to the agent when someone forwards
//! to one of its names. Every other request ([`ClientMsg::Connect`]) goes on a stream of its
//! own and gets exactly one answer, and so do [`ClientMsg::UpdateCandidates`] and
//! [`ClientMsg::UpdateNames`].
//!
//! [`ClientMsg::Release`] needs no registration: `p2ptun release` sends it on a connection
//! of its own (registering would replace a running agent of the same key) and hangs up after
//! the one answer. An S older than it answers [`ErrorCode::BadRequest`] ("unknown variant"),
//! as it does any message it cannot read, which the agent turns into "upgrade S"; that is
//! why adding it did not change [`super::PROTOCOL_VERSION`].

use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::Fingerprint;

/// A message from an agent to S.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientMsg {
    /// Join S: prove the token and claim names for this agent's identity key (the key is the
    /// one presented in the TLS handshake, so a name can only be claimed by its holder).
    Register {
        /// [`super::PROTOCOL_VERSION`] of the agent.
        version: u32,
        /// The shared secret S may require.
        token: Option<String>,
        /// Names to expose under; empty for an agent that only forwards.
        names: Vec<String>,
        /// Addresses the agent can be reached at, as it knows them (host candidates).
        candidates: Vec<Candidate>,
        /// How the agent's NAT picks public ports, as its STUN probes found.
        #[serde(default)]
        nat: NatMapping,
    },
    /// Ask to be introduced to the agent that exposes `name`.
    Connect {
        /// The name to reach.
        name: String,
        /// The asking agent's candidates.
        candidates: Vec<Candidate>,
        /// How the asking agent's NAT picks public ports.
        #[serde(default)]
        nat: NatMapping,
    },
    /// Replaces the candidates of this connection's registration, for introductions from
    /// now on: a port mapping the gateway granted after registering (S answers
    /// [`ServerMsg::CandidatesUpdated`]).
    UpdateCandidates {
        /// All of the agent's candidates, as in [`ClientMsg::Register`].
        candidates: Vec<Candidate>,
    },
    /// Replaces the names of this connection's registration (a reloaded `p2ptun up`): new
    /// names are claimed as at registration, names left out stop being exposed (they stay
    /// this key's). S answers [`ServerMsg::NamesUpdated`], or refuses and keeps the old
    /// names (a name another key holds).
    UpdateNames {
        /// Every name the agent exposes now, as in [`ClientMsg::Register`].
        names: Vec<String>,
    },
    /// Give a name back so that another key can claim it. Only the key that holds the name
    /// (the one presented in this connection's TLS handshake) may, and not while one of its
    /// registrations exposes the name. S answers [`ServerMsg::Released`].
    Release {
        /// [`super::PROTOCOL_VERSION`] of the agent.
        version: u32,
        /// The shared secret S may require, as in [`ClientMsg::Register`].
        token: Option<String>,
        /// The name to give back.
        name: String,
    },
}

/// A message from S to an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ServerMsg {
    /// Registration accepted.
    Registered {
        /// The address S sees this agent's control connection come from: its server-reflexive
        /// candidate.
        observed: SocketAddr,
        /// Where S answers STUN besides its main port, for mapping-behaviour tests.
        stun_alt: Option<SocketAddr>,
        /// In a cluster, every S that is up (this one too), vouched for by this S: the
        /// agent may make any of them its home when this one goes away.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        members: Vec<ServerInfo>,
    },
    /// Answer to [`ClientMsg::Connect`]: the exposer and how to reach it.
    Rendezvous(Rendezvous),
    /// Answer to [`ClientMsg::Connect`] in a cluster: the exposer of `name` is registered with
    /// another S, which introduces, punches and relays for it; ask that one.
    Elsewhere {
        /// The name asked for.
        name: String,
        /// The exposer's home S, vouched for by this S.
        server: ServerInfo,
    },
    /// Pushed to an exposer: a forwarder wants one of its names.
    Incoming(Rendezvous),
    /// Pushed to both agents of a session: S stops relaying it (over budget, or the other
    /// agent left). Their direct paths, if any, are unaffected.
    RelayClosed {
        /// The session.
        session: u64,
        /// Why, for the agents' logs.
        reason: String,
    },
    /// Answer to [`ClientMsg::UpdateCandidates`].
    CandidatesUpdated,
    /// Answer to [`ClientMsg::UpdateNames`].
    NamesUpdated,
    /// Answer to [`ClientMsg::Release`]: the name is free for anyone to claim.
    Released {
        /// The name given back.
        name: String,
    },
    /// The request failed.
    Error(ErrorMsg),
}

/// One S of a cluster, as another S vouches for it: where agents reach it and the key it
/// presents there.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerInfo {
    /// Its public address, `HOST:PORT`.
    pub addr: String,
    /// Its key's fingerprint.
    pub fingerprint: Fingerprint,
}

/// An introduction of one agent to another, sent to both sides of a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rendezvous {
    /// Identifies the session at S.
    pub session: u64,
    /// The name the forwarder asked for.
    pub name: String,
    /// The other agent's identity, as S verified it in that agent's handshake.
    pub peer_fingerprint: Fingerprint,
    /// The other agent's candidates, including the address S observed it at.
    pub peer_candidates: Vec<Candidate>,
    /// Short-term credentials for connectivity checks in this session.
    pub credentials: Credentials,
    /// Milliseconds to wait before checking, so that both sides start together.
    pub start_in_ms: u64,
    /// Whether S relays this session's packets (see [`relay`](super::relay)).
    pub relay: bool,
    /// How the other agent's NAT picks public ports: tells the two sides whether and how to
    /// go through a NAT that maps per destination.
    #[serde(default)]
    pub peer_nat: NatMapping,
}

/// How an agent's NAT chooses the public port of a new mapping (RFC 4787 §4.1), as far as
/// STUN to S's two addresses can tell. Agents report it and S passes it to the peer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "mapping", rename_all = "snake_case", deny_unknown_fields)]
pub enum NatMapping {
    /// Not measured (UDP to S failed, or the agent did not say).
    #[default]
    Unknown,
    /// One public port for every destination, or no NAT at all: the peer can reach the
    /// mapping S saw.
    Independent,
    /// A new public port per destination, each `step` above the last: the next ones can be
    /// predicted.
    Sequential {
        /// The difference between successive ports (negative when they count down).
        step: i32,
    },
    /// A new public port per destination, at random.
    Random,
}

impl NatMapping {
    /// Whether each destination gets its own public port ("symmetric" NAT).
    pub fn per_destination(self) -> bool {
        matches!(self, NatMapping::Sequential { .. } | NatMapping::Random)
    }
}

/// ICE-style short-term credentials (RFC 8445 §7.2.2): a check from A to B carries USERNAME
/// `B.ufrag:A.ufrag` and MESSAGE-INTEGRITY keyed by B's password.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    /// This side's username fragment.
    pub local_ufrag: String,
    /// This side's password: checks sent to us are keyed with it.
    pub local_pwd: String,
    /// The other side's username fragment.
    pub remote_ufrag: String,
    /// The other side's password: our checks to it are keyed with it.
    pub remote_pwd: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Passwords stay out of logs.
        f.debug_struct("Credentials")
            .field("local_ufrag", &self.local_ufrag)
            .field("remote_ufrag", &self.remote_ufrag)
            .finish_non_exhaustive()
    }
}

/// One address an agent may be reached at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Candidate {
    /// Where the address comes from.
    pub kind: CandidateKind,
    /// The address itself.
    pub addr: SocketAddr,
}

/// The origin of a candidate, in ICE's terms (RFC 8445 §5.1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CandidateKind {
    /// An address of one of the agent's own interfaces.
    Host,
    /// The agent's address as S (or a STUN server) sees it: its NAT mapping.
    ServerReflexive,
    /// A mapping granted by the gateway (UPnP IGD, NAT-PMP, PCP).
    PortMapped,
    /// An address learnt from a check that arrived from it.
    PeerReflexive,
    /// A TCP address of one of the agent's own interfaces (for the TCP hole punch).
    TcpHost,
    /// The agent's TCP address as S sees it (learnt with STUN over TCP).
    TcpServerReflexive,
    /// A mapping of the TCP punching port granted by the gateway.
    TcpPortMapped,
}

impl CandidateKind {
    /// Whether the candidate is a TCP address.
    pub fn is_tcp(self) -> bool {
        matches!(
            self,
            CandidateKind::TcpHost
                | CandidateKind::TcpServerReflexive
                | CandidateKind::TcpPortMapped
        )
    }
}

/// An error S reports, with a code callers match on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorMsg {
    /// What went wrong.
    pub code: ErrorCode,
    /// Human-readable detail.
    pub message: String,
}

/// What kind of error S reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The agent speaks another protocol version.
    BadVersion,
    /// The token is missing or wrong.
    BadToken,
    /// A claimed name, or one asked to be released, is held by another identity.
    NameTaken,
    /// A name is not a valid name.
    InvalidName,
    /// Nobody exposes the requested name right now (for a release: nobody holds it).
    UnknownName,
    /// The request is malformed or out of order (for a release: the name is exposed right
    /// now by an agent of the releasing key).
    BadRequest,
    /// Too many requests or connections from this source.
    RateLimited,
    /// S failed on its side.
    Internal,
}

impl fmt::Display for ErrorMsg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ErrorMsg {}

/// The longest service name.
pub const MAX_NAME_LEN: usize = 63;

/// The most candidates one message may list; S refuses a message with more.
pub const MAX_CANDIDATES: usize = 32;

/// The most names one agent may expose; S refuses a registration with more.
pub const MAX_NAMES_PER_AGENT: usize = 64;

/// Checks that `name` is a service name: 1 to 63 characters of `a-z`, `0-9` and `-`, not
/// starting or ending with `-` (a DNS label, so names can one day become hostnames).
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!(
            "name '{name}' must be 1 to {MAX_NAME_LEN} characters long"
        ));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(format!(
            "name '{name}' may only contain lowercase letters, digits and '-'"
        ));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(format!("name '{name}' must not start or end with '-'"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_have_a_stable_readable_form() {
        let msg = ClientMsg::Connect {
            name: "home".into(),
            candidates: vec![Candidate {
                kind: CandidateKind::Host,
                addr: "10.0.0.2:4000".parse().unwrap(),
            }],
            nat: NatMapping::Sequential { step: 2 },
        };
        let json = serde_json::to_string(&msg).unwrap();
        assert_eq!(
            json,
            r#"{"type":"connect","name":"home","candidates":[{"kind":"host","addr":"10.0.0.2:4000"}],"nat":{"mapping":"sequential","step":2}}"#
        );
        assert_eq!(serde_json::from_str::<ClientMsg>(&json).unwrap(), msg);
    }

    #[test]
    fn release_and_its_answer_have_a_stable_readable_form() {
        let msg = ClientMsg::Release {
            version: 3,
            token: None,
            name: "home".into(),
        };
        let json = serde_json::to_string(&msg).unwrap();
        assert_eq!(
            json,
            r#"{"type":"release","version":3,"token":null,"name":"home"}"#
        );
        assert_eq!(serde_json::from_str::<ClientMsg>(&json).unwrap(), msg);
        let answer = ServerMsg::Released {
            name: "home".into(),
        };
        assert_eq!(
            serde_json::to_string(&answer).unwrap(),
            r#"{"type":"released","name":"home"}"#
        );
    }

    #[test]
    fn nat_mapping_is_optional_and_checked() {
        let old = r#"{"type":"connect","name":"home","candidates":[]}"#;
        match serde_json::from_str::<ClientMsg>(old).unwrap() {
            ClientMsg::Connect { nat, .. } => assert_eq!(nat, NatMapping::Unknown),
            other => panic!("{other:?}"),
        }
        for bad in [
            r#"{"mapping":"sequential"}"#,
            r#"{"mapping":"sequential","step":"x"}"#,
            r#"{"mapping":"cone"}"#,
        ] {
            assert!(serde_json::from_str::<NatMapping>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn unknown_fields_and_types_are_rejected() {
        assert!(serde_json::from_str::<ClientMsg>(
            r#"{"type":"connect","name":"a","candidates":[],"x":1}"#
        )
        .is_err());
        assert!(serde_json::from_str::<ClientMsg>(r#"{"type":"nope"}"#).is_err());
        assert!(serde_json::from_str::<ClientMsg>(
            r#"{"type":"connect","name":7,"candidates":[]}"#
        )
        .is_err());
    }

    #[test]
    fn names_follow_dns_label_rules() {
        for good in ["home", "a", "web-1", &"x".repeat(63)] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in ["", "Home", "a_b", "-a", "a-", "a.b", "ü", &"x".repeat(64)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn credentials_debug_hides_passwords() {
        let c = Credentials {
            local_ufrag: "lu".into(),
            local_pwd: "secret1".into(),
            remote_ufrag: "ru".into(),
            remote_pwd: "secret2".into(),
        };
        let s = format!("{c:?}");
        assert!(!s.contains("secret"));
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn addr() -> impl Strategy<Value = SocketAddr> {
            prop_oneof![
                (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::from((ip, p))),
                (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::from((ip, p))),
            ]
        }

        fn candidate() -> impl Strategy<Value = Candidate> {
            let kind = prop_oneof![
                Just(CandidateKind::Host),
                Just(CandidateKind::ServerReflexive),
                Just(CandidateKind::PortMapped),
                Just(CandidateKind::PeerReflexive),
                Just(CandidateKind::TcpHost),
                Just(CandidateKind::TcpServerReflexive),
                Just(CandidateKind::TcpPortMapped),
            ];
            (kind, addr()).prop_map(|(kind, addr)| Candidate { kind, addr })
        }

        fn nat() -> impl Strategy<Value = NatMapping> {
            prop_oneof![
                Just(NatMapping::Unknown),
                Just(NatMapping::Independent),
                any::<i32>().prop_map(|step| NatMapping::Sequential { step }),
                Just(NatMapping::Random),
            ]
        }

        fn rendezvous() -> impl Strategy<Value = Rendezvous> {
            (
                any::<u64>(),
                ".{0,20}",
                any::<[u8; 32]>(),
                prop::collection::vec(candidate(), 0..4),
                prop::array::uniform4(".{0,12}"),
                any::<u64>(),
                any::<bool>(),
                nat(),
            )
                .prop_map(
                    |(session, name, fp, peer_candidates, c, start_in_ms, relay, peer_nat)| {
                        let [local_ufrag, local_pwd, remote_ufrag, remote_pwd] = c;
                        Rendezvous {
                            session,
                            name,
                            peer_fingerprint: Fingerprint(fp),
                            peer_candidates,
                            credentials: Credentials {
                                local_ufrag,
                                local_pwd,
                                remote_ufrag,
                                remote_pwd,
                            },
                            start_in_ms,
                            relay,
                            peer_nat,
                        }
                    },
                )
        }

        fn client_msg() -> impl Strategy<Value = ClientMsg> {
            let candidates = || prop::collection::vec(candidate(), 0..4);
            prop_oneof![
                (
                    any::<u32>(),
                    prop::option::of(".{0,12}"),
                    prop::collection::vec(".{0,12}", 0..3),
                    candidates(),
                    nat()
                )
                    .prop_map(|(version, token, names, candidates, nat)| {
                        ClientMsg::Register {
                            version,
                            token,
                            names,
                            candidates,
                            nat,
                        }
                    }),
                (".{0,20}", candidates(), nat()).prop_map(|(name, candidates, nat)| {
                    ClientMsg::Connect {
                        name,
                        candidates,
                        nat,
                    }
                }),
                candidates().prop_map(|candidates| ClientMsg::UpdateCandidates { candidates }),
                (any::<u32>(), prop::option::of(".{0,12}"), ".{0,20}").prop_map(
                    |(version, token, name)| ClientMsg::Release {
                        version,
                        token,
                        name
                    }
                ),
            ]
        }

        fn server_info() -> impl Strategy<Value = ServerInfo> {
            (".{0,30}", any::<[u8; 32]>()).prop_map(|(addr, fp)| ServerInfo {
                addr,
                fingerprint: Fingerprint(fp),
            })
        }

        fn server_msg() -> impl Strategy<Value = ServerMsg> {
            let code = prop_oneof![
                Just(ErrorCode::BadVersion),
                Just(ErrorCode::BadToken),
                Just(ErrorCode::NameTaken),
                Just(ErrorCode::InvalidName),
                Just(ErrorCode::UnknownName),
                Just(ErrorCode::BadRequest),
                Just(ErrorCode::RateLimited),
                Just(ErrorCode::Internal),
            ];
            prop_oneof![
                (
                    addr(),
                    prop::option::of(addr()),
                    prop::collection::vec(server_info(), 0..3)
                )
                    .prop_map(|(observed, stun_alt, members)| {
                        ServerMsg::Registered {
                            observed,
                            stun_alt,
                            members,
                        }
                    }),
                (".{0,20}", server_info())
                    .prop_map(|(name, server)| ServerMsg::Elsewhere { name, server }),
                rendezvous().prop_map(ServerMsg::Rendezvous),
                rendezvous().prop_map(ServerMsg::Incoming),
                (any::<u64>(), ".{0,20}")
                    .prop_map(|(session, reason)| ServerMsg::RelayClosed { session, reason }),
                Just(ServerMsg::CandidatesUpdated),
                ".{0,20}".prop_map(|name| ServerMsg::Released { name }),
                (code, ".{0,20}")
                    .prop_map(|(code, message)| ServerMsg::Error(ErrorMsg { code, message })),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(64))]

            /// Every control message survives its JSON encoding.
            #[test]
            fn client_messages_round_trip(msg in client_msg()) {
                let json = serde_json::to_vec(&msg).unwrap();
                prop_assert_eq!(serde_json::from_slice::<ClientMsg>(&json).unwrap(), msg);
            }

            /// Every message from S survives its JSON encoding.
            #[test]
            fn server_messages_round_trip(msg in server_msg()) {
                let json = serde_json::to_vec(&msg).unwrap();
                prop_assert_eq!(serde_json::from_slice::<ServerMsg>(&json).unwrap(), msg);
            }
        }
    }
}
