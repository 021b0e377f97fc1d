//! Randomized robustness checks of every parser that reads client bytes, and of those that read
//! what upstream MCP servers send: random inputs and mutations of valid ones must never panic,
//! and whatever is accepted must respect its caps. The properties themselves are in
//! `fuzz/checks.rs`, shared with the coverage-guided fuzz targets (`fuzz/`); their seed inputs
//! are the fuzz corpus's files (`fuzz/corpus/<target>/`). This is the deterministic half: a
//! fixed-seed generator, so a failure reproduces.

mod common;

#[allow(dead_code)] // the fuzz targets use the rest
#[path = "../fuzz/checks.rs"]
mod checks;

use checks::{Accepted, Response, Rng};

/// The seed inputs of fuzz target `target`, in name order.
fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|f| f.unwrap().path())
        .collect();
    files.sort();
    let seeds: Vec<_> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
    seeds
}

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        match rng.below(5) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = rng.next() as u8;
            }
            1 if !v.is_empty() => v.truncate(rng.below(v.len())),
            2 => {
                let i = rng.below(v.len() + 1);
                let bytes: Vec<u8> = (0..rng.below(16)).map(|_| rng.next() as u8).collect();
                v.splice(i..i, bytes);
            }
            3 => {
                let i = rng.below(v.len() + 1);
                let token: &[u8] = [
                    &b"\r\n"[..],
                    b"\r\n\r\n",
                    b":",
                    b",",
                    b"\"",
                    b"{",
                    b"]",
                    b"ffffffffffff",
                ][rng.below(8)];
                v.splice(i..i, token.iter().copied());
            }
            _ => v.extend((0..rng.below(32)).map(|_| rng.next() as u8)),
        }
    }
    v
}

#[test]
fn random_and_mutated_inputs_never_panic_and_respect_caps() {
    let seeds = seeds("client_bytes");
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut seen = Accepted::default();
    for seed in &seeds {
        checks::client_bytes(seed, &mut seen);
    }
    for _ in 0..60_000 {
        let seed = &seeds[rng.below(seeds.len())];
        checks::client_bytes(&mutate(&mut rng, seed), &mut seen);
    }
    for _ in 0..20_000 {
        let len = rng.below(64);
        let random: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        checks::client_bytes(&random, &mut seen);
    }
    let Accepted {
        heads,
        chunked,
        frames,
        mcpb,
        echo,
        proxy,
    } = seen;
    eprintln!("accepted: {seen:?}");
    assert!(
        heads > 1000 && chunked > 100 && frames > 1000 && mcpb > 100 && echo > 1000 && proxy > 100,
        "{seen:?}"
    );
}

/// The TLS stream after the handshake, over mutated records: a client (plain rustls, blocking,
/// in a thread) completes a handshake, makes one application-data record, changes it as
/// `mutate` does, sends it and closes its half. The gateway's stream must end in data, the end
/// (a record cut short) or an error, never a panic (debug assertions on) or a hang, and an
/// error must stay: the session is failed for good.
#[test]
fn mutated_tls_records_end_in_data_the_end_or_an_error() {
    use monoio::io::AsyncReadRent;
    use std::io::{Read, Write};
    use std::time::Duration;

    let ca = common::tls::Ca::new();
    let server = ca.server_config(&["localhost"]);
    let client = ca.client_config();
    let payload = b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/list\"}";
    let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
        .enable_timer()
        .build()
        .unwrap();
    let (mut data, mut ends, mut errors) = (0, 0, 0);
    rt.block_on(async {
        let listener = monoio::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut rng = Rng(0x7153_0bad_5eed_0001);
        for _ in 0..200 {
            let seed = rng.next();
            let client = client.clone();
            let sender = std::thread::spawn(move || {
                let mut rng = Rng(seed | 1);
                let mut sock = std::net::TcpStream::connect(addr).unwrap();
                let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
                let mut tls = rustls::ClientConnection::new(client, name).unwrap();
                while tls.is_handshaking() {
                    tls.complete_io(&mut sock).unwrap();
                }
                tls.writer().write_all(payload).unwrap();
                let mut record = Vec::new();
                tls.write_tls(&mut record).unwrap();
                let bad = mutate(&mut rng, &record);
                let _ = sock.write_all(&bad);
                let _ = sock.shutdown(std::net::Shutdown::Write);
                let _ = sock.read_to_end(&mut Vec::new()); // its alert, or nothing
                bad == record
            });
            let (tcp, _) = listener.accept().await.unwrap();
            // The record may arrive with the client's last handshake message and fail the
            // handshake's last read: an error all the same.
            let mut stream = match mcp_gateway::tls::TlsStream::accept(tcp, &server).await {
                Ok(s) => s,
                Err(_) => {
                    assert!(!sender.join().unwrap(), "an unchanged record fails nothing");
                    errors += 1;
                    continue;
                }
            };
            let mut got = Vec::new();
            let end = loop {
                let read = stream.read(Vec::with_capacity(64));
                let (r, buf) = monoio::time::timeout(Duration::from_secs(10), read)
                    .await
                    .expect("the stream ends: the client closed its half");
                match r {
                    Ok(0) => break Ok(()),
                    Ok(_) => got.extend_from_slice(&buf),
                    Err(e) => break Err(e),
                }
            };
            if end.is_err() {
                assert!(stream.buffered(), "a failed session is ready (to fail)");
                let (again, _) = stream.read(Vec::with_capacity(64)).await;
                assert!(again.is_err(), "a failed session stays failed");
            }
            drop(stream); // the client reads until the connection closes
            let unchanged = sender.join().unwrap();
            match end {
                Ok(()) if got.is_empty() => ends += 1,
                Ok(()) => {
                    assert_eq!(got, payload, "what is read is what was sent");
                    data += 1;
                }
                Err(_) => {
                    assert!(!unchanged, "an unchanged record fails nothing");
                    errors += 1;
                }
            }
        }
    });
    eprintln!("mutated TLS records: {data} read, {ends} cut short, {errors} failed");
    assert!(
        errors > 100 && ends > 0,
        "the run reached past the error paths"
    );
}

