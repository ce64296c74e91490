//! The relay's configuration: what it may be told (the TOML file's keys), the defaults, and
//! the checks that turn a file into a [`RelayConfig`]. Command-line overrides live in
//! [`crate::cli`]; this module knows nothing of flags.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer};

/// Where S listens (UDP for QUIC and STUN, TCP for QUIC over TCP) unless told otherwise:
/// every address of the host, IPv6 and IPv4 on one dual-stack socket each (IPv4 clients show
/// up as IPv4-mapped addresses, which S turns back into IPv4 wherever it keeps, compares or
/// reports one). On a host without IPv6, [`DEFAULT_LISTEN_V4`] instead.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 7000);

/// Where S listens by default on a host without IPv6: every IPv4 address.
pub const DEFAULT_LISTEN_V4: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), DEFAULT_LISTEN.port());

/// Where S keeps its identity key and the name claims, relative to the working directory,
/// unless told otherwise. Relative on purpose: a first run in a scratch directory leaves
/// nothing behind elsewhere; a real deployment should set an absolute `state_dir`.
pub const DEFAULT_STATE_DIR: &str = "./p2ptun-relay-state";

/// Why a configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The configuration file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The file is not valid TOML, has an unknown key, or a value of the wrong kind.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, which names the key and shows the line.
        message: String,
    },
    /// A value has the right type but is not acceptable.
    #[error("`{key}` {problem}")]
    Invalid {
        /// The offending key (as in the file; the flag of the same name is meant as well).
        key: &'static str,
        /// What is wrong and what is expected.
        problem: String,
    },
}

/// How much a stranger can make S spend, and how much of S one address may hold. A source
/// is an IPv4 address or an IPv6 /64; see [`crate::limits`] for how the bounds work together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections in all (handshaking, unregistered and registered).
    pub max_connections: u32,
    /// QUIC handshakes in progress at once.
    pub max_pending_handshakes: u32,
    /// Handshakes one source may start per second (after proving its address); bursts of
    /// twice as many pass.
    pub handshake_rate_per_ip: u32,
    /// Connections from one source that are handshaking or have not registered yet.
    pub max_unregistered_per_ip: u32,
    /// Registered agents behind one source. Agents are told apart by their keys, so this is
    /// set high enough for a carrier-grade NAT; it only keeps one address from taking all of
    /// `max_connections`.
    pub max_agents_per_ip: u32,
    /// STUN requests answered per second per source IPv4 address or IPv6 /64; bursts of
    /// twice as many pass.
    pub stun_rate_per_ip: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 10_000,
            max_pending_handshakes: 1024,
            handshake_rate_per_ip: 100,
            max_unregistered_per_ip: 32,
            max_agents_per_ip: 5_000,
            stun_rate_per_ip: 20,
        }
    }
}

/// What relaying one session's packets may cost. Sized so that a busy session (a large
/// copy through the relay) is not cut short, while one agent cannot take all of S's
/// bandwidth: per-source rates cover every session of that source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayBudgets {
    /// Bytes one session may relay in all (both directions); the session is closed when
    /// they are used up. 0 switches relaying off: agents are still introduced, without it.
    pub session_bytes: u64,
    /// Bytes per second one session may relay (both directions), with a second's burst;
    /// packets beyond it are dropped like on a congested link.
    pub session_rate: u64,
    /// Bytes per second one source (IPv4 address or IPv6 /64) may send through the relay,
    /// over all its sessions.
    pub rate_per_ip: u64,
    /// A session no packet has crossed for this long is closed, and both agents are told.
    /// Agents on a direct path relay nothing, so this is also how long S keeps a session
    /// that nobody needs at the moment; an agent asks for a new one when it needs it again.
    pub idle_timeout: Duration,
}

impl Default for RelayBudgets {
    fn default() -> Self {
        RelayBudgets {
            session_bytes: 4 << 30,
            session_rate: 100_000_000,
            rate_per_ip: 200_000_000,
            idle_timeout: Duration::from_secs(600),
        }
    }
}

/// A CA-issued certificate chain and its key, both PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The chain, leaf first.
    pub cert: PathBuf,
    /// The leaf's private key.
    pub key: PathBuf,
}

