//! TLS (rustls, with the `ring` provider), for the client doors and `https://` upstreams alike.
//!
//! - [`config`]: what each side is configured with: an upstream's client configuration (with the
//!   certificate it presents, for upstreams that ask for one), the doors' server configuration
//!   (`server.tls_cert_file`, certificates chosen by name, and `server.tls_client_ca_file` to
//!   require client certificates), renewed on SIGHUP.
//! - [`stream`]: the stream that runs rustls over a monoio `TcpStream` on either side.
//!
//! Both sides share one cryptography provider (`provider`: ring's, the SHA-256 suites first).

use std::sync::Arc;

pub mod config;
pub mod stream;

pub use config::{
    client_config, client_identity, door_config, read_roots, server_name, DoorConfig, DoorTls, Tls,
};
pub use stream::TlsStream;

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
