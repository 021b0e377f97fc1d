//! The PROXY protocol (HAProxy's; versions 1 and 2) on the HTTP and TCP front doors: a load
//! balancer in `server.proxy_protocol_networks` starts each connection with a header naming the
//! client it relays, and that client's address is the one the per-IP limit, the request rate and
//! `X-Forwarded-For` use. Without it every client behind the balancer would share the
//! balancer's address, and so its 1 000 connections.
//!
//! Owns the header's parsing ([`parse`]) and its reading off a connection ([`read_header`]).
//!
//! Invariants:
//! - Never reads past the header: bytes are peeked, and only those that belong to the header are
//!   consumed, so the door after it sees the client's bytes from the first.
//! - A header must arrive whole within `read_timeout`, and is at most [`MAX_HEADER`] bytes (v1:
//!   107, as its specification says).
//! - Only peers in the trusted networks are read for a header; from anyone else a PROXY header is
//!   just bad input for the door, so nobody else can choose the address they are counted as.
//! - A `LOCAL` header (v2: the balancer's own health check) or `UNKNOWN` one (v1) names no client:
//!   the connection counts as the balancer's own.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::time::Instant;

use monoio::net::TcpStream;

use crate::network::Network;

/// The largest header accepted: v2 headers carry TLVs (a cloud balancer's endpoint id, TLS
/// details) after the addresses, which fit in far less.
pub const MAX_HEADER: usize = 16 * 1024;
/// v1's own limit, `\r\n` included.
const V1_MAX: usize = 107;
const V1_PREFIX: &[u8] = b"PROXY ";
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
const V2_FIXED: usize = 16;

/// The peers allowed (and required) to send a header: `server.proxy_protocol_networks`.
#[derive(Debug, Clone, Default)]
pub struct Trusted(Vec<Network>);

impl Trusted {
    /// `server.proxy_protocol_networks`, validated ([`crate::config::Config::validate`]).
    pub fn of(networks: &[String]) -> Trusted {
        Trusted(
            networks
                .iter()
                .map(|n| {
                    let (addr, len) = crate::config::parse_network(n).expect("a validated network");
                    Network::new(addr, len)
                })
                .collect(),
        )
    }

    /// True when connections from `peer` start with a PROXY header.
    pub fn trusts(&self, peer: IpAddr) -> bool {
        self.0.iter().any(|n| n.contains(peer))
    }
}

/// What the bytes at the start of a connection hold.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A header begins but is not whole yet.
    Incomplete,
    /// A whole header of `len` bytes naming `client` (`None`: a `LOCAL` or `UNKNOWN` header, or
    /// an address family without an IP address).
    Header { len: usize, client: Option<IpAddr> },
}

/// Parses the header at the start of `b`. `Err` says what is wrong; bytes that cannot begin a
/// header are an error at once (an HTTP request from a balancer not configured to send one).
pub fn parse(b: &[u8]) -> Result<Parsed, &'static str> {
    let n = b.len().min(V2_SIGNATURE.len());
    if b[..n] == V2_SIGNATURE[..n] {
        return if n < V2_SIGNATURE.len() {
            Ok(Parsed::Incomplete)
        } else {
            parse_v2(b)
        };
    }
    let n = b.len().min(V1_PREFIX.len());
    if b[..n] != V1_PREFIX[..n] {
        return Err("expected a PROXY protocol header (server.proxy_protocol_networks)");
    }
    parse_v1(b)
}