/// Configuration documents changed at random, line by line and byte by byte, from the shipped
/// files (and the TOML one of the fuzz corpus): reading never panics, a document is either a configuration whose
/// checks pass or a list of problems, each naming what it is about, never more than the bound.
#[test]
fn mutated_configuration_documents_are_read_or_refused_with_their_problems() {
    const YAML: [&str; 4] = [
        include_str!("../config/gateway.yaml"),
        include_str!("../config/development.yaml"),
        include_str!("../config/enterprise.yaml"),
        include_str!("../config/public.yaml"),
    ];
    let toml_seed = String::from_utf8(seeds("configuration").remove(0)).unwrap();
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    let (mut read, mut refused, mut several) = (0, 0, 0);
    for round in 0..3_000 {
        let toml = round % 4 == 0;
        let seed = if toml {
            &toml_seed
        } else {
            YAML[rng.below(YAML.len())]
        };
        let mut lines: Vec<String> = seed.lines().map(str::to_string).collect();
        for _ in 0..1 + rng.below(4) {
            let i = rng.below(lines.len());
            match rng.below(4) {
                0 => {
                    lines.remove(i);
                }
                1 => lines.insert(i, lines[i].clone()),
                2 => {
                    // A value replaced: a word, a number out of range, a list, nothing.
                    if let Some((key, _)) = lines[i].split_once([':', '=']) {
                        let value = ["bogus", "-1", "99999999999", "[1, 2]", "", "\"x\""];
                        let sep = if toml { " = " } else { ": " };
                        lines[i] = format!("{key}{sep}{}", value[rng.below(value.len())]);
                    }
                }
                _ => {
                    let bytes = mutate(&mut rng, lines[i].as_bytes());
                    lines[i] = String::from_utf8_lossy(&bytes).into_owned();
                }
            }
            if lines.is_empty() {
                break;
            }
        }
        let text = lines.join("\n");
        match checks::configuration(&text, toml) {
            Ok(()) => read += 1,
            Err(problems) => {
                refused += 1;
                several += usize::from(problems > 1);
            }
        }
    }
    eprintln!("read {read}, refused {refused} ({several} with several problems)");
    assert!(read > 100 && refused > 1000 && several > 50);
}

/// The upstream side's parsers read bytes an upstream sends, which a broken or hostile MCP server
/// chooses: mutated responses never panic; a head is read alike with and without the client's
/// head written, and whatever prefix of it has come is incomplete, never an error; the client's
/// head is well formed; a body decodes to the same bytes and the same end whether it comes whole
/// or in random pieces.
#[test]
fn mutated_upstream_responses_are_read_alike_however_they_arrive() {
    let seeds = seeds("upstream_response");
    let mut rng = Rng(0xD1B5_4A32_D192_ED03);
    let (mut heads, mut bodies) = (0, 0);
    for i in 0..30_000 {
        let input = match seeds.get(i) {
            Some(seed) => seed.clone(),
            None => {
                let seed = &seeds[rng.below(seeds.len())];
                mutate(&mut rng, seed)
            }
        };
        match checks::upstream_response(&input, &mut rng) {
            Response::NoHead => {}
            Response::Head => heads += 1,
            Response::Body => {
                heads += 1;
                bodies += 1;
            }
        }
    }
    eprintln!("heads read: {heads}, bodies decoded: {bodies}");
    assert!(heads > 5_000 && bodies > 3_000, "{heads} {bodies}");
}

/// Server-sent events (an event stream reply relayed to a WebSocket or MCPB client) are taken
/// whole, the same whether the stream comes at once or in random pieces, and none larger than
/// the message size is handed over, whatever bytes the upstream sends.
#[test]
fn mutated_event_streams_give_the_same_events_however_they_arrive() {
    let events_seen =
        on_mutated_streams("event_stream", 0xA076_1D64_78BD_642F, checks::event_stream);
    assert!(events_seen > 20_000, "{events_seen}");
}

/// A WebSocket client's frames give the same messages, pongs and verdict whether they come at
/// once or in random pieces, and no message is over the message size or not UTF-8, whatever
/// bytes the client sends.
#[test]
fn mutated_websocket_frames_read_alike_however_they_arrive() {
    let messages = on_mutated_streams(
        "websocket_frames",
        0x9E37_79B9_7F4A_7C15,
        checks::websocket_frames,
    );
    assert!(messages > 2_000, "{messages}");
}

/// Runs `check` on 20 000 streams, each one to three mutated seeds of `target` end to end, with
/// a generator seeded `seed`; returns the sum of what `check` counted.
fn on_mutated_streams(target: &str, seed: u64, check: fn(&[u8], &mut Rng) -> usize) -> usize {
    let seeds = seeds(target);
    let mut rng = Rng(seed);
    let mut counted = 0;
    for _ in 0..20_000 {
        let mut stream = Vec::new();
        for _ in 0..1 + rng.below(3) {
            let seed = &seeds[rng.below(seeds.len())];
            stream.extend(mutate(&mut rng, seed));
        }
        counted += check(&stream, &mut rng);
    }
    counted
}