/// Everything S needs to start.
#[derive(Clone, PartialEq, Eq)]
pub struct RelayConfig {
    /// The UDP address for QUIC and STUN, and the TCP address for QUIC over TCP. An IPv6
    /// address is bound dual-stack (it accepts IPv4 too, IPV6_V6ONLY off).
    pub listen: SocketAddr,
    /// Whether S may listen on `0.0.0.0` with `listen`'s port instead when `listen` is `[::]`
    /// and the host has no IPv6. True for the default `listen` only: an address from the
    /// file or the command line is used as given.
    pub ipv4_fallback: bool,
    /// The second STUN address; `None` means the listen address's IP with the next port (or
    /// any free port when `listen`'s port is 0).
    pub stun_alt: Option<SocketAddr>,
    /// Where S's identity key and the name claims live.
    pub state_dir: PathBuf,
    /// Tokens an agent may register with; empty means anyone may register.
    pub tokens: Vec<String>,
    /// A certificate to present instead of S's self-made identity.
    pub tls: Option<TlsFiles>,
    /// Where to serve Prometheus metrics and the status page over HTTP, if anywhere.
    pub metrics: Option<SocketAddr>,
    /// Resource limits.
    pub limits: Limits,
    /// What relaying may cost.
    pub relay: RelayBudgets,
    /// Days a name may go unused by its owner before S gives it up for anyone to claim;
    /// `None` keeps names for good (see [`crate::names`]).
    pub name_expiry_days: Option<u64>,
    /// Cluster mode: the client URLs of the etcd S shares with the other S of its cluster
    /// (see [`crate::cluster`]); empty for a standalone S.
    pub etcd: Vec<String>,
    /// Cluster mode: the address agents reach this S at, `HOST:PORT`, as the other members
    /// hand it out; `None` means `listen` (which must then be a specific address).
    pub public_addr: Option<String>,
    /// Cluster mode: the etcd user (`etcd_user`) S logs in as, if etcd's authentication is on.
    pub etcd_user: Option<String>,
    /// Its password (`etcd_password`).
    pub etcd_password: Option<String>,
    /// Cluster mode, `https://` etcd URLs: the CA that signed etcd's certificates (PEM);
    /// `None` trusts the system's roots.
    pub etcd_ca: Option<PathBuf>,
    /// A client certificate chain (PEM) to present to etcd, with `etcd_key`.
    pub etcd_cert: Option<PathBuf>,
    /// The client certificate's key (PEM).
    pub etcd_key: Option<PathBuf>,
}

/// What `name_expiry_days` takes, for the file's and the flag's errors alike.
pub const EXPIRY_DAYS: &str = "a whole number of days, at least 1, such as 365 (leave it out \
                               for names that never expire)";

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            listen: DEFAULT_LISTEN,
            ipv4_fallback: true,
            stun_alt: None,
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            tokens: Vec::new(),
            tls: None,
            metrics: None,
            limits: Limits::default(),
            relay: RelayBudgets::default(),
            name_expiry_days: None,
            etcd: Vec::new(),
            public_addr: None,
            etcd_user: None,
            etcd_password: None,
            etcd_ca: None,
            etcd_cert: None,
            etcd_key: None,
        }
    }
}

impl fmt::Debug for RelayConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Tokens are secrets: logs get their number only.
        f.debug_struct("RelayConfig")
            .field("listen", &self.listen)
            .field("ipv4_fallback", &self.ipv4_fallback)
            .field("stun_alt", &self.stun_alt)
            .field("state_dir", &self.state_dir)
            .field("tokens", &self.tokens.len())
            .field("tls", &self.tls)
            .field("metrics", &self.metrics)
            .field("limits", &self.limits)
            .field("relay", &self.relay)
            .field("name_expiry_days", &self.name_expiry_days)
            .field("etcd", &self.etcd)
            .field("public_addr", &self.public_addr)
            .field("etcd_user", &self.etcd_user)
            .field(
                "etcd_password",
                &self.etcd_password.as_ref().map(|_| "(set)"),
            )
            .field("etcd_ca", &self.etcd_ca)
            .field("etcd_cert", &self.etcd_cert)
            .field("etcd_key", &self.etcd_key)
            .finish()
    }
}

impl RelayConfig {
    /// The address the alternate STUN socket binds to.
    ///
    /// `None` when the default (listen port + 1) would overflow; [`RelayConfig::validate`]
    /// reports that.
    pub fn stun_alt_bind(&self) -> Option<SocketAddr> {
        self.stun_alt_bind_beside(self.listen)
    }

    /// The address the alternate STUN socket binds to when the main one is bound at
    /// `listen` (which is [`Self::listen`], or its IPv4 fallback).
    pub fn stun_alt_bind_beside(&self, listen: SocketAddr) -> Option<SocketAddr> {
        if let Some(alt) = self.stun_alt {
            return Some(alt);
        }
        let port = match listen.port() {
            0 => 0,
            p => p.checked_add(1)?,
        };
        Some(SocketAddr::new(listen.ip(), port))
    }

