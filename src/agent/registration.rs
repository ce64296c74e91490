//! A live registration with S: the control connection and what S told this agent, and the
//! requests made on it (an introduction, new candidates).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::anyhow;
use quinn::Connection;

use crate::proto::{
    read_frame, write_frame, Candidate, CandidateKind, ClientMsg, Fingerprint, NatMapping,
    Rendezvous, ServerInfo, ServerMsg,
};

/// How long any one exchange with S may take.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// A live registration with S.
#[derive(Debug)]
pub struct Registered {
    /// The control connection.
    pub conn: Connection,
    /// S as this agent names it: `HOST:PORT` as given with `--server`, or as another S of
    /// its cluster vouched for it.
    pub name: String,
    /// S's key, as checked.
    pub fingerprint: Fingerprint,
    /// Whether this agent only visits this S, to reach a name exposed there, while
    /// registered at home with another one (see [`super::visit`]).
    pub visiting: bool,
    /// In a cluster, every S that is up, as this S vouched for them.
    pub members: Vec<ServerInfo>,
    /// S's address.
    pub server: SocketAddr,
    /// All of S's addresses this agent can use, as resolved for this registration.
    pub server_addrs: Vec<SocketAddr>,
    /// Whether the control connection runs over UDP (else framed on TCP).
    pub over_udp: bool,
    /// Where S saw this agent come from: its server-reflexive address, of the control
    /// connection's family.
    pub observed: SocketAddr,
    /// This agent's reflexive address in the other family, if S has an address there and
    /// answered STUN on it.
    pub observed_other: Option<SocketAddr>,
    /// Over a TCP control connection (where `observed` is the TCP connection's mapping),
    /// this agent's UDP mapping toward S, if STUN over UDP answered.
    pub udp_observed: Option<SocketAddr>,
    /// Where S saw this agent's TCP punching port come from, if it could tell.
    pub tcp_observed: Option<SocketAddr>,
    /// How this agent's NAT picks public ports, found at registration.
    pub nat: NatMapping,
    /// The candidates the registration carried.
    pub registered_with: Vec<Candidate>,
    /// The send half of the registration stream; finishing it would end the registration.
    pub(super) _registration: quinn::SendStream,
    /// Tasks that serve this registration alone (a visit's), stopped with it.
    pub(super) tasks: Vec<tokio::task::AbortHandle>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// S's answer to a forwarder's request for a name.
#[derive(Debug)]
pub enum Introduction {
    /// The introduction to the exposer.
    Here(Rendezvous),
    /// The exposer is registered with another S of the cluster, which introduces it.
    Elsewhere(ServerInfo),
}

impl Registered {
    /// Asks S to introduce this agent to the exposer of `name`.
    pub async fn connect(
        &self,
        name: &str,
        candidates: Vec<Candidate>,
    ) -> anyhow::Result<Introduction> {
        let msg = ClientMsg::Connect {
            name: name.to_owned(),
            candidates,
            nat: self.nat,
        };
        match self.request(&msg).await? {
            ServerMsg::Rendezvous(rv) if rv.name == name => Ok(Introduction::Here(rv)),
            ServerMsg::Elsewhere { name: n, server } if n == name => {
                Ok(Introduction::Elsewhere(server))
            }
            other => Err(unexpected(other)),
        }
    }

    /// Replaces the candidates S gives the peers of this agent's later introductions.
    pub async fn update_candidates(&self, candidates: Vec<Candidate>) -> anyhow::Result<()> {
        match self
            .request(&ClientMsg::UpdateCandidates { candidates })
            .await?
        {
            ServerMsg::CandidatesUpdated => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Replaces the names S lists this agent under (a reloaded `p2ptun up`); S refuses, and
    /// keeps the old ones, if another key holds one of them.
    pub async fn update_names(&self, names: Vec<String>) -> anyhow::Result<()> {
        match self.request(&ClientMsg::UpdateNames { names }).await? {
            ServerMsg::NamesUpdated => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    async fn request(&self, msg: &ClientMsg) -> anyhow::Result<ServerMsg> {
        request(&self.conn, msg).await
    }

    /// `local` (this agent's own candidates) with the addresses S observed added.
    pub fn with_reflexive(&self, mut out: Vec<Candidate>) -> Vec<Candidate> {
        out.push(Candidate {
            kind: CandidateKind::ServerReflexive,
            addr: self.observed,
        });
        out.extend(
            self.observed_other
                .into_iter()
                .chain(self.udp_observed)
                .map(|addr| Candidate {
                    kind: CandidateKind::ServerReflexive,
                    addr,
                }),
        );
        out.extend(self.tcp_observed.map(|addr| Candidate {
            kind: CandidateKind::TcpServerReflexive,
            addr,
        }));
        out
    }
}

/// One request to S on a stream of its own on `conn`, and S's one answer.
pub async fn request(conn: &Connection, msg: &ClientMsg) -> anyhow::Result<ServerMsg> {
    let exchange = async {
        let (mut send, mut recv) = conn.open_bi().await?;
        write_frame(&mut send, msg).await?;
        let _ = send.finish();
        read_frame::<ServerMsg, _>(&mut recv)
            .await?
            .ok_or_else(|| anyhow!("S closed the request without an answer"))
    };
    tokio::time::timeout(EXCHANGE_TIMEOUT, exchange)
        .await
        .map_err(|_| anyhow!("S did not answer within {}s", EXCHANGE_TIMEOUT.as_secs()))?
}

/// An answer a request did not expect: S's error, or a protocol mix-up.
fn unexpected(answer: ServerMsg) -> anyhow::Error {
    match answer {
        ServerMsg::Error(e) => anyhow!(e),
        other => anyhow!("S answered with an unexpected message: {other:?}"),
    }
}
