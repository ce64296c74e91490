//! The STUN side of the agent's socket: answers the peer's connectivity checks and hands
//! responses to whoever is waiting for them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::path::{PathSocket, StunPacket};
use crate::proto::stun::{self, StunMessage, Tid};
use crate::proto::Credentials;

/// A STUN response and where it came from.
#[derive(Debug)]
pub struct Response {
    /// The decoded response.
    pub msg: StunMessage,
    /// Its source address.
    pub from: SocketAddr,
}

struct Session {
    local_pwd: String,
    remote_ufrag: String,
    checked_from: mpsc::Sender<SocketAddr>,
}

/// Responses queued for a session before they are dropped: a few rounds of checks.
const SESSION_RESPONSES: usize = 64;

#[derive(Default)]
struct State {
    pending: HashMap<Tid, oneshot::Sender<Response>>,
    /// Open sessions by our username fragment in them.
    sessions: HashMap<String, Session>,
    /// Where responses go whose transaction ID starts with a session's prefix: a session's
    /// checks draw their IDs under its prefix, so no per-check registration is needed.
    by_prefix: HashMap<[u8; 4], mpsc::Sender<Response>>,
}

/// Dispatches the STUN datagrams [`PathSocket`] diverts.
pub struct StunRouter {
    socket: Arc<PathSocket>,
    state: Mutex<State>,
}

impl std::fmt::Debug for StunRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StunRouter").finish_non_exhaustive()
    }
}

/// A session's registration with the router: while it lives, checks under its credentials
/// are answered and their sources reported; dropping it unregisters.
pub struct SessionHandle {
    router: Weak<StunRouter>,
    local_ufrag: String,
    /// The first four bytes of every transaction ID this session's checks may use.
    pub prefix: [u8; 4],
    /// Sources of valid checks the peer sent us: each proves the peer reaches us from there.
    pub checked_from: mpsc::Receiver<SocketAddr>,
    /// Responses to this session's checks (transaction IDs under [`Self::prefix`]),
    /// unverified: integrity is for the receiver to check.
    pub responses: mpsc::Receiver<Response>,
}

impl Drop for SessionHandle {
    fn drop(&mut self) {
        if let Some(router) = self.router.upgrade() {
            let mut state = router.lock();
            state.sessions.remove(&self.local_ufrag);
            state.by_prefix.remove(&self.prefix);
        }
    }
}

/// The success response to a check `msg` from `from` whose USERNAME names `theirs` as the
/// sender, if that is the session's `remote_ufrag` and the integrity holds under our
/// `local_pwd`; `None` for anything else, which must go unanswered.
pub(crate) fn answer(
    msg: &StunMessage,
    from: SocketAddr,
    theirs: &str,
    remote_ufrag: &str,
    local_pwd: &str,
) -> Option<Vec<u8>> {
    if theirs != remote_ufrag || !stun::has_valid_integrity(msg, local_pwd) {
        return None;
    }
    Some(stun::binding_success(
        msg.transaction_id(),
        from,
        stun::ResponseExtras::default(),
        Some(local_pwd),
        usize::MAX,
    ))
}

impl StunRouter {
    /// Starts dispatching the STUN datagrams that come out of `rx`.
    pub fn start(socket: Arc<PathSocket>, mut rx: mpsc::Receiver<StunPacket>) -> Arc<Self> {
        let router = Arc::new(StunRouter {
            socket,
            state: Mutex::new(State::default()),
        });
        let weak = Arc::downgrade(&router);
        tokio::spawn(async move {
            while let Some(packet) = rx.recv().await {
                let Some(router) = weak.upgrade() else { break };
                router.dispatch(packet).await;
            }
        });
        router
    }