    /// Where agents reach this S, in cluster mode: `public_addr`, else `listen` when it is
    /// a specific address.
    pub fn cluster_addr(&self) -> Option<String> {
        self.public_addr.clone().or_else(|| {
            (!self.listen.ip().is_unspecified() && self.listen.port() != 0)
                .then(|| self.listen.to_string())
        })
    }

    /// Who S logs in to etcd as, if anyone.
    pub fn etcd_auth(&self) -> Option<crate::etcd::EtcdAuth> {
        Some(crate::etcd::EtcdAuth {
            user: self.etcd_user.clone()?,
            password: self.etcd_password.clone()?,
        })
    }

    /// What TLS to etcd checks and presents, if set (else the system's roots, no client
    /// certificate).
    pub fn etcd_tls(&self) -> Option<crate::etcd::EtcdTls> {
        (self.etcd_ca.is_some() || self.etcd_cert.is_some()).then(|| crate::etcd::EtcdTls {
            ca: self.etcd_ca.clone(),
            client: self.etcd_cert.clone().zip(self.etcd_key.clone()),
        })
    }

    fn validate_cluster(&self) -> Result<(), ConfigError> {
        let invalid = |key, problem: String| Err(ConfigError::Invalid { key, problem });
        if self.etcd.is_empty() {
            for (key, set) in [
                ("public_addr", self.public_addr.is_some()),
                ("etcd_user", self.etcd_user.is_some()),
                ("etcd_password", self.etcd_password.is_some()),
                ("etcd_ca", self.etcd_ca.is_some()),
                ("etcd_cert", self.etcd_cert.is_some()),
                ("etcd_key", self.etcd_key.is_some()),
            ] {
                if set {
                    return invalid(
                        key,
                        "is for cluster mode: set `etcd` (--etcd) too, or leave it out".into(),
                    );
                }
            }
            return Ok(());
        }
        match (&self.etcd_user, &self.etcd_password) {
            (Some(_), None) => {
                return invalid(
                    "etcd_password",
                    "must be set with etcd_user (--etcd-password, or P2PTUN_ETCD_PASSWORD)".into(),
                )
            }
            (None, Some(_)) => {
                return invalid("etcd_user", "must be set with etcd_password".into())
            }
            (Some(user), Some(_)) if user.is_empty() => {
                return invalid("etcd_user", "must not be empty".into())
            }
            _ => {}
        }
        if let Err(e) = crate::etcd::Etcd::new(&self.etcd, Duration::from_secs(1)) {
            return invalid("etcd", e);
        }
        match (&self.etcd_cert, &self.etcd_key) {
            (Some(_), None) => return invalid("etcd_key", "must be set with etcd_cert".into()),
            (None, Some(_)) => return invalid("etcd_cert", "must be set with etcd_key".into()),
            _ => {}
        }
        if let Some(addr) = &self.public_addr {
            if let Err(e) = p2ptun::config::parse_server(addr) {
                return invalid("public_addr", e);
            }
        }
        if self.cluster_addr().is_none() {
            return invalid(
                "public_addr",
                format!(
                    "must be set in cluster mode when `listen` ({}) is not an address agents                      can reach; give the HOST:PORT they use, such as relay1.example.com:7000",
                    self.listen
                ),
            );
        }
        if self.name_expiry_days.is_some() {
            return invalid(
                "name_expiry_days",
                "is not supported in cluster mode yet (names are kept in etcd for good);                  leave it out"
                    .into(),
            );
        }
        Ok(())
    }

    /// How long a name may go unused before S gives it up, if ever.
    pub fn name_expiry(&self) -> Option<Duration> {
        self.name_expiry_days
            .map(|days| Duration::from_secs(days.saturating_mul(86_400)))
    }

