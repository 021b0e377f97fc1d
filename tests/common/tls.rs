//! Certificates for TLS tests: a throwaway certificate authority and server configurations with
//! certificates it signed, so tests can give the gateway a `tls_ca_file` to trust.

use std::path::PathBuf;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

/// A certificate authority, its certificate written as PEM to `ca_file`.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert: rcgen::Certificate,
    pub ca_file: PathBuf,
    _dir: tempfile::TempDir,
}

impl Ca {
    pub fn new() -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // Subjects of their own (rcgen gives every certificate the same one by default, which
        // makes OpenSSL take a leaf for self-signed).
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "mcp-gateway test CA");
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, cert.pem()).unwrap();
        Ca {
            issuer: Issuer::new(params, key),
            cert,
            ca_file,
            _dir: dir,
        }
    }

    /// A server certificate for `names` (DNS names or IP addresses) and its key, as PEM files
    /// in `dir` (for servers outside this process): (certificate chain, key).
    pub fn pem_files(&self, names: &[&str], dir: &std::path::Path) -> (PathBuf, PathBuf) {
        let (cert, key) = self.leaf(names);
        let (cert_file, key_file) = (dir.join("server.pem"), dir.join("server.key"));
        std::fs::write(&cert_file, cert.pem() + &self.cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        (cert_file, key_file)
    }

    /// A rustls server configuration presenting a certificate for `names`.
    pub fn server_config(&self, names: &[&str]) -> Arc<rustls::ServerConfig> {
        self.server_config_asking(names, None)
    }

    /// A rustls server configuration presenting a certificate for `names` that, with
    /// `clients`, requires a client certificate that authority issued (mutual TLS).
    pub fn server_config_asking(
        &self,
        names: &[&str],
        clients: Option<&Ca>,
    ) -> Arc<rustls::ServerConfig> {
        let (chain, key) = self.chain(names);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match clients {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                roots.add(ca.cert.der().clone()).unwrap();
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .unwrap();
                builder.with_client_cert_verifier(verifier)
            }
        };
        Arc::new(builder.with_single_cert(chain, key).unwrap())
    }

    /// A certificate this authority issued for `names`, with its chain, and its key.
    fn chain(
        &self,
        names: &[&str],
    ) -> (
        Vec<rustls::pki_types::CertificateDer<'static>>,
        PrivateKeyDer<'static>,
    ) {
        let (cert, key) = self.leaf(names);
        let chain = vec![cert.der().clone(), self.cert.der().clone()];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        (chain, key)
    }

    /// A client certificate for `name` and its key, as PEM files in `dir`: (chain, key).
    pub fn client_pem_files(&self, name: &str, dir: &std::path::Path) -> (PathBuf, PathBuf) {
        let (cert, key) = self.leaf(&[name]);
        let (cert_file, key_file) = (dir.join("client.pem"), dir.join("client.key"));
        std::fs::write(&cert_file, cert.pem() + &self.cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        (cert_file, key_file)
    }

    /// A client configuration trusting this CA only and presenting a certificate `issuer`
    /// issued for `client.example`.
    pub fn client_config_presenting(&self, issuer: &Ca) -> Arc<rustls::ClientConfig> {
        self.client_presenting(issuer).0
    }

    /// [`Ca::client_config_presenting`], and the certificate it presents.
    pub fn client_presenting(
        &self,
        issuer: &Ca,
    ) -> (
        Arc<rustls::ClientConfig>,
        rustls::pki_types::CertificateDer<'static>,
    ) {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.der().clone()).unwrap();
        let (chain, key) = issuer.chain(&["client.example"]);
        let leaf = chain[0].clone();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap();
        (Arc::new(config), leaf)
    }

    fn leaf(&self, names: &[&str]) -> (rcgen::Certificate, KeyPair) {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        // Good for either side: a server's and a client's.
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, names[0]);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert, key)
    }
}

/// A TLS client connection to a gateway's door.
pub type TlsClient = rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>;

impl Ca {
    /// A `server:` section fragment making the doors speak TLS with a certificate for
    /// 127.0.0.1, ::1 and localhost written into `dir`.
    pub fn door_keys(&self, dir: &std::path::Path) -> String {
        let (cert, key) = self.pem_files(&["127.0.0.1", "::1", "localhost"], dir);
        format!(
            "tls_cert_file: {}\ntls_key_file: {}\n",
            cert.display(),
            key.display()
        )
    }

    /// A client configuration trusting this CA only.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(config)
    }

    /// A TLS connection from `from` to `to` (the handshake runs on first use).
    pub fn connect(&self, from: &str, to: std::net::SocketAddr) -> TlsClient {
        connect_with(self.client_config(), "127.0.0.1", from, to)
    }
}

/// A TLS connection with `config` to server `name` (a host name is sent in SNI, an address is
/// not) from `from` to `to` (the handshake runs on first use).
pub fn connect_with(
    config: Arc<rustls::ClientConfig>,
    name: &str,
    from: &str,
    to: std::net::SocketAddr,
) -> TlsClient {
    let tcp = super::connect_from(from, to);
    let name = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
    let conn = rustls::ClientConnection::new(config, name).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}
