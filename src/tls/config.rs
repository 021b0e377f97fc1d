//! What each TLS side is configured with: the client configuration of each `https://` upstream
//! (with the certificate it presents, for upstreams that ask for one) and the server
//! configuration of the client doors (`server.tls_cert_file`, more certificates chosen by the
//! name a client asks for, and `server.tls_client_ca_file` to require client certificates),
//! renewed by a reload.
//!
//! Invariants:
//! - With `server.tls_client_ca_file`, no client completes a handshake on a door without a
//!   certificate that authority issued.
//! - Upstream certificates are always verified, against the bundled Mozilla roots
//!   (`webpki-roots`) or the upstream's `tls_ca_file`, for the URL's host or its
//!   `tls_server_name`. Nothing turns that off.
//! - Only HTTP/1.1 is offered and accepted (ALPN `http/1.1`): nothing else is spoken.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Acquire, Ordering::Release};
use std::sync::{Arc, Mutex};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use super::provider;

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