    /// The socket it sends on.
    pub fn socket(&self) -> &Arc<PathSocket> {
        &self.socket
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a session so the peer's checks are answered.
    pub fn open_session(self: &Arc<Self>, creds: &Credentials) -> SessionHandle {
        let (tx, rx) = mpsc::channel(64);
        let (resp_tx, resp_rx) = mpsc::channel(SESSION_RESPONSES);
        let mut state = self.lock();
        state.sessions.insert(
            creds.local_ufrag.clone(),
            Session {
                local_pwd: creds.local_pwd.clone(),
                remote_ufrag: creds.remote_ufrag.clone(),
                checked_from: tx,
            },
        );
        let prefix = loop {
            let prefix: [u8; 4] = rand::random();
            if !state.by_prefix.contains_key(&prefix) {
                break prefix;
            }
        };
        state.by_prefix.insert(prefix, resp_tx);
        SessionHandle {
            router: Arc::downgrade(self),
            local_ufrag: creds.local_ufrag.clone(),
            prefix,
            checked_from: rx,
            responses: resp_rx,
        }
    }

    /// Sends `request` to `to` (every time it is called with the same `tid`, for
    /// retransmits) and returns a receiver for its response.
    pub async fn send_request(
        &self,
        tid: Tid,
        request: &[u8],
        to: SocketAddr,
    ) -> Option<oneshot::Receiver<Response>> {
        let rx = {
            let mut state = self.lock();
            match state.pending.get(&tid) {
                Some(_) => None,
                None => {
                    let (tx, rx) = oneshot::channel();
                    state.pending.insert(tid, tx);
                    Some(rx)
                }
            }
        };
        if let Err(e) = self.socket.send_to(request, to).await {
            tracing::debug!(%to, error = %e, "STUN send failed");
        }
        rx
    }

    /// Forgets a transaction that is no longer waited for.
    pub fn forget(&self, tid: &Tid) {
        self.lock().pending.remove(tid);
    }

    /// One plain Binding transaction with retransmits (at 0, 250, 750 ms ...) until `timeout`.
    pub async fn binding(
        &self,
        to: SocketAddr,
        change: Option<(bool, bool)>,
        timeout: Duration,
    ) -> Option<Response> {
        let tid = stun::new_tid();
        let request = stun::binding_request(tid, change);
        let mut rx = self.send_request(tid, &request, to).await?;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut wait = Duration::from_millis(250);
        let result = loop {
            let next = (tokio::time::Instant::now() + wait).min(deadline);
            match tokio::time::timeout_at(next, &mut rx).await {
                Ok(Ok(resp)) => break Some(resp),
                Ok(Err(_)) => break None,
                Err(_) if next >= deadline => break None,
                Err(_) => {
                    let _ = self.socket.send_to(&request, to).await;
                    wait *= 2;
                }
            }
        };
        self.forget(&tid);
        result
    }

    async fn dispatch(&self, packet: StunPacket) {
        let Ok(msg) = stun::decode(&packet.data) else {
            tracing::trace!(from = %packet.from, "dropping malformed STUN");
            return;
        };
        if stun::is_binding_request(&msg) {
            self.answer_check(msg, packet.from).await;
        } else {
            let tid = msg.transaction_id();
            let mut state = self.lock();
            let response = Response {
                msg,
                from: packet.from,
            };
            if let Some(waiter) = state.pending.remove(&tid) {
                let _ = waiter.send(response);
            } else if let Some(session) = tid.as_bytes().get(..4).and_then(|p| {
                let p: [u8; 4] = p.try_into().ok()?;
                state.by_prefix.get(&p)
            }) {
                // A full queue drops the response: the check is retransmitted.
                let _ = session.try_send(response);
            }
        }
    }

    /// Answers a peer's check if it names an open session and its integrity holds; anything
    /// else is dropped without a word, so the agent cannot be used to reflect traffic.
    async fn answer_check(&self, msg: StunMessage, from: SocketAddr) {
        let Some((ours, theirs)) = stun::username(&msg).and_then(|u| u.split_once(':')) else {
            return;
        };
        let reply = {
            let state = self.lock();
            let Some(session) = state.sessions.get(ours) else {
                return;
            };
            let Some(reply) = answer(
                &msg,
                from,
                theirs,
                &session.remote_ufrag,
                &session.local_pwd,
            ) else {
                tracing::debug!(%from, "dropping a check with bad credentials");
                return;
            };
            let _ = session.checked_from.try_send(from);
            reply
        };
        if let Err(e) = self.socket.send_to(&reply, from).await {
            tracing::debug!(%from, error = %e, "cannot answer a check");
        }
    }
}