    /// Checks what types alone cannot: limits of at least 1, tokens that are not empty, a
    /// usable alternate STUN address, a name expiry of at least a day.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let limits = [
            ("max_connections", self.limits.max_connections),
            ("max_pending_handshakes", self.limits.max_pending_handshakes),
            ("handshake_rate_per_ip", self.limits.handshake_rate_per_ip),
            (
                "max_unregistered_per_ip",
                self.limits.max_unregistered_per_ip,
            ),
            ("max_agents_per_ip", self.limits.max_agents_per_ip),
            ("stun_rate_per_ip", self.limits.stun_rate_per_ip),
        ];
        for (key, value) in limits {
            if value == 0 {
                return Err(ConfigError::Invalid {
                    key,
                    problem: "must be at least 1".into(),
                });
            }
        }
        // `relay_session_bytes` may be 0 (no relaying); a rate of 0 would relay nothing
        // while claiming to relay, so it is refused.
        let rates = [
            ("relay_session_rate", self.relay.session_rate),
            ("relay_rate_per_ip", self.relay.rate_per_ip),
        ];
        for (key, value) in rates {
            if value == 0 {
                return Err(ConfigError::Invalid {
                    key,
                    problem: "must be at least 1 (bytes per second); set \
                              `relay_session_bytes = 0` to switch relaying off"
                        .into(),
                });
            }
        }
        // 0 would close every session at the first sweep, before its agents could use it.
        if self.relay.idle_timeout < Duration::from_secs(1) {
            return Err(ConfigError::Invalid {
                key: "relay_idle_timeout",
                problem: "must be at least 1 (second)".into(),
            });
        }
        // 0 would give up every name its owner is not exposing at this very moment.
        if self.name_expiry_days == Some(0) {
            return Err(ConfigError::Invalid {
                key: "name_expiry_days",
                problem: format!("must be {EXPIRY_DAYS}, not 0"),
            });
        }
        self.validate_cluster()?;
        if self.tokens.iter().any(|t| t.trim().is_empty()) {
            return Err(ConfigError::Invalid {
                key: "tokens",
                problem: "must not contain an empty token (leave `tokens` out for open \
                          registration)"
                    .into(),
            });
        }
        match self.stun_alt_bind() {
            None => Err(ConfigError::Invalid {
                key: "stun_alt",
                problem: format!(
                    "must be set: the default, listen port + 1, does not exist for {}",
                    self.listen
                ),
            }),
            Some(alt) if alt == self.listen && alt.port() != 0 => Err(ConfigError::Invalid {
                key: "stun_alt",
                problem: format!("must differ from `listen` ({alt})"),
            }),
            Some(_) => Ok(()),
        }
    }
}

/// The configuration file as written: every key optional, unknown keys refused.
///
/// Each field is read through a function naming its key, so that a bad value's error says
/// which key it is and what it should look like, not only on which line it sits.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// See [`RelayConfig::listen`].
    #[serde(default, deserialize_with = "de_listen")]
    pub listen: Option<SocketAddr>,
    /// See [`RelayConfig::stun_alt`].
    #[serde(default, deserialize_with = "de_stun_alt")]
    pub stun_alt: Option<SocketAddr>,
    /// See [`RelayConfig::state_dir`].
    #[serde(default, deserialize_with = "de_state_dir")]
    pub state_dir: Option<PathBuf>,
    /// See [`RelayConfig::tokens`].
    #[serde(default, deserialize_with = "de_tokens")]
    pub tokens: Option<Vec<String>>,
    /// The certificate chain PEM file; needs `tls_key`.
    #[serde(default, deserialize_with = "de_tls_cert")]
    pub tls_cert: Option<PathBuf>,
    /// The private key PEM file; needs `tls_cert`.
    #[serde(default, deserialize_with = "de_tls_key")]
    pub tls_key: Option<PathBuf>,
    /// See [`RelayConfig::metrics`].
    #[serde(default, deserialize_with = "de_metrics")]
    pub metrics: Option<SocketAddr>,
    /// Replaced by `max_unregistered_per_ip` and `max_agents_per_ip`; read only to say so.
    #[serde(default, deserialize_with = "de_max_connections_per_ip")]
    pub max_connections_per_ip: Option<u32>,
    /// See [`Limits::max_connections`].
    #[serde(default, deserialize_with = "de_max_connections")]
    pub max_connections: Option<u32>,
    /// See [`Limits::max_pending_handshakes`].
    #[serde(default, deserialize_with = "de_max_pending_handshakes")]
    pub max_pending_handshakes: Option<u32>,
    /// See [`Limits::handshake_rate_per_ip`].
    #[serde(default, deserialize_with = "de_handshake_rate_per_ip")]
    pub handshake_rate_per_ip: Option<u32>,
    /// See [`Limits::max_unregistered_per_ip`].
    #[serde(default, deserialize_with = "de_max_unregistered_per_ip")]
    pub max_unregistered_per_ip: Option<u32>,
    /// See [`Limits::max_agents_per_ip`].
    #[serde(default, deserialize_with = "de_max_agents_per_ip")]
    pub max_agents_per_ip: Option<u32>,
    /// See [`Limits::stun_rate_per_ip`].
    #[serde(default, deserialize_with = "de_stun_rate_per_ip")]
    pub stun_rate_per_ip: Option<u32>,
    /// See [`RelayBudgets::session_bytes`].
    #[serde(default, deserialize_with = "de_relay_session_bytes")]
    pub relay_session_bytes: Option<u64>,
    /// See [`RelayBudgets::session_rate`].
    #[serde(default, deserialize_with = "de_relay_session_rate")]
    pub relay_session_rate: Option<u64>,
    /// See [`RelayBudgets::rate_per_ip`].
    #[serde(default, deserialize_with = "de_relay_rate_per_ip")]
    pub relay_rate_per_ip: Option<u64>,
    /// See [`RelayBudgets::idle_timeout`], in seconds.
    #[serde(default, deserialize_with = "de_relay_idle_timeout")]
    pub relay_idle_timeout: Option<u64>,
    /// See [`RelayConfig::name_expiry_days`].
    #[serde(default, deserialize_with = "de_name_expiry_days")]
    pub name_expiry_days: Option<u64>,
    /// See [`RelayConfig::etcd`].
    #[serde(default, deserialize_with = "de_etcd")]
    pub etcd: Option<Vec<String>>,
    /// See [`RelayConfig::public_addr`].
    #[serde(default, deserialize_with = "de_public_addr")]
    pub public_addr: Option<String>,
    /// See [`RelayConfig::etcd_user`].
    #[serde(default, deserialize_with = "de_etcd_user")]
    pub etcd_user: Option<String>,
    /// See [`RelayConfig::etcd_password`].
    #[serde(default, deserialize_with = "de_etcd_password")]
    pub etcd_password: Option<String>,
    /// See [`RelayConfig::etcd_ca`].
    #[serde(default, deserialize_with = "de_etcd_ca")]
    pub etcd_ca: Option<PathBuf>,
    /// See [`RelayConfig::etcd_cert`].
    #[serde(default, deserialize_with = "de_etcd_cert")]
    pub etcd_cert: Option<PathBuf>,
    /// See [`RelayConfig::etcd_key`].
    #[serde(default, deserialize_with = "de_etcd_key")]
    pub etcd_key: Option<PathBuf>,
}

