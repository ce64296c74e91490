//! A small client of etcd v3's JSON gateway: the HTTP/JSON mapping of etcd's gRPC API that
//! every etcd serves on its client URLs. Cluster mode ([`crate::cluster`]) needs reads, puts,
//! deletes, transactions and leases, each one HTTP/1.1 request here.
//!
//! Why the gateway rather than the `etcd-client` crate: that crate compiles etcd's protobuf
//! files in its build script, so every build of S (CI's too) would need `protoc`, and it
//! brings tonic and prost, minutes of compile time on two cores, for a handful of unary
//! calls. The gateway is part of every etcd from 3.4 on (the `/v3/` paths). What it costs:
//! no watch streams (cluster mode reads when it needs to know), and 64-bit integers come as
//! JSON strings, which this module parses.
//!
//! Endpoints are tried in turn, starting with the last one that answered, so one etcd
//! member down costs one failed connect (bounded by the timeout) and then nothing.
//!
//! `https://` URLs are reached over TLS (rustls), checked against the CA the operator gives
//! (else the system's roots), presenting a client certificate when one is given, as etcd's
//! `--client-cert-auth` asks.
//!
//! With etcd's authentication on, the client logs in with a user and password
//! (`/v3/auth/authenticate`) and sends the token it gets with every call; a token etcd no
//! longer accepts (they expire, 5 minutes by default) is replaced by logging in again once.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// The largest answer read from etcd: cluster mode reads single keys and small prefixes.
const MAX_RESPONSE: usize = 4 << 20;

/// Why a call to etcd failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EtcdError {
    /// No endpoint answered.
    #[error("no etcd endpoint answered ({0})")]
    Unreachable(String),
    /// An endpoint answered with an error.
    #[error("etcd answered {status}: {message}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// etcd's message.
        message: String,
    },
    /// The answer was not what the gateway sends.
    #[error("etcd's answer made no sense: {0}")]
    Malformed(String),
}

/// A key and its value as etcd holds them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    /// The key.
    pub key: String,
    /// The value.
    pub value: Vec<u8>,
    /// The lease the key is attached to (0: none).
    pub lease: i64,
}

/// A condition of a transaction.
#[derive(Debug, Clone)]
pub enum Compare {
    /// The key does not exist.
    Absent(String),
    /// The key holds exactly this value.
    ValueIs(String, Vec<u8>),
}

/// An operation of a transaction.
#[derive(Debug, Clone)]
pub enum Op {
    /// Sets a key, attached to a lease if one is given.
    Put {
        /// The key.
        key: String,
        /// Its value.
        value: Vec<u8>,
        /// The lease, if any.
        lease: Option<i64>,
    },
    /// Deletes a key.
    Delete(String),
}

/// A user and password of etcd's authentication.
#[derive(Clone, PartialEq, Eq)]
pub struct EtcdAuth {
    /// The etcd user.
    pub user: String,
    /// Its password.
    pub password: String,
}

impl std::fmt::Debug for EtcdAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The password stays out of logs.
        f.debug_struct("EtcdAuth")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// What TLS to etcd checks and presents (files in PEM).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EtcdTls {
    /// The CA that signed etcd's certificates; `None`: the system's roots.
    pub ca: Option<PathBuf>,
    /// A client certificate chain and its key, for etcd's `--client-cert-auth`.
    pub client: Option<(PathBuf, PathBuf)>,
}

impl EtcdTls {
    /// The rustls configuration these files make, or what is wrong with them.
    fn client_config(&self) -> Result<rustls::ClientConfig, String> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = |path: &PathBuf| -> Result<Vec<CertificateDer<'static>>, String> {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("{}: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!("{}: no certificate in it", path.display()));
            }
            Ok(certs)
        };
        let mut roots = rustls::RootCertStore::empty();
        match &self.ca {
            Some(ca) => {
                for cert in certs(ca)? {
                    roots
                        .add(cert)
                        .map_err(|e| format!("{}: {e}", ca.display()))?;
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(found.certs);
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots);
        match &self.client {
            Some((cert, key)) => {
                let key = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| format!("{}: {e}", key.display()))?;
                builder
                    .with_client_auth_cert(certs(cert)?, key)
                    .map_err(|e| format!("the client certificate and key: {e}"))
            }
            None => Ok(builder.with_no_client_auth()),
        }
    }
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd")
            .field("endpoints", &self.endpoints())
            .field("timeout", &self.timeout)
            .field("auth", &self.auth)
            .finish_non_exhaustive()
    }
}