/// `PROXY TCP4|TCP6 src dst sport dport\r\n` or `PROXY UNKNOWN ...\r\n`.
fn parse_v1(b: &[u8]) -> Result<Parsed, &'static str> {
    let Some(end) = b[..b.len().min(V1_MAX)]
        .windows(2)
        .position(|w| w == b"\r\n")
    else {
        return if b.len() >= V1_MAX {
            Err("PROXY v1 header without \\r\\n in its first 107 bytes")
        } else {
            Ok(Parsed::Incomplete)
        };
    };
    let bad = "malformed PROXY v1 header";
    let line = std::str::from_utf8(&b[V1_PREFIX.len()..end]).map_err(|_| bad)?;
    let mut fields = line.split(' ');
    let family = fields.next().ok_or(bad)?;
    let len = end + 2;
    if family == "UNKNOWN" {
        return Ok(Parsed::Header { len, client: None });
    }
    let [src, dst, sport, dport] = [(); 4].map(|_| fields.next());
    let (Some(src), Some(dst), Some(sport), Some(dport), None) =
        (src, dst, sport, dport, fields.next())
    else {
        return Err(bad);
    };
    let client = match family {
        "TCP4" => {
            dst.parse::<Ipv4Addr>().map_err(|_| bad)?;
            IpAddr::V4(src.parse().map_err(|_| bad)?)
        }
        "TCP6" => {
            dst.parse::<Ipv6Addr>().map_err(|_| bad)?;
            IpAddr::V6(src.parse().map_err(|_| bad)?)
        }
        _ => return Err("PROXY v1 header of an unknown protocol"),
    };
    if sport.parse::<u16>().is_err() || dport.parse::<u16>().is_err() {
        return Err(bad);
    }
    Ok(Parsed::Header {
        len,
        client: Some(client),
    })
}

/// The 16-byte fixed part (signature, version and command, family, length), then the addresses
/// and TLVs.
fn parse_v2(b: &[u8]) -> Result<Parsed, &'static str> {
    if b.len() < V2_FIXED {
        return Ok(Parsed::Incomplete);
    }
    if b[12] >> 4 != 2 {
        return Err("PROXY v2 header of an unknown version");
    }
    let local = match b[12] & 0xf {
        0 => true,
        1 => false,
        _ => return Err("PROXY v2 header with an unknown command"),
    };
    let len = V2_FIXED + usize::from(u16::from_be_bytes([b[14], b[15]]));
    if len > MAX_HEADER {
        return Err("PROXY v2 header over 16 KiB");
    }
    if b.len() < len {
        return Ok(Parsed::Incomplete);
    }
    let body = &b[V2_FIXED..len];
    let client = match (local, b[13] >> 4) {
        (true, _) | (false, 0 | 3) => None, // LOCAL, or UNSPEC / UNIX: no IP to count
        (false, 1) => Some(IpAddr::from(source::<4>(body)?)),
        (false, 2) => Some(IpAddr::from(source::<16>(body)?).to_canonical()),
        _ => return Err("PROXY v2 header of an unknown address family"),
    };
    Ok(Parsed::Header { len, client })
}

/// The source address of a v2 address block of `N`-byte addresses (source, destination, then
/// the two ports).
fn source<const N: usize>(body: &[u8]) -> Result<[u8; N], &'static str> {
    let block = body.get(..2 * N + 4).ok_or("PROXY v2 header too short")?;
    Ok(block[..N].try_into().expect("N bytes"))
}

