//! Unit tests of the TLS stream over loopback sockets.

use super::*;
use crate::tls::{provider, server_name};
use monoio::io::AsyncReadRentExt;
use rustls::pki_types::PrivateKeyDer;
use rustls::{ClientConfig, RootCertStore};
use std::time::Duration;

fn runtime() -> monoio::Runtime<monoio::time::TimeDriver<monoio::LegacyDriver>> {
    monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
        .enable_timer()
        .build()
        .unwrap()
}

/// A server and a client configuration that trust each other, for `localhost`.
fn configs() -> (Arc<ServerConfig>, Tls) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let der = cert.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
    let server = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], key)
        .unwrap();
    let mut roots = RootCertStore::empty();
    roots.add(der).unwrap();
    let client = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tls = Tls {
        config: Arc::new(client),
        name: server_name("localhost").unwrap(),
    };
    (Arc::new(server), tls)
}

/// Both ends of a fresh session over loopback: (client, server).
async fn pair() -> (TlsStream, TlsStream) {
    let (server, client) = configs();
    let listener = monoio::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let accepting = monoio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        TlsStream::accept(tcp, &server).await.unwrap()
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let c = TlsStream::connect(tcp, &client).await.unwrap();
    (c, accepting.await)
}

fn holds_no_buffer(s: &TlsStream) -> bool {
    s.incoming.capacity() == 0 && s.out.capacity() == 0 && s.plain.capacity() == 0
}

