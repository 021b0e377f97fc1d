//! The log's way out: every line goes to stderr through a writer thread of its own, so no worker
//! ever waits on whoever reads the log.
//!
//! Owns the process's `tracing` subscriber (text or JSON lines, filtered by `RUST_LOG`, `info`
//! by default), its writer thread (`mcp-log`), the count of lines it had to drop, and whether
//! the access log (`server.access_log`) is on.
//!
//! Invariants:
//! - A worker that logs formats the line and hands it to a bounded queue; it never blocks on the
//!   file descriptor. A log consumer that stalls (a full pipe, a slow terminal, journald under
//!   load) therefore cannot stall the gateway, which matters most when it logs most: under a
//!   flood of refusals with `RUST_LOG=debug`.
//! - The queue holds at most [`QUEUED_LINES`]; a line that finds it full is dropped and counted
//!   (`mcp_gateway_log_lines_dropped_total`), never waited for.
//! - Lines queued when the gateway stops are written before the process exits (the [`Guard`]
//!   flushes when dropped at the end of `main`).
//! - The writer thread blocks the signals the main thread waits for, so a SIGTERM is always a
//!   graceful stop, never the default action on that thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use tracing_appender::non_blocking::{ErrorCounter, WorkerGuard};

/// Lines the queue holds while stderr does not take them (a few MB of text at most).
pub const QUEUED_LINES: usize = 16_384;

static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// Keep it until the process ends: dropping it writes what is still queued.
pub type Guard = WorkerGuard;

/// Installs the subscriber: JSON lines when `json`, else text (colored on a terminal).
pub fn init(json: bool) -> Guard {
    use tracing_subscriber::EnvFilter;
    // The writer thread must never take SIGINT, SIGTERM or SIGHUP, whose default action ends the
    // process: only the main thread waits for them (`runtime`). It inherits the mask it is
    // spawned with, so they are blocked around its spawn.
    use nix::sys::signal::{SigSet, SigmaskHow, Signal};
    let mut signals = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        signals.add(s);
    }
    let before = signals.thread_swap_mask(SigmaskHow::SIG_BLOCK).ok();
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(QUEUED_LINES)
        .lossy(true)
        .thread_name("mcp-log")
        .finish(std::io::stderr());
    if let Some(mask) = before {
        let _ = mask.thread_set_mask();
    }
    let _ = DROPPED.set(writer.error_counter());
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let log = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    if json {
        log.json().init();
    } else {
        log.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
    guard
}

/// `server.access_log`: whether the HTTP door logs each request it answers.
static ACCESS: AtomicBool = AtomicBool::new(false);

/// Turns the access log on or off (at startup and on reload).
pub fn set_access_log(on: bool) {
    // Relaxed: a flag nothing else is published with; a request that reads it just before or
    // after a reload is logged by the old setting or the new, either being right.
    ACCESS.store(on, Ordering::Relaxed);
}

/// Whether requests are to be logged: one load of a line written only by reloads.
pub fn access_log() -> bool {
    ACCESS.load(Ordering::Relaxed)
}

/// Lines dropped because the queue was full (0 before [`init`]).
pub fn dropped_lines() -> u64 {
    DROPPED.get().map_or(0, |c| c.dropped_lines() as u64)
}