/// One member's client URL: `HOST:PORT`, over TLS or not.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Endpoint {
    addr: String,
    tls: bool,
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        write!(f, "{scheme}://{}", self.addr)
    }
}

/// A client of one etcd cluster.
pub struct Etcd {
    endpoints: Vec<Endpoint>,
    /// For the `https://` endpoints.
    tls: Option<tokio_rustls::TlsConnector>,
    timeout: Duration,
    next: AtomicUsize,
    auth: Option<EtcdAuth>,
    /// The token of the last login, with `auth`.
    token: std::sync::Mutex<Option<String>>,
}

impl Etcd {
    /// A client of the members at `urls` (`http://HOST:PORT`), each call bounded by
    /// `timeout`. Fails on a URL it cannot use, naming it.
    pub fn new(urls: &[String], timeout: Duration) -> Result<Etcd, String> {
        if urls.is_empty() {
            return Err("no etcd endpoint given".into());
        }
        let endpoints = urls
            .iter()
            .map(|u| endpoint(u))
            .collect::<Result<Vec<_>, _>>()?;
        // The system's roots serve an https:// URL until `with_tls` says otherwise.
        let tls = match endpoints.iter().any(|e| e.tls) {
            true => Some(connector(&EtcdTls::default())?),
            false => None,
        };
        Ok(Etcd {
            endpoints,
            tls,
            timeout,
            next: AtomicUsize::new(0),
            auth: None,
            token: std::sync::Mutex::new(None),
        })
    }

    /// The same client, reaching `https://` endpoints with `tls` (`None`: the system's
    /// roots, no client certificate); what is wrong with its files if they cannot be used.
    pub fn with_tls(mut self, tls: Option<&EtcdTls>) -> Result<Etcd, String> {
        if let Some(tls) = tls {
            self.tls = Some(connector(tls)?);
        }
        Ok(self)
    }

    /// The same client, logging in as `auth` (etcd with authentication on).
    pub fn with_auth(mut self, auth: Option<EtcdAuth>) -> Etcd {
        self.auth = auth;
        self
    }