/// Bytes `0, 1, ...` (mod 251): a payload whose every byte says where it belongs.
fn payload(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

#[test]
fn short_reads_and_long_writes_lose_nothing_and_an_idle_stream_holds_no_buffer() {
    runtime().block_on(async {
        let (mut client, mut server) = pair().await;
        // More than one write encrypts (four records' worth), read 7 bytes at a time: the
        // rest of each record waits aside and is read next, in order.
        let sent = payload(200_000);
        let writing = monoio::spawn(async move {
            let (r, _) = client.write_all(payload(200_000)).await;
            r.unwrap();
            client
        });
        let mut got = Vec::new();
        while got.len() < sent.len() {
            // A byte lost would leave the reader waiting: bounded, so that it fails.
            let read = server.read(Vec::with_capacity(7));
            let (r, buf) = monoio::time::timeout(Duration::from_secs(10), read)
                .await
                .unwrap_or_else(|_| panic!("stuck after {} of {} bytes", got.len(), sent.len()));
            let n = r.unwrap();
            assert!(n > 0 && n <= 7, "read {n}");
            got.extend_from_slice(&buf);
            if got.len() < sent.len() && n == 7 && server.plain.len() > server.plain_at {
                assert!(
                    server.buffered(),
                    "decrypted bytes wait: a read returns at once"
                );
            }
        }
        assert!(got == sent, "the bytes arrive whole and in order");
        let mut client = writing.await;
        assert!(!server.buffered(), "nothing waits once everything is read");
        assert!(
            holds_no_buffer(&server),
            "an idle server stream holds no buffer"
        );
        assert!(
            holds_no_buffer(&client),
            "an idle client stream holds no buffer"
        );

        // The other way, answered in one read.
        let (r, _) = server.write_all(b"pong".to_vec()).await;
        r.unwrap();
        let (r, buf) = client.read_exact(vec![0; 4]).await;
        r.unwrap();
        assert_eq!(buf, b"pong");
        assert!(holds_no_buffer(&client) && holds_no_buffer(&server));

        // The client's close_notify: the server's reader sees the end, as does its peek.
        client.shutdown().await.unwrap();
        let (r, _) = server.read(vec![0; 16]).await;
        assert_eq!(r.unwrap(), 0);
        assert!(server.buffered(), "the session's end is ready to read");
        assert!(matches!(server.pull(), Peek::Closed));
    });
}

/// A client that sends its request and closes its half (close_notify) still gets the
/// answer, and then the server's own close.
#[test]
fn a_peer_that_closed_its_half_still_gets_the_answer() {
    runtime().block_on(async {
        let (mut client, mut server) = pair().await;
        let (r, _) = client.write_all(b"request".to_vec()).await;
        r.unwrap();
        client.shutdown().await.unwrap();
        let (r, buf) = server.read_exact(vec![0; 7]).await;
        r.unwrap();
        assert_eq!(buf, b"request");
        let (r, _) = server.read(vec![0; 16]).await;
        assert_eq!(
            r.unwrap(),
            0,
            "the client's close_notify ends what it sends"
        );
        let (r, _) = server.write_all(b"answer".to_vec()).await;
        r.expect("writing after the peer closed its half");
        server.shutdown().await.unwrap();
        let (r, buf) = client.read_exact(vec![0; 6]).await;
        r.unwrap();
        assert_eq!(buf, b"answer");
        let (r, _) = client.read(vec![0; 16]).await;
        assert_eq!(r.unwrap(), 0);
    });
}

/// Bad records after the handshake (a forged one, an unknown content type, a length past
/// the limit, one cut short by the close): each fails the reader with an error, every later
/// read too, without a panic (rustls' debug assertions are on in tests), and the peer
/// learns why from the alert.
#[test]
fn a_bad_record_fails_the_session_and_the_peer_is_told() {
    runtime().block_on(async {
        let forged = [&[23u8, 3, 3, 0, 40][..], &[0x5a; 40]].concat();
        let unknown_type = vec![99u8, 3, 3, 0, 4, 1, 2, 3, 4];
        let too_long = vec![23u8, 3, 3, 0xff, 0xff, 0];
        for (what, bad) in [
            ("forged", forged),
            ("type", unknown_type),
            ("long", too_long),
        ] {
            let (mut client, mut server) = pair().await;
            let (r, _) = client.tcp.write_all(bad).await;
            r.unwrap();
            let (r, _) = server.read(vec![0; 64]).await;
            let e = r.expect_err(what);
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{what}: {e}");
            assert!(
                server.buffered(),
                "{what}: a failed session is ready (to fail)"
            );
            let (again, _) = server.read(vec![0; 64]).await;
            assert!(again.is_err(), "{what}: a failed session stays failed");
            assert!(matches!(server.pull(), Peek::Closed), "{what}");
            // The alert arrives (encrypted, as TLS 1.3 sends alerts), and the client's
            // reader reports it as the session's failure.
            let (r, _) = client.read(vec![0; 64]).await;
            let e = r.expect_err(what);
            assert!(e.to_string().contains("alert"), "{what}: {e}");
        }
        // A good record and a forged one sent together: the good one is read, the next
        // read fails, and the peer is told.
        let (mut client, mut server) = pair().await;
        let good = b"good";
        assert!(matches!(
            client.advance(Want::Write(good.as_ptr(), good.len())),
            Ok(Got::Done(4))
        ));
        // In one write of the socket behind it, so that they arrive in one read.
        client.out.extend_from_slice(&[23, 3, 3, 0, 40]);
        client.out.extend_from_slice(&[0x5a; 40]);
        client.send_out().await.unwrap();
        let (r, buf) = server.read_exact(vec![0; 4]).await;
        r.unwrap();
        assert_eq!(buf, b"good");
        let (r, _) = server.read(vec![0; 64]).await;
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::InvalidData);
        let (r, _) = client.read(vec![0; 64]).await;
        assert!(r.unwrap_err().to_string().contains("alert"));
        // A record cut short by the peer's close: the end of the stream, no error.
        let (mut client, mut server) = pair().await;
        let (r, _) = client.tcp.write_all(vec![23u8, 3, 3, 0, 40, 1, 2]).await;
        r.unwrap();
        client.tcp.shutdown().await.unwrap();
        let (r, _) = server.read(vec![0; 64]).await;
        assert_eq!(r.unwrap(), 0);
    });
}

#[test]
fn bytes_that_are_not_tls_fail_the_handshake_with_an_error() {
    runtime().block_on(async {
        let (server, _) = configs();
        let listener = monoio::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut plain = std::net::TcpStream::connect(addr).unwrap();
        use std::io::{Read, Write};
        plain
            .write_all(b"POST /mcp HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        let e = match TlsStream::accept(tcp, &server).await {
            Err(e) => e,
            Ok(_) => panic!("a handshake from plain HTTP"),
        };
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        // The peer is told why (a TLS alert record: content type 21), then closed.
        let mut answer = Vec::new();
        plain.read_to_end(&mut answer).unwrap();
        assert_eq!(answer.first(), Some(&21), "{answer:?}");
    });
}
