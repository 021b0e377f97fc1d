//! TLS (rustls, with the `ring` provider): the client configuration of each `https://` upstream
//! (with the certificate it presents, for upstreams that ask for one), the server configuration
//! of the client doors (`server.tls_cert_file`, and `server.tls_client_ca_file` to require client
//! certificates), and the stream that runs rustls over a monoio `TcpStream` on either side.
//!
//! Written here rather than taken from `monoio-rustls` because both sides need two things that
//! crate does not give: a readiness wait that knows about bytes rustls already decrypted, and no
//! read buffer held by an idle connection.
//!
//! Invariants:
//! - With `server.tls_client_ca_file`, no client completes a handshake on a door without a
//!   certificate that authority issued.
//! - Upstream certificates are always verified, against the bundled Mozilla roots
//!   (`webpki-roots`) or the upstream's `tls_ca_file`, for the URL's host or its
//!   `tls_server_name`. Nothing turns that off.
//! - Only HTTP/1.1 is offered and accepted (ALPN `http/1.1`): nothing else is spoken.
//! - [`TlsStream::buffered`] says when decrypted bytes (or the session's end) wait inside rustls,
//!   and every readiness wait asks it first (`Stream::readable`, the doors' idle wait): a wait on
//!   the socket alone could sleep on a request or event that already arrived.
//! - An idle stream holds no buffer of ours: ciphertext is read into a buffer of the core's pool
//!   and handed to rustls at once (rustls keeps its own: a 4 KiB receive buffer, and what it has
//!   decrypted and not yet delivered).
//! - rustls never holds more than one read of ciphertext's worth of undelivered plaintext: the
//!   socket is read only when the plaintext is all delivered, and one read (at most 16 KiB) cannot
//!   decrypt to more than rustls' 16 KiB receive limit.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{self, BufRead};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Acquire, Ordering::Release};
use std::sync::{Arc, Mutex};

use monoio::buf::{IoBuf, IoBufMut, IoVecBuf, IoVecBufMut};
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use monoio::BufResult;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig};

use crate::conn::{give_buf, peek, take_buf, Peek};

/// The cryptography of both sides: ring's, with the SHA-256 suites first. A SHA-384 suite's key
/// schedule runs SHA-512, which ring computes without the CPU's help on x86
/// (`sha512_block_data_order_nohw`: 15% of the gateway's CPU in a TLS 1.3 handshake under
/// `perf`), while SHA-256 uses the SHA extensions. AES-128-GCM is the suite TLS 1.3 requires of
/// everyone; the others stay available.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::cipher_suite::*;
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        TLS13_AES_128_GCM_SHA256,
        TLS13_CHACHA20_POLY1305_SHA256,
        TLS13_AES_256_GCM_SHA384,
        TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
        TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    ];
    Arc::new(p)
}

/// The certificates in the PEM file `path` (at least one), for `tls_ca_file`.
pub fn read_roots(path: &Path) -> Result<RootCertStore, String> {
    use rustls::pki_types::pem::PemObject;
    let what = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| what(&e))? {
        let cert = cert.map_err(|e| what(&e))?;
        roots.add(cert).map_err(|e| what(&e))?;
    }
    if roots.is_empty() {
        return Err(what(&"no certificate in the file"));
    }
    Ok(roots)
}

/// `name` as a TLS server name: a DNS name or an IP address.
pub fn server_name(name: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(name.to_string())
        .map_err(|_| format!("{name:?} is not a DNS name or an IP address"))
}