    fn cached_token(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.token.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A token to call with: the cached one, or a new login's (`None` without auth).
    async fn token(&self) -> Result<Option<String>, EtcdError> {
        let Some(auth) = &self.auth else {
            return Ok(None);
        };
        if let Some(token) = self.cached_token().clone() {
            return Ok(Some(token));
        }
        let body = json!({ "name": auth.user, "password": auth.password });
        let answer = self
            .call_as("/v3/auth/authenticate", &body.to_string(), None)
            .await
            .map_err(|e| match e {
                EtcdError::Refused { status, message } => EtcdError::Refused {
                    status,
                    message: format!("logging in as '{}': {message}", auth.user),
                },
                other => other,
            })?;
        let token = answer["token"]
            .as_str()
            // It goes into a header line as it is.
            .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_graphic()))
            .ok_or_else(|| EtcdError::Malformed(format!("login without a usable token: {answer}")))?
            .to_owned();
        *self.cached_token() = Some(token.clone());
        Ok(Some(token))
    }

    /// POSTs `body` to the gateway's `path` (any call this client has no method for), with
    /// a token if logging in is configured, logging in again once if etcd refuses the token.
    pub async fn call(&self, path: &str, body: Value) -> Result<Value, EtcdError> {
        let body = body.to_string();
        let token = self.token().await?;
        match self.call_as(path, &body, token.as_deref()).await {
            Err(EtcdError::Refused { status, message })
                if token.is_some() && (status == 401 || message.contains("auth token")) =>
            {
                tracing::debug!(%message, "etcd refused the token; logging in again");
                *self.cached_token() = None;
                let token = self.token().await?;
                self.call_as(path, &body, token.as_deref()).await
            }
            other => other,
        }
    }

    /// The endpoints' URLs.
    pub fn endpoints(&self) -> Vec<String> {
        self.endpoints.iter().map(Endpoint::to_string).collect()
    }

    /// POSTs `body` to `path` on the first endpoint that answers, with `token`.
    async fn call_as(
        &self,
        path: &str,
        body: &str,
        token: Option<&str>,
    ) -> Result<Value, EtcdError> {
        let start = self.next.load(Ordering::Relaxed);
        let mut failures = Vec::new();
        for i in 0..self.endpoints.len() {
            let at = (start + i) % self.endpoints.len();
            let endpoint = &self.endpoints[at];
            let posted = post(endpoint, self.tls.as_ref(), path, body.as_bytes(), token);
            match tokio::time::timeout(self.timeout, posted).await {
                Ok(Ok((200, answer))) => {
                    self.next.store(at, Ordering::Relaxed);
                    return serde_json::from_slice(&answer)
                        .map_err(|e| EtcdError::Malformed(format!("{path}: {e}")));
                }
                Ok(Ok((status, answer))) => {
                    let text = String::from_utf8_lossy(&answer);
                    let message = serde_json::from_str::<Value>(&text)
                        .ok()
                        .and_then(|v| v["error"].as_str().map(str::to_owned))
                        .unwrap_or_else(|| text.chars().take(200).collect());
                    // An unavailable member (no leader, shutting down) may be answered by
                    // another; anything else is the request's fault.
                    if status == 503 {
                        failures.push(format!("{endpoint}: {status} {message}"));
                        continue;
                    }
                    return Err(EtcdError::Refused { status, message });
                }
                Ok(Err(e)) => failures.push(format!("{endpoint}: {e}")),
                Err(_) => failures.push(format!("{endpoint}: no answer within {:?}", self.timeout)),
            }
        }
        Err(EtcdError::Unreachable(failures.join("; ")))
    }

    /// The key `key`, if it exists.
    pub async fn get(&self, key: &str) -> Result<Option<Kv>, EtcdError> {
        let answer = self
            .call("/v3/kv/range", json!({ "key": b64(key) }))
            .await?;
        Ok(kvs(&answer)?.into_iter().next())
    }

    /// Every key that starts with `prefix`.
    pub async fn get_prefix(&self, prefix: &str) -> Result<Vec<Kv>, EtcdError> {
        let answer = self
            .call(
                "/v3/kv/range",
                json!({ "key": b64(prefix), "range_end": b64_bytes(&prefix_end(prefix)) }),
            )
            .await?;
        kvs(&answer)
    }

    /// Sets `key` to `value`, attached to `lease` if given.
    pub async fn put(&self, key: &str, value: &[u8], lease: Option<i64>) -> Result<(), EtcdError> {
        self.call("/v3/kv/put", put_body(key, value, lease)).await?;
        Ok(())
    }

    /// Deletes `key`.
    pub async fn delete(&self, key: &str) -> Result<(), EtcdError> {
        self.call("/v3/kv/deleterange", json!({ "key": b64(key) }))
            .await?;
        Ok(())
    }

    /// Runs `success` if every one of `compare` holds, atomically; whether they held.
    pub async fn txn(&self, compare: &[Compare], success: &[Op]) -> Result<bool, EtcdError> {
        let answer = self.call("/v3/kv/txn", txn_body(compare, success)).await?;
        // The gateway leaves a false `succeeded` out.
        Ok(answer["succeeded"].as_bool().unwrap_or(false))
    }

    /// A new lease of `ttl` seconds; its ID.
    pub async fn grant(&self, ttl: u64) -> Result<i64, EtcdError> {
        let answer = self.call("/v3/lease/grant", json!({ "TTL": ttl })).await?;
        int(&answer["ID"]).ok_or_else(|| EtcdError::Malformed(format!("lease grant: {answer}")))
    }

    /// Renews lease `id`; the seconds it has left, 0 if it is gone (expired or revoked).
    pub async fn keep_alive(&self, id: i64) -> Result<i64, EtcdError> {
        let answer = self
            .call("/v3/lease/keepalive", json!({ "ID": id.to_string() }))
            .await?;
        Ok(int(&answer["result"]["TTL"]).unwrap_or(0))
    }

    /// Ends lease `id` and deletes its keys.
    pub async fn revoke(&self, id: i64) -> Result<(), EtcdError> {
        self.call("/v3/lease/revoke", json!({ "ID": id.to_string() }))
            .await?;
        Ok(())
    }
}

/// The endpoint of an `http://HOST:PORT` or `https://HOST:PORT` URL.
fn endpoint(url: &str) -> Result<Endpoint, String> {
    let rest = url.trim().trim_end_matches('/');
    let (hostport, tls) = match rest.strip_prefix("https://") {
        Some(hostport) => (hostport, true),
        None => (rest.strip_prefix("http://").unwrap_or(rest), false),
    };
    p2ptun::config::parse_server(hostport)
        .map(|()| Endpoint {
            addr: hostport.to_owned(),
            tls,
        })
        .map_err(|why| {
            format!(
                "'{url}' is not an etcd client URL ({why}); expected http://HOST:PORT or \
                 https://HOST:PORT, such as http://127.0.0.1:2379"
            )
        })
}

fn connector(tls: &EtcdTls) -> Result<tokio_rustls::TlsConnector, String> {
    Ok(tokio_rustls::TlsConnector::from(Arc::new(
        tls.client_config()?,
    )))
}