/// Why no header was read.
#[derive(Debug)]
pub enum HeaderError {
    /// The peer closed, or the socket failed.
    Closed,
    /// Not whole within the deadline.
    TimedOut,
    /// Not a PROXY header, or a malformed one.
    Bad(&'static str),
}

/// Reads the PROXY header that starts `stream` within `deadline`, consuming exactly its bytes,
/// and returns the client it names (`None`: the peer's own address applies).
pub async fn read_header(
    stream: &TcpStream,
    deadline: Instant,
) -> Result<Option<IpAddr>, HeaderError> {
    let fd = stream.as_raw_fd();
    // The header's bytes consumed so far: all of them when it is not whole yet.
    let mut head: Vec<u8> = Vec::new();
    loop {
        // Peeked before any wait: a balancer usually sends the header as it connects, so it is
        // mostly here by the time the connection is accepted. The buffer is not held across the
        // wait below, so it is no part of the task's state.
        let peeked = {
            let mut peeked = [0u8; 512];
            match recv(fd, &mut peeked, libc::MSG_PEEK) {
                Ok(0) => return Err(HeaderError::Closed),
                Ok(n) => {
                    // Parsed where it lies while nothing was kept: the common case, a header
                    // whole in the first peek, allocates nothing.
                    let had = head.len();
                    let parsed = if had == 0 {
                        parse(&peeked[..n])
                    } else {
                        head.extend_from_slice(&peeked[..n]);
                        parse(&head)
                    };
                    match parsed.map_err(HeaderError::Bad)? {
                        // Every byte seen belongs to the header: keep and take them, so that
                        // readiness next means new bytes, not these again.
                        Parsed::Incomplete => {
                            if had == 0 {
                                head.extend_from_slice(&peeked[..n]);
                            }
                            consume(fd, &mut peeked[..n])?
                        }
                        Parsed::Header { len, client } => {
                            consume(fd, &mut peeked[..len - had])?;
                            return Ok(client);
                        }
                    }
                    true
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
                Err(_) => return Err(HeaderError::Closed),
            }
        };
        if peeked {
            continue; // more may be queued already
        }
        match crate::conn::until(deadline, stream.readable(false)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(HeaderError::Closed),
            Err(_) => return Err(HeaderError::TimedOut),
        }
    }
}

/// Reads exactly `buf.len()` bytes that a peek showed are queued.
fn consume(fd: i32, buf: &mut [u8]) -> Result<(), HeaderError> {
    let mut at = 0;
    while at < buf.len() {
        match recv(fd, &mut buf[at..], 0) {
            Ok(n) if n > 0 => at += n,
            _ => return Err(HeaderError::Closed),
        }
    }
    Ok(())
}

fn recv(fd: i32, buf: &mut [u8], flags: i32) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of its length; `fd` is the caller's open socket, which
    // has no other read in flight while its header is read.
    let n = unsafe {
        libc::recv(
            fd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            flags | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn v2(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.extend_from_slice(&[0x20 | command, family]);
        h.extend_from_slice(&(body.len() as u16).to_be_bytes());
        h.extend_from_slice(body);
        h
    }

    fn header(client: Option<&str>, len: usize) -> Result<Parsed, &'static str> {
        Ok(Parsed::Header {
            len,
            client: client.map(|c| c.parse().unwrap()),
        })
    }

    /// Every strict prefix of a whole header is `Incomplete`, and the bytes after it are left.
    fn whole(h: &[u8], client: Option<&str>) {
        for cut in 0..h.len() {
            assert_eq!(
                parse(&h[..cut]),
                Ok(Parsed::Incomplete),
                "prefix of {cut} bytes"
            );
        }
        let mut more = h.to_vec();
        more.extend_from_slice(b"POST /mcp HTTP/1.1\r\n");
        assert_eq!(parse(&more), header(client, h.len()));
    }

    #[test]
    fn v1_headers() {
        whole(
            b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 8080\r\n",
            Some("203.0.113.7"),
        );
        whole(
            b"PROXY TCP6 2001:db8::7 2001:db8::1 51234 8080\r\n",
            Some("2001:db8::7"),
        );
        whole(b"PROXY UNKNOWN\r\n", None);
        whole(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", None);
        // The specification's longest header (UNKNOWN with the longest addresses and ports).
        let ffff = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
        let longest = format!("PROXY UNKNOWN {ffff} {ffff} 65535 65535\r\n");
        assert_eq!(longest.len(), V1_MAX);
        whole(longest.as_bytes(), None);
        let tcp6 = format!("PROXY TCP6 {ffff} {ffff} 65535 65535\r\n");
        whole(tcp6.as_bytes(), Some(ffff));
    }

    #[test]
    fn v1_refusals() {
        for bad in [
            &b"PROXY TCP4 203.0.113.7 10.0.0.1 51234\r\n"[..],
            b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 8080 9\r\n",
            b"PROXY TCP4 2001:db8::7 10.0.0.1 1 2\r\n",
            b"PROXY TCP6 203.0.113.7 2001:db8::1 1 2\r\n",
            b"PROXY TCP4 203.0.113.7 10.0.0.1 70000 8080\r\n",
            b"PROXY TCP4  203.0.113.7 10.0.0.1 1 2\r\n",
            b"PROXY UDP4 203.0.113.7 10.0.0.1 1 2\r\n",
            b"PROXY \xff\r\n",
        ] {
            assert!(parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let no_end = [b"PROXY TCP4 ".as_slice(), &[b'1'; 100]].concat();
        assert!(parse(&no_end).is_err(), "no \\r\\n within 107 bytes");
        assert!(parse(b"POST /mcp HTTP/1.1\r\n").is_err());
        assert!(parse(b"P").is_ok() && parse(b"GET").is_err());
        assert!(parse(b"MCPB").is_err());
    }

    #[test]
    fn v2_headers() {
        let mut inet = vec![203, 0, 113, 7, 10, 0, 0, 1];
        inet.extend_from_slice(&[0xc8, 0x22, 0x1f, 0x90]);
        whole(&v2(1, 0x11, &inet), Some("203.0.113.7"));
        // TLVs after the addresses (here a PP2_TYPE_AWS one) are skipped.
        let mut tlv = inet.clone();
        tlv.extend_from_slice(&[0xea, 0, 5, 1, b'v', b'p', b'c', b'e']);
        whole(&v2(1, 0x11, &tlv), Some("203.0.113.7"));
        let mut inet6 = "2001:db8::7".parse::<Ipv6Addr>().unwrap().octets().to_vec();
        inet6.extend_from_slice(&[0; 16]);
        inet6.extend_from_slice(&[0, 1, 0, 2]);
        whole(&v2(1, 0x21, &inet6), Some("2001:db8::7"));
        // An IPv4-mapped source counts as the IPv4 address.
        let mut mapped = "::ffff:203.0.113.9"
            .parse::<Ipv6Addr>()
            .unwrap()
            .octets()
            .to_vec();
        mapped.extend_from_slice(&[0; 20]);
        whole(&v2(1, 0x21, &mapped), Some("203.0.113.9"));
        // The balancer's own health check, and families without an IP address.
        whole(&v2(0, 0x11, &inet), None);
        whole(&v2(0, 0x00, &[]), None);
        whole(&v2(1, 0x00, &[]), None);
        whole(&v2(1, 0x31, &[0; 216]), None);
    }

    #[test]
    fn v2_refusals() {
        let inet = [203, 0, 113, 7, 10, 0, 0, 1, 0, 1, 0, 2];
        let mut bad_version = v2(1, 0x11, &inet);
        bad_version[12] = 0x11;
        assert!(parse(&bad_version).is_err());
        assert!(parse(&v2(2, 0x11, &inet)).is_err(), "unknown command");
        assert!(parse(&v2(1, 0x41, &inet)).is_err(), "unknown family");
        assert!(
            parse(&v2(1, 0x11, &inet[..11])).is_err(),
            "addresses cut short"
        );
        assert!(
            parse(&v2(1, 0x21, &[0; 35])).is_err(),
            "addresses cut short"
        );
        let mut huge = v2(1, 0x11, &inet);
        huge[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
        assert!(
            parse(&huge[..16]).is_err(),
            "over MAX_HEADER, refused before it is read"
        );
        let mut sig = V2_SIGNATURE.to_vec();
        sig[11] = b'X';
        assert!(parse(&sig).is_err());
    }

    #[test]
    fn trusted_networks() {
        let t = Trusted::of(&["10.0.0.0/8".to_string()]);
        assert!(t.trusts("10.1.2.3".parse().unwrap()));
        assert!(t.trusts("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!t.trusts("11.0.0.1".parse().unwrap()));
        assert!(!Trusted::default().trusts("10.1.2.3".parse().unwrap()));
    }
}
