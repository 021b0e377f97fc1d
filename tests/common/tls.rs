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
        let (cert, key) = self.leaf(names);
        let chain = vec![cert.der().clone(), self.cert.der().clone()];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        Arc::new(config)
    }

    fn leaf(&self, names: &[&str]) -> (rcgen::Certificate, KeyPair) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &self.issuer)
            .unwrap();
        (cert, key)
    }
}