fn b64(s: &str) -> String {
    b64_bytes(s.as_bytes())
}

fn b64_bytes(b: &[u8]) -> String {
    B64.encode(b)
}

/// The end of the range of keys that start with `prefix` (etcd's convention: the prefix with
/// its last byte plus one).
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte 0xff (or empty): to the end of the keyspace.
    vec![0]
}

/// A 64-bit integer as the gateway writes it: a string, or a number.
fn int(v: &Value) -> Option<i64> {
    match v {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

fn put_body(key: &str, value: &[u8], lease: Option<i64>) -> Value {
    let mut body = json!({ "key": b64(key), "value": b64_bytes(value) });
    if let Some(lease) = lease {
        body["lease"] = Value::String(lease.to_string());
    }
    body
}

fn txn_body(compare: &[Compare], success: &[Op]) -> Value {
    let compare: Vec<Value> = compare
        .iter()
        .map(|c| match c {
            Compare::Absent(key) => json!({
                "key": b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"
            }),
            Compare::ValueIs(key, value) => json!({
                "key": b64(key), "target": "VALUE", "result": "EQUAL", "value": b64_bytes(value)
            }),
        })
        .collect();
    let success: Vec<Value> = success
        .iter()
        .map(|op| match op {
            Op::Put { key, value, lease } => json!({ "request_put": put_body(key, value, *lease) }),
            Op::Delete(key) => json!({ "request_delete_range": { "key": b64(key) } }),
        })
        .collect();
    json!({ "compare": compare, "success": success })
}

/// The keys of a range answer.
fn kvs(answer: &Value) -> Result<Vec<Kv>, EtcdError> {
    let Some(list) = answer.get("kvs") else {
        return Ok(Vec::new());
    };
    let bad = || EtcdError::Malformed(format!("a range answer: {answer}"));
    list.as_array()
        .ok_or_else(bad)?
        .iter()
        .map(|kv| {
            let decode = |field: &str| -> Result<Vec<u8>, EtcdError> {
                match kv[field].as_str() {
                    Some(s) => B64.decode(s).map_err(|_| bad()),
                    // An empty value is left out.
                    None => Ok(Vec::new()),
                }
            };
            Ok(Kv {
                key: String::from_utf8(decode("key")?).map_err(|_| bad())?,
                value: decode("value")?,
                lease: int(&kv["lease"]).unwrap_or(0),
            })
        })
        .collect()
}

/// One `POST path` to `endpoint` over HTTP/1.1 with `Connection: close` (and etcd's auth
/// `token`, if any); the status and the body.
async fn post(
    endpoint: &Endpoint,
    tls: Option<&tokio_rustls::TlsConnector>,
    path: &str,
    body: &[u8],
    token: Option<&str>,
) -> Result<(u16, Vec<u8>), String> {
    let tcp = TcpStream::connect(&endpoint.addr)
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    if !endpoint.tls {
        return exchange(tcp, &endpoint.addr, path, body, token).await;
    }
    let Some(tls) = tls else {
        return Err("no TLS configuration for an https:// endpoint".into());
    };
    let host = endpoint
        .addr
        .rsplit_once(':')
        .map_or(endpoint.addr.as_str(), |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    let name = rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| format!("'{host}' cannot be checked against a certificate: {e}"))?;
    let stream = tls
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS handshake failed: {e}"))?;
    exchange(stream, &endpoint.addr, path, body, token).await
}

/// The request and its answer on a connection made.
async fn exchange(
    mut stream: impl AsyncRead + AsyncWrite + Unpin,
    endpoint: &str,
    path: &str,
    body: &[u8],
    token: Option<&str>,
) -> Result<(u16, Vec<u8>), String> {
    let auth = token
        .map(|t| format!("Authorization: {t}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {endpoint}\r\nContent-Type: application/json\r\n\
         {auth}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream
        .write_all(head.as_bytes())
        .await
        .map_err(|e| format!("cannot send: {e}"))?;
    stream
        .write_all(body)
        .await
        .map_err(|e| format!("cannot send: {e}"))?;
    let mut raw = Vec::new();
    stream
        .take(MAX_RESPONSE as u64 + 1)
        .read_to_end(&mut raw)
        .await
        .map_err(|e| format!("cannot read the answer: {e}"))?;
    if raw.len() > MAX_RESPONSE {
        return Err(format!("an answer over {MAX_RESPONSE} bytes"));
    }
    parse_response(&raw)
}

/// The status and body of an HTTP/1.1 response read to its end (`Content-Length`, chunked,
/// or to the close).
fn parse_response(raw: &[u8]) -> Result<(u16, Vec<u8>), String> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("an answer without a complete header")?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| "a header that is not text")?;
    let body = &raw[split + 4..];
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or("an answer without a status")?;
    let mut chunked = false;
    let mut length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") && value.eq_ignore_ascii_case("chunked") {
            chunked = true;
        } else if name.eq_ignore_ascii_case("content-length") {
            length = value.parse::<usize>().ok();
        }
    }
    let body = if chunked {
        dechunk(body)?
    } else if let Some(n) = length {
        body.get(..n)
            .ok_or("an answer shorter than its length")?
            .to_vec()
    } else {
        body.to_vec()
    };
    Ok((status, body))
}