/// The client configuration of one `https://` upstream: roots from `ca_file` or the bundled
/// Mozilla set, ALPN `http/1.1`, and, with `identity` (a certificate chain file and its key
/// file), that certificate presented to an upstream that asks for one (mutual TLS).
pub fn client_config(
    ca_file: Option<&Path>,
    identity: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, String> {
    let roots = match ca_file {
        Some(f) => read_roots(f)?,
        None => RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        },
    };
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert_file, key_file)) => {
            let (chain, key) = read_identity(cert_file, key_file)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("{} with {}: {e}", cert_file.display(), key_file.display()))?
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The certificate chain in the PEM file `cert_file` (its own certificate first) and the
/// private key in `key_file` (PKCS#8, PKCS#1 or SEC1). The error names the file at fault.
fn read_identity(
    cert_file: &Path,
    key_file: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    use rustls::pki_types::pem::PemObject;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .and_then(|certs| certs.collect())
        .map_err(|e| format!("{}: {e}", cert_file.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "{}: no certificate in the file",
            cert_file.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| format!("{}: {e}", key_file.display()))?;
    Ok((chain, key))
}

/// One certificate of the doors, as read from its files: the chain, the key and the DNS names
/// it covers (`*.example.com` for a wildcard).
struct DoorCert {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    names: Vec<String>,
}

/// The doors' TLS setup, as the configuration gives it: the server configuration, and the
/// certificates its per-core copies choose from by the name a client asks for (SNI).
pub struct DoorConfig {
    config: Arc<ServerConfig>,
    /// `tls_cert_file`'s first, then `tls_certificates` in their order.
    certs: Arc<[DoorCert]>,
}

/// The doors' TLS setup of the `server` section `s` (`None`: the doors speak plain TCP):
/// `tls_cert_file` with `tls_key_file` (each PEM; the key PKCS#8, PKCS#1 or SEC1), the further
/// certificates of `tls_certificates` chosen by SNI, ALPN `http/1.1`, and, with
/// `tls_client_ca_file`, every client required to present a certificate one of that file's
/// authorities issued (mutual TLS). The error names the key or file at fault and why.
pub fn door_config(s: &crate::config::ServerConfig) -> Result<Option<DoorConfig>, String> {
    let (Some(cert_file), Some(key_file)) = (&s.tls_cert_file, &s.tls_key_file) else {
        return Ok(None);
    };
    let provider = provider();
    let load = |key: &str, cert_file: &Path, key_file: &Path| -> Result<DoorCert, String> {
        let (chain, private) =
            read_identity(cert_file, key_file).map_err(|e| format!("{key}: {e}"))?;
        CertifiedKey::from_der(chain.clone(), private.clone_key(), &provider).map_err(|e| {
            format!(
                "{key}: {} with {}: {e}",
                cert_file.display(),
                key_file.display()
            )
        })?;
        let names = webpki::EndEntityCert::try_from(&chain[0])
            .map(|c| c.valid_dns_names().map(str::to_ascii_lowercase).collect())
            .map_err(|e| format!("{key}: {}: {e:?}", cert_file.display()))?;
        Ok(DoorCert {
            chain,
            key: private,
            names,
        })
    };
    let mut certs = vec![load(
        "server.tls_cert_file, server.tls_key_file",
        cert_file,
        key_file,
    )?];
    for (i, c) in s.tls_certificates.iter().enumerate() {
        let key = format!("server.tls_certificates[{i}]");
        let cert = load(&key, &c.cert_file, &c.key_file)?;
        if cert.names.is_empty() {
            return Err(format!(
                "{key}: {}: the certificate names no DNS host, so no client would be given it",
                c.cert_file.display()
            ));
        }
        certs.push(cert);
    }
    let certs: Arc<[DoorCert]> = certs.into();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match &s.tls_client_ca_file {
        None => builder.with_no_client_auth(),
        Some(f) => {
            let what = |e: &dyn std::fmt::Display| format!("server.tls_client_ca_file: {e}");
            let roots = Arc::new(read_roots(f).map_err(|e| what(&e))?);
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider)
                    .build()
                    .map_err(|e| what(&format!("{}: {e}", f.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(Arc::new(ByName::new(&certs)?));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // The gateway's order of suites, not the client's (which often puts AES-256 first).
    config.ignore_client_order = true;
    Ok(Some(DoorConfig {
        config: Arc::new(config),
        certs,
    }))
}

/// Chooses the doors' certificate for a handshake by the name the client asked for: the one
/// covering it exactly, else one whose wildcard covers it, else `tls_cert_file`'s (also for a
/// client that names no host, or an address). Each core has its own (see [`DoorTls::refresh`]):
/// the keys are loaded per core, so a handshake clones no reference count another core clones.
#[derive(Debug)]
struct ByName {
    default: Arc<CertifiedKey>,
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example.com` certificates, by `example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
}

impl ByName {
    /// The resolver of `certs` (`tls_cert_file`'s first); of two certificates covering one
    /// name, the first listed wins.
    fn new(certs: &[DoorCert]) -> Result<ByName, String> {
        let provider = provider();
        let load = |c: &DoorCert| {
            CertifiedKey::from_der(c.chain.clone(), c.key.clone_key(), &provider)
                .map(Arc::new)
                .map_err(|e| e.to_string())
        };
        let (first, rest) = certs.split_first().ok_or("no certificate")?;
        let mut by = ByName {
            default: load(first)?,
            exact: HashMap::new(),
            wildcard: HashMap::new(),
        };
        for c in rest {
            let key = load(c)?;
            for name in &c.names {
                let table = match name.strip_prefix("*.") {
                    Some(parent) => by.wildcard.entry(parent.to_string()),
                    None => by.exact.entry(name.clone()),
                };
                table.or_insert_with(|| key.clone());
            }
        }
        Ok(by)
    }

    fn pick(&self, name: Option<&str>) -> &Arc<CertifiedKey> {
        let Some(name) = name else {
            return &self.default;
        };
        // rustls hands over the name as the client sent it; clients send lower case, so the
        // copy is made only for one that does not.
        let lower;
        let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = name.to_ascii_lowercase();
            lower.as_str()
        } else {
            name
        };
        self.exact
            .get(name)
            .or_else(|| self.wildcard.get(name.split_once('.')?.1))
            .unwrap_or(&self.default)
    }
}

impl rustls::server::ResolvesServerCert for ByName {
    fn resolve(&self, hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.pick(hello.server_name()).clone())
    }
}

/// The doors' TLS configuration, replaceable while the gateway runs (a renewed certificate is
/// loaded on SIGHUP): the process-wide current one and its generation. Each worker keeps a copy
/// of its own ([`DoorTls::refresh`]) and reads only the generation per handshake.
pub struct DoorTls {
    /// Bumped (Release) after `current` is replaced; a worker that reads a new value (Acquire)
    /// then finds the new configuration under the lock.
    generation: AtomicU64,
    /// Read only when the generation changed: never on a handshake of a settled worker.
    current: Mutex<DoorConfig>,
}

impl DoorTls {
    pub fn new(config: DoorConfig) -> DoorTls {
        DoorTls {
            generation: AtomicU64::new(0),
            current: Mutex::new(config),
        }
    }

    /// Replaces the configuration for handshakes from now on (open sessions keep theirs).
    pub fn replace(&self, config: DoorConfig) {
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = config;
        self.generation.fetch_add(1, Release);
    }

    /// This worker's configuration, `own` (its copy and the generation it was made from), made
    /// anew when the process's changed: a copy with a session cache and certificate keys of its
    /// own, so that a handshake touches no reference count or cache lock that other cores touch.
    pub fn refresh(&self, own: &RefCell<Option<(u64, Arc<ServerConfig>)>>) -> Arc<ServerConfig> {
        let now = self.generation.load(Acquire);
        if let Some((seen, config)) = &*own.borrow() {
            if *seen == now {
                return config.clone();
            }
        }
        let current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let mut copy = (*current.config).clone();
        copy.session_storage = rustls::server::ServerSessionMemoryCache::new(1024);
        // The keys were loaded once already, when the configuration was made; should loading
        // them again fail, the shared resolver serves.
        if let Ok(by_name) = ByName::new(&current.certs) {
            copy.cert_resolver = Arc::new(by_name);
        }
        drop(current);
        let copy = Arc::new(copy);
        *own.borrow_mut() = Some((now, copy.clone()));
        copy
    }
}

/// A client certificate as the `X-Forwarded-Client-Cert` field names it (Envoy's form):
/// `Hash=` its SHA-256 (hex, of the DER), then `;DNS=` each DNS name it holds.
pub fn client_identity(cert: &CertificateDer<'_>) -> String {
    use std::fmt::Write;
    let mut out = String::from("Hash=");
    for b in ring::digest::digest(&ring::digest::SHA256, cert).as_ref() {
        let _ = write!(out, "{b:02x}");
    }
    if let Ok(c) = webpki::EndEntityCert::try_from(cert) {
        for name in c.valid_dns_names() {
            let _ = write!(out, ";DNS={name}");
        }
    }
    out
}

/// What an upstream needs to open TLS connections: its configuration and the name it checks.
#[derive(Debug, Clone)]
pub struct Tls {
    pub config: Arc<ClientConfig>,
    pub name: ServerName<'static>,
}

/// A TLS connection over a monoio `TcpStream`: a client's to a door, or the gateway's to an
/// upstream.
pub struct TlsStream {
    tcp: TcpStream,
    tls: Connection,
    /// A door's client that presented a verified certificate (`server.tls_client_ca_file`): it,
    /// as `X-Forwarded-Client-Cert` says it to upstreams (see [`client_identity`]). Made once,
    /// at the end of the handshake.
    identity: Option<Box<str>>,
}

fn invalid(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl TlsStream {
    /// Runs the client side of the handshake over `tcp` (the caller bounds it in time). The
    /// error says why it failed (`invalid peer certificate: UnknownIssuer`, ...).
    pub async fn connect(tcp: TcpStream, tls: &Tls) -> io::Result<TlsStream> {
        let conn = ClientConnection::new(tls.config.clone(), tls.name.clone()).map_err(invalid)?;
        TlsStream::handshake(tcp, conn.into()).await
    }

    /// Runs the server side of the handshake over `tcp` (the caller bounds it in time).
    pub async fn accept(tcp: TcpStream, config: &Arc<ServerConfig>) -> io::Result<TlsStream> {
        let conn = rustls::ServerConnection::new(config.clone()).map_err(invalid)?;
        let mut s = TlsStream::handshake(tcp, conn.into()).await?;
        // Verified by the handshake, when the doors ask for certificates; else there is none.
        s.identity = s
            .tls
            .peer_certificates()
            .and_then(<[_]>::first)
            .map(|cert| client_identity(cert).into());
        Ok(s)
    }

    /// The verified certificate of a door's client, as `X-Forwarded-Client-Cert` gives it.
    pub fn identity(&self) -> Option<&str> {
        self.identity.as_deref()
    }

    async fn handshake(tcp: TcpStream, tls: Connection) -> io::Result<TlsStream> {
        let mut s = TlsStream {
            tcp,
            tls,
            identity: None,
        };
        let mut received = 0;
        while s.tls.is_handshaking() {
            s.send_tls().await?;
            if s.tls.is_handshaking() {
                match s.receive_tls().await? {
                    // A peer that sent nothing at all (a TCP health check): not a failure.
                    0 if received == 0 => {
                        return Err(io::Error::new(
                            io::ErrorKind::ConnectionAborted,
                            "the peer closed the connection before the TLS handshake",
                        ))
                    }
                    0 => {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the peer closed the connection during the TLS handshake",
                        ))
                    }
                    n => received += n,
                }
            }
        }
        s.send_tls().await?;
        Ok(s)
    }

    /// Sends everything rustls has queued (records, alerts, handshake messages).
    async fn send_tls(&mut self) -> io::Result<()> {
        while self.tls.wants_write() {
            let mut out = take_buf();
            if let Err(e) = self.tls.write_tls(&mut out) {
                give_buf(out);
                return Err(e);
            }
            let (r, out) = self.tcp.write_all(out).await;
            give_buf(out);
            r?;
        }
        Ok(())
    }

    /// Reads ciphertext from the socket into rustls and decrypts it. `Ok(0)`: the socket is at
    /// EOF (rustls is told, so its reader then reports the end).
    async fn receive_tls(&mut self) -> io::Result<usize> {
        let (r, buf) = self.tcp.read(take_buf()).await;
        let n = match r {
            Ok(n) => n,
            Err(e) => {
                give_buf(buf);
                return Err(e);
            }
        };
        let mut rest = &buf[..n];
        let fed = loop {
            match self.tls.read_tls(&mut rest) {
                Ok(0) if !rest.is_empty() => break Err(io::Error::other("TLS input not taken")),
                Ok(_) => {}
                Err(e) => break Err(e),
            }
            if let Err(e) = self.tls.process_new_packets() {
                break Err(invalid(e));
            }
            if rest.is_empty() {
                break Ok(n);
            }
        };
        give_buf(buf);
        // A fatal alert rustls queued for the peer: best effort, the connection is over.
        if fed.is_err() {
            let _ = self.send_tls().await;
        }
        fed
    }

    /// The socket under the TLS session.
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// Decrypted bytes (or the session's end) wait inside rustls: a read returns at once, so a
    /// wait for readiness must not wait on the socket. Asked of rustls each time rather than
    /// tracked: bytes can be decrypted by any read of the socket, the handshake's last one
    /// included (a client's Finished and its first request often arrive together).
    pub fn buffered(&self) -> bool {
        // Once the handshake is done, rustls wants more only when it holds no plaintext and
        // has not seen the peer's close_notify.
        !self.tls.is_handshaking() && !self.tls.wants_read()
    }

    /// What the peer has sent, without waiting: bytes waiting on the socket are read (without
    /// blocking) and handed to rustls first, so a post-handshake message (a TLS 1.3 session
    /// ticket, a key update) counts as nothing, decrypted bytes as `Data`, and the session's or
    /// the connection's end (close_notify, an alert, EOF, a bad record) as `Closed`.
    pub fn pull(&mut self) -> Peek {
        use std::os::fd::AsRawFd;
        loop {
            if self.buffered() {
                // Plaintext, or the peer's close_notify.
                return match self.tls.process_new_packets() {
                    Ok(s) if s.plaintext_bytes_to_read() > 0 => Peek::Data,
                    _ => Peek::Closed,
                };
            }
            match peek(&self.tcp) {
                Peek::Data => {}
                other => return other,
            }
            let mut buf = take_buf();
            // SAFETY: a non-blocking read into the spare capacity of a buffer we own; the
            // length is set to what the kernel wrote.
            let n = unsafe {
                libc::recv(
                    self.tcp.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.capacity(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n <= 0 {
                give_buf(buf);
                return Peek::Closed;
            }
            // SAFETY: the kernel initialised the first `n` bytes.
            unsafe { buf.set_len(n as usize) };
            let mut rest = &buf[..];
            let fed = loop {
                match self.tls.read_tls(&mut rest) {
                    Ok(0) if !rest.is_empty() => break false,
                    Ok(_) => {}
                    Err(_) => break false,
                }
                if self.tls.process_new_packets().is_err() {
                    break false;
                }
                if rest.is_empty() {
                    break true;
                }
            };
            give_buf(buf);
            if !fed {
                return Peek::Closed;
            }
        }
    }
}

impl AsyncReadRent for TlsStream {
    async fn read<T: IoBufMut>(&mut self, mut buf: T) -> BufResult<usize, T> {
        loop {
            let mut reader = self.tls.reader();
            match reader.fill_buf() {
                Ok(plain) => {
                    let n = plain.len().min(buf.bytes_total());
                    // SAFETY: `n` bytes fit the buffer's capacity; its pointer is valid for them
                    // and does not overlap rustls' own buffer.
                    unsafe {
                        std::ptr::copy_nonoverlapping(plain.as_ptr(), buf.write_ptr(), n);
                        buf.set_init(n);
                    }
                    reader.consume(n);
                    return (Ok(n), buf);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The peer closed TCP without close_notify: many servers do; an HTTP body has
                // its own framing to tell a cut-off response.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return (Ok(0), buf),
                Err(e) => return (Err(e), buf),
            }
            if let Err(e) = self.receive_tls().await {
                return (Err(e), buf);
            }
        }
    }

    async fn readv<T: IoVecBufMut>(&mut self, mut buf: T) -> BufResult<usize, T> {
        // SAFETY: the raw buffer views the first iovec of `buf`, which outlives this call.
        let n = match unsafe { monoio::buf::RawBuf::new_from_iovec_mut(&mut buf) } {
            Some(raw) => self.read(raw).await.0,
            None => Ok(0),
        };
        if let Ok(n) = n {
            // SAFETY: `n` bytes were written into the first iovec.
            unsafe { buf.set_init(n) };
        }
        (n, buf)
    }
}

impl AsyncWriteRent for TlsStream {
    async fn write<T: IoBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        use std::io::Write;
        // SAFETY: `buf` owns `bytes_init()` initialised bytes at `read_ptr()` for this call.
        let plain = unsafe { std::slice::from_raw_parts(buf.read_ptr(), buf.bytes_init()) };
        let n = match self.tls.writer().write(plain) {
            Ok(n) => n,
            Err(e) => return (Err(e), buf),
        };
        match self.send_tls().await {
            Ok(()) => (Ok(n), buf),
            Err(e) => (Err(e), buf),
        }
    }

    async fn writev<T: IoVecBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        // SAFETY: the raw buffer views the first iovec of `buf`, which outlives this call.
        let n = match unsafe { monoio::buf::RawBuf::new_from_iovec(&buf) } {
            Some(raw) => self.write(raw).await.0,
            None => Ok(0),
        };
        (n, buf)
    }

    async fn flush(&mut self) -> io::Result<()> {
        self.send_tls().await
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        self.tls.send_close_notify();
        self.send_tls().await?;
        self.tcp.shutdown().await
    }
}