const ADDR: &str = "an IP address and port in quotes, such as \"0.0.0.0:7000\" or \"[::]:7000\"";
const PATH: &str = "a path in quotes";
const COUNT: &str = "a whole number from 1 to 4294967295";
const BYTES: &str = "a whole number of bytes, such as 4294967296 (4 GiB)";
const BYTE_RATE: &str = "a whole number of bytes per second, such as 100000000 (100 MB/s)";
const SECONDS: &str = "a whole number of seconds, such as 600 (10 minutes)";

/// Reads one value, turning any failure into a message that names `key` and what it takes.
fn typed<'de, D, T>(d: D, key: &str, expected: &str) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: DeserializeOwned,
{
    let value = toml::Value::deserialize(d)?;
    let shown = value.to_string();
    value
        .try_into::<T>()
        .map(Some)
        .map_err(|_| D::Error::custom(format!("`{key}` must be {expected}, not {shown}")))
}

macro_rules! field_readers {
    ($($fn_name:ident: $ty:ty = $key:literal, $expected:expr;)*) => {$(
        fn $fn_name<'de, D: Deserializer<'de>>(d: D) -> Result<Option<$ty>, D::Error> {
            typed(d, $key, $expected)
        }
    )*};
}

field_readers! {
    de_listen: SocketAddr = "listen", ADDR;
    de_stun_alt: SocketAddr = "stun_alt", ADDR;
    de_metrics: SocketAddr = "metrics", ADDR;
    de_state_dir: PathBuf = "state_dir", PATH;
    de_tls_cert: PathBuf = "tls_cert", PATH;
    de_tls_key: PathBuf = "tls_key", PATH;
    de_tokens: Vec<String> = "tokens", "a list of strings, such as [\"s3cret\"]";
    de_max_connections_per_ip: u32 = "max_connections_per_ip", COUNT;
    de_max_connections: u32 = "max_connections", COUNT;
    de_max_pending_handshakes: u32 = "max_pending_handshakes", COUNT;
    de_handshake_rate_per_ip: u32 = "handshake_rate_per_ip", COUNT;
    de_max_unregistered_per_ip: u32 = "max_unregistered_per_ip", COUNT;
    de_max_agents_per_ip: u32 = "max_agents_per_ip", COUNT;
    de_stun_rate_per_ip: u32 = "stun_rate_per_ip", COUNT;
    de_relay_session_bytes: u64 = "relay_session_bytes", BYTES;
    de_relay_session_rate: u64 = "relay_session_rate", BYTE_RATE;
    de_relay_rate_per_ip: u64 = "relay_rate_per_ip", BYTE_RATE;
    de_relay_idle_timeout: u64 = "relay_idle_timeout", SECONDS;
    de_name_expiry_days: u64 = "name_expiry_days", EXPIRY_DAYS;
    de_etcd: Vec<String> = "etcd", "a list of etcd client URLs, such as [\"http://10.0.0.5:2379\"]";
    de_public_addr: String = "public_addr", "HOST:PORT in quotes, such as \"relay1.example.com:7000\"";
    de_etcd_user: String = "etcd_user", "an etcd user name in quotes, such as \"p2ptun\"";
    de_etcd_password: String = "etcd_password", "a password in quotes";
    de_etcd_ca: PathBuf = "etcd_ca", PATH;
    de_etcd_cert: PathBuf = "etcd_cert", PATH;
    de_etcd_key: PathBuf = "etcd_key", PATH;
}

