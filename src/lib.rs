//! mcp-gateway: a thread-per-core, io_uring gateway for MCP (JSON-RPC 2.0) traffic that protects
//! the MCP servers behind it with a global and a per-client-IP concurrent-connection limit.
//!
//! Layout (one module per concept):
//! - [`config`]: the YAML/TOML configuration, its defaults and its validation.
//! - [`runtime`]: process start and stop: listeners, pinned workers, signals.
//! - [`reload`]: what a SIGHUP re-reads and applies at once.
//! - [`worker`]: one core's runtime: accept loops, admission, drain.
//! - [`park`]: the parking lot, where idle plain connections (HTTP, WebSocket, MCPB, event
//!   streams between events) wait outside any task.
//! - [`limiter`]: the global count and the per-IP table (each with its per-core reserves), the
//!   request rate, and the RAII permit.
//! - [`proxy_protocol`]: PROXY protocol headers from trusted load balancers.
//! - [`network`]: IP networks (CIDR) and the one form addresses are compared in.
//! - [`conn`]: connection I/O shared by the doors: buffer pool, idle wait, timed reads/writes.
//! - [`boxed`]: `Box::pin` for a request's state, in blocks each core reuses.
//! - [`stream`]: a connection, plain TCP, TLS or (an upstream's) a Unix socket; [`tls`]: rustls, its
//!   configurations and the TLS stream.
//! - [`http`]: the Streamable HTTP front door (and the WebSocket upgrade).
//! - [`websocket`]: the WebSocket front door after the upgrade; its frame codec and message
//!   assembly, with no I/O, in [`websocket::frames`].
//! - [`mcpb`]: the framed-TCP (MCPB) front door.
//! - [`echo`]: `builtin:echo`, the MCP server inside the gateway.
//! - [`upstream`]: upstream MCP servers: balancing, breakers, health checks, the HTTP client
//!   and its per-core pool, message forwarding for WebSocket and MCPB.
//! - [`indexed`]: append-only storage by an index never reused (per upstream, per override
//!   network); [`published`]: a value a reload replaces whole, read without a lock.
//! - [`metrics`]: per-core counters, summed into Prometheus text at scrape.
//! - [`logging`]: the log's writer thread, which no worker waits on; [`access`]: the access
//!   log's lines.
//! - [`admin`]: `/metrics`, `/healthz`, `/ready`.
//! - [`loadgen`]: the bench kit's load generator (`mcp-loadgen`), a client of the gateway.

pub mod access;
pub mod admin;
pub mod boxed;
pub mod config;
pub mod conn;
pub mod echo;
pub mod http;
pub mod indexed;
pub mod limiter;
pub mod loadgen;
pub mod logging;
pub mod mcpb;
pub mod metrics;
pub mod network;
pub mod park;
pub mod proxy_protocol;
pub mod published;
pub mod reload;
pub mod runtime;
pub mod stream;
pub mod tls;
pub mod upstream;
pub mod websocket;
pub mod worker;