fn dechunk(mut body: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let line_end = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("a chunk without its size line")?;
        let size = std::str::from_utf8(&body[..line_end])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next()?.trim(), 16).ok())
            .ok_or("a chunk size that is no number")?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(body.get(..size).ok_or("a chunk cut short")?);
        body = body.get(size + 2..).ok_or("a chunk cut short")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_become_endpoints_or_say_what_is_wrong() {
        let url = |u: &str| endpoint(u).map(|e| e.to_string());
        assert_eq!(
            url("http://127.0.0.1:2379").unwrap(),
            "http://127.0.0.1:2379"
        );
        assert_eq!(url("http://etcd-1:2379/").unwrap(), "http://etcd-1:2379");
        assert_eq!(url("10.0.0.5:2379").unwrap(), "http://10.0.0.5:2379");
        assert_eq!(url("https://etcd:2379").unwrap(), "https://etcd:2379");
        for bad in ["http://etcd", "etcd:0", "http://:2379", "", "https://etcd"] {
            assert!(
                endpoint(bad).unwrap_err().contains("http://HOST:PORT"),
                "{bad}"
            );
        }
        assert!(Etcd::new(&[], Duration::from_secs(1)).is_err());
    }

    #[test]
    fn answers_are_read_whole_in_every_framing() {
        let plain = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}trailing";
        assert_eq!(parse_response(plain).unwrap(), (200, b"{}".to_vec()));
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n4;x=y\r\n\":1}\r\n0\r\n\r\n";
        assert_eq!(
            parse_response(chunked).unwrap(),
            (200, b"{\"a\":1}".to_vec())
        );
        let closed = b"HTTP/1.1 503 Service Unavailable\r\n\r\nno leader";
        assert_eq!(
            parse_response(closed).unwrap(),
            (503, b"no leader".to_vec())
        );
        for bad in [
            &b"HTTP/1.1 200 OK\r\n"[..],
            b"nonsense\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{}",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n9\r\nab",
        ] {
            assert!(
                parse_response(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn requests_are_the_gateways_json() {
        let body = txn_body(
            &[
                Compare::Absent("/n/a".into()),
                Compare::ValueIs("/n/b".into(), b"me".to_vec()),
            ],
            &[
                Op::Put {
                    key: "/n/a".into(),
                    value: b"me".to_vec(),
                    lease: Some(7),
                },
                Op::Delete("/n/c".into()),
            ],
        );
        assert_eq!(
            body,
            json!({
                "compare": [
                    {"key": "L24vYQ==", "target": "CREATE", "result": "EQUAL", "create_revision": "0"},
                    {"key": "L24vYg==", "target": "VALUE", "result": "EQUAL", "value": "bWU="},
                ],
                "success": [
                    {"request_put": {"key": "L24vYQ==", "value": "bWU=", "lease": "7"}},
                    {"request_delete_range": {"key": "L24vYw=="}},
                ],
            })
        );
        assert_eq!(prefix_end("/p/"), b"/p0".to_vec());
        assert_eq!(prefix_end("a\u{7f}"), b"a\x80".to_vec());
    }

    #[test]
    fn range_answers_parse_with_strings_for_integers() {
        let answer = json!({
            "header": {"revision": "9"},
            "kvs": [
                {"key": "L24vYQ==", "create_revision": "5", "value": "bWU=", "lease": "694d77aa"},
                {"key": "L24vYg==", "create_revision": "6", "lease": "12"},
            ],
            "count": "2",
        });
        let got = kvs(&answer).unwrap();
        assert_eq!(got[0].key, "/n/a");
        assert_eq!(got[0].value, b"me");
        // Not a decimal integer: no lease rather than a wrong one.
        assert_eq!(got[0].lease, 0);
        assert_eq!((got[1].value.len(), got[1].lease), (0, 12));
        assert!(kvs(&json!({"header": {}})).unwrap().is_empty());
        assert!(kvs(&json!({"kvs": [{"key": "%%%"}]})).is_err());
    }
}
