//! The epoll fallback serves the same behaviour as io_uring: requests, limits, idle expiry and
//! the drain on shutdown.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn epoll_driver_serves_limits_and_expires_idle_connections() {
    let mut gw = start("driver: epoll\nmax_connections_per_ip: 1\nidle_timeout: 0.3");
    assert!(gw.log.lock().unwrap().contains("driver=\"epoll\""));
    let mut a = connect_from("127.0.0.2", gw.http);
    assert_eq!(roundtrip(&mut a, &post_mcp(TOOLS_LIST)).status, 200);
    let mut b = connect_from("127.0.0.2", gw.http);
    assert_eq!(roundtrip(&mut b, &post_mcp(TOOLS_LIST)).status, 429);
    assert!(
        closed_by_peer(&mut a),
        "idle connection expired by the sweeper"
    );
    gw.wait_all_closed();
    let mut c = connect_from("127.0.0.3", gw.http);
    assert_eq!(roundtrip(&mut c, &post_mcp(TOOLS_LIST)).status, 200);
    unsafe { libc::kill(gw.pid(), libc::SIGTERM) };
    assert!(closed_by_peer(&mut c), "drain closes the idle connection");
    assert_eq!(gw.stop(0, Duration::from_secs(10)).code(), Some(0));
}