impl FileConfig {
    /// Parses the text of a configuration file; `path` only names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// Reads and parses a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Fills a [`RelayConfig`] from the defaults and this file.
    pub fn into_config(self) -> Result<RelayConfig, ConfigError> {
        let defaults = RelayConfig::default();
        let tls = match (self.tls_cert, self.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            (None, None) => None,
            (Some(_), None) => {
                return Err(ConfigError::Invalid {
                    key: "tls_key",
                    problem: "must be set when `tls_cert` is".into(),
                })
            }
            (None, Some(_)) => {
                return Err(ConfigError::Invalid {
                    key: "tls_cert",
                    problem: "must be set when `tls_key` is".into(),
                })
            }
        };
        if self.max_connections_per_ip.is_some() {
            // Refused rather than ignored: the operator meant to bound something, and the
            // new keys bound it differently.
            return Err(ConfigError::Invalid {
                key: "max_connections_per_ip",
                problem: "is no longer read: one address may hold many agents (a \
                          carrier-grade NAT); set `max_unregistered_per_ip` for connections \
                          that have not registered and `max_agents_per_ip` for registered \
                          agents instead"
                    .into(),
            });
        }
        let limits = Limits {
            max_connections: self
                .max_connections
                .unwrap_or(defaults.limits.max_connections),
            max_pending_handshakes: self
                .max_pending_handshakes
                .unwrap_or(defaults.limits.max_pending_handshakes),
            handshake_rate_per_ip: self
                .handshake_rate_per_ip
                .unwrap_or(defaults.limits.handshake_rate_per_ip),
            max_unregistered_per_ip: self
                .max_unregistered_per_ip
                .unwrap_or(defaults.limits.max_unregistered_per_ip),
            max_agents_per_ip: self
                .max_agents_per_ip
                .unwrap_or(defaults.limits.max_agents_per_ip),
            stun_rate_per_ip: self
                .stun_rate_per_ip
                .unwrap_or(defaults.limits.stun_rate_per_ip),
        };
        Ok(RelayConfig {
            ipv4_fallback: self.listen.is_none(),
            listen: self.listen.unwrap_or(defaults.listen),
            stun_alt: self.stun_alt,
            state_dir: self.state_dir.unwrap_or(defaults.state_dir),
            tokens: self.tokens.unwrap_or_default(),
            tls,
            metrics: self.metrics,
            limits,
            relay: RelayBudgets {
                session_bytes: self
                    .relay_session_bytes
                    .unwrap_or(defaults.relay.session_bytes),
                session_rate: self
                    .relay_session_rate
                    .unwrap_or(defaults.relay.session_rate),
                rate_per_ip: self.relay_rate_per_ip.unwrap_or(defaults.relay.rate_per_ip),
                idle_timeout: self
                    .relay_idle_timeout
                    .map_or(defaults.relay.idle_timeout, Duration::from_secs),
            },
            name_expiry_days: self.name_expiry_days,
            etcd: self.etcd.unwrap_or_default(),
            public_addr: self.public_addr,
            etcd_user: self.etcd_user,
            etcd_password: self.etcd_password,
            etcd_ca: self.etcd_ca,
            etcd_cert: self.etcd_cert,
            etcd_key: self.etcd_key,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<RelayConfig, ConfigError> {
        let config = FileConfig::parse(text, Path::new("relay.toml"))?.into_config()?;
        config.validate()?;
        Ok(config)
    }

    #[test]
    fn a_full_file_is_read() {
        let config = parse(
            r#"
            listen = "192.0.2.1:7100"
            stun_alt = "192.0.2.2:7100"
            state_dir = "/var/lib/p2ptun-relay"
            tokens = ["one", "two"]
            tls_cert = "/etc/relay/cert.pem"
            tls_key = "/etc/relay/key.pem"
            metrics = "127.0.0.1:9100"
            max_connections = 100
            max_pending_handshakes = 10
            handshake_rate_per_ip = 7
            max_unregistered_per_ip = 4
            max_agents_per_ip = 50
            stun_rate_per_ip = 5
            relay_session_bytes = 1000000
            relay_session_rate = 2000
            relay_rate_per_ip = 3000
            relay_idle_timeout = 30
            name_expiry_days = 90
            "#,
        )
        .unwrap();
        assert_eq!(config.listen, "192.0.2.1:7100".parse().unwrap());
        assert_eq!(
            config.stun_alt_bind(),
            Some("192.0.2.2:7100".parse().unwrap())
        );
        assert_eq!(config.state_dir, PathBuf::from("/var/lib/p2ptun-relay"));
        assert_eq!(config.tokens, vec!["one", "two"]);
        assert_eq!(
            config.tls,
            Some(TlsFiles {
                cert: "/etc/relay/cert.pem".into(),
                key: "/etc/relay/key.pem".into()
            })
        );
        assert_eq!(config.metrics, Some("127.0.0.1:9100".parse().unwrap()));
        assert_eq!(
            config.limits,
            Limits {
                max_connections: 100,
                max_pending_handshakes: 10,
                handshake_rate_per_ip: 7,
                max_unregistered_per_ip: 4,
                max_agents_per_ip: 50,
                stun_rate_per_ip: 5
            }
        );
        assert_eq!(
            config.relay,
            RelayBudgets {
                session_bytes: 1_000_000,
                session_rate: 2000,
                rate_per_ip: 3000,
                idle_timeout: Duration::from_secs(30)
            }
        );
        assert_eq!(config.name_expiry_days, Some(90));
        assert_eq!(config.name_expiry(), Some(Duration::from_secs(90 * 86_400)));
    }

    #[test]
    fn the_old_per_address_connection_cap_is_refused_with_what_replaced_it() {
        let err = parse("max_connections_per_ip = 32")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`max_connections_per_ip` is no longer read"),
            "{err}"
        );
        assert!(err.contains("max_unregistered_per_ip"), "{err}");
        assert!(err.contains("max_agents_per_ip"), "{err}");
    }

    #[test]
    fn an_empty_file_gives_the_defaults() {
        let config = parse("").unwrap();
        assert_eq!(config, RelayConfig::default());
        assert_eq!(config.listen, "[::]:7000".parse().unwrap());
        assert!(config.ipv4_fallback);
        assert_eq!(config.stun_alt_bind(), Some("[::]:7001".parse().unwrap()));
        assert_eq!(
            config.stun_alt_bind_beside(DEFAULT_LISTEN_V4),
            Some("0.0.0.0:7001".parse().unwrap())
        );
        // A listen address given, even the default one, is used as given.
        let given = parse("listen = \"[::]:7000\"").unwrap();
        assert_eq!(given.listen, DEFAULT_LISTEN);
        assert!(!given.ipv4_fallback);
        assert!(!format!("{config:?}").is_empty());
    }

    #[test]
    fn an_unknown_key_is_named() {
        let err = parse("listen = \"0.0.0.0:1\"\nlisten_port = 3\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("relay.toml"), "{err}");
        assert!(err.contains("unknown field `listen_port`"), "{err}");
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn a_bad_value_names_its_key_and_what_is_expected() {
        let err = parse("listen = \"nope\"").unwrap_err().to_string();
        assert!(
            err.contains("`listen` must be an IP address and port"),
            "{err}"
        );
        assert!(err.contains("\"nope\""), "{err}");

        let err = parse("max_connections = -1").unwrap_err().to_string();
        assert!(
            err.contains("`max_connections` must be a whole number"),
            "{err}"
        );

        let err = parse("tokens = \"abc\"").unwrap_err().to_string();
        assert!(err.contains("`tokens` must be a list of strings"), "{err}");

        let err = parse("stun_rate_per_ip = 0").unwrap_err().to_string();
        assert!(
            err.contains("`stun_rate_per_ip` must be at least 1"),
            "{err}"
        );

        let err = parse("relay_session_rate = 0").unwrap_err().to_string();
        assert!(
            err.contains("`relay_session_rate` must be at least 1"),
            "{err}"
        );
        let err = parse("relay_rate_per_ip = \"fast\"")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`relay_rate_per_ip` must be a whole number of bytes per second"),
            "{err}"
        );
        let err = parse("relay_session_bytes = -5").unwrap_err().to_string();
        assert!(
            err.contains("`relay_session_bytes` must be a whole number of bytes"),
            "{err}"
        );
        // 0 bytes is allowed: it switches relaying off.
        assert_eq!(
            parse("relay_session_bytes = 0")
                .unwrap()
                .relay
                .session_bytes,
            0
        );

        let err = parse("relay_idle_timeout = 0").unwrap_err().to_string();
        assert!(
            err.contains("`relay_idle_timeout` must be at least 1 (second)"),
            "{err}"
        );
        for bad in ["-3", "\"10m\"", "2.5"] {
            let err = parse(&format!("relay_idle_timeout = {bad}"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("`relay_idle_timeout` must be a whole number of seconds"),
                "{bad}: {err}"
            );
        }

        for bad in ["0", "-3", "\"never\"", "1.5"] {
            let err = parse(&format!("name_expiry_days = {bad}"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("`name_expiry_days` must be a whole number of days, at least 1"),
                "{bad}: {err}"
            );
        }
        assert_eq!(parse("").unwrap().name_expiry(), None);

        let err = parse("tokens = [\"\"]").unwrap_err().to_string();
        assert!(err.contains("`tokens`"), "{err}");

        let err = parse("tls_cert = \"c.pem\"").unwrap_err().to_string();
        assert!(err.contains("`tls_key` must be set"), "{err}");
    }

    #[test]
    fn the_alternate_stun_port_follows_the_listen_port() {
        let mut config = RelayConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            ..RelayConfig::default()
        };
        assert_eq!(config.stun_alt_bind(), Some("127.0.0.1:0".parse().unwrap()));
        config.listen = "127.0.0.1:65535".parse().unwrap();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("`stun_alt` must be set"), "{err}");
        config.stun_alt = Some(config.listen);
        assert!(config.validate().is_err());
    }

    #[test]
    fn the_example_file_parses_with_every_key_uncommented() {
        let text = include_str!("../relay.example.toml");
        assert_eq!(parse(text).unwrap(), RelayConfig::default());
        // The cluster keys on their own: cluster mode takes no `name_expiry_days`.
        let cluster_key = |l: &str| {
            ["# etcd", "# public_addr ="]
                .iter()
                .any(|k| l.starts_with(k))
        };
        let uncomment = |cluster: bool| -> String {
            text.lines()
                .map(|l| match l.strip_prefix("# ") {
                    Some(rest) if rest.contains(" = ") && cluster_key(l) == cluster => rest,
                    _ => l,
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        let clustered = parse(&uncomment(true)).unwrap_or_else(|e| panic!("{e}"));
        assert!(!clustered.etcd.is_empty() && clustered.public_addr.is_some());
        assert!(clustered.etcd_auth().is_some() && clustered.etcd_tls().is_some());
        let uncommented = uncomment(false);
        let config = parse(&uncommented).unwrap_or_else(|e| panic!("{e}\n{uncommented}"));
        assert_eq!(config.tokens, vec!["change-me"]);
        assert_eq!(config.metrics, Some("127.0.0.1:9100".parse().unwrap()));
        assert!(config.tls.is_some());
        assert_eq!(config.limits, Limits::default());
        assert_eq!(config.relay, RelayBudgets::default());
        assert!(config.name_expiry_days.is_some());
    }

    #[test]
    fn etcd_logins_and_certificates_need_both_halves_and_cluster_mode() {
        let etcd = "etcd = [\"http://127.0.0.1:2379\"]\nlisten = \"127.0.0.1:7000\"\n";
        let user = "etcd_user = \"p2ptun\"\n";
        let password = "etcd_password = \"pw\"\n";
        let err = |text: &str| parse(text).unwrap_err().to_string();
        assert!(err(&format!("{etcd}{user}")).contains("etcd_password"));
        assert!(err(&format!("{etcd}{password}")).contains("etcd_user"));
        assert!(err(&format!("{user}{password}")).contains("cluster mode"));
        let both = parse(&format!("{etcd}{user}{password}")).unwrap();
        assert_eq!(both.etcd_auth().map(|a| a.user), Some("p2ptun".to_owned()));
        // A client certificate comes with its key (the files are read when S starts, as
        // `tls_cert`'s are).
        let cert = "etcd_cert = \"/nonexistent/client.pem\"\n";
        assert!(err(&format!("{etcd}{cert}")).contains("etcd_key"));
    }

    #[test]
    fn debug_output_hides_tokens() {
        let config = RelayConfig {
            tokens: vec!["s3cret".into()],
            etcd_password: Some("pa55word".into()),
            ..RelayConfig::default()
        };
        let shown = format!("{config:?} {:?}", config.etcd_auth());
        assert!(
            !shown.contains("s3cret") && !shown.contains("pa55word"),
            "{shown}"
        );
    }
}
