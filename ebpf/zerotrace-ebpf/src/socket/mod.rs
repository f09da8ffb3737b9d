//! Sockets of selected processes, from the hooks down. Each file uses only those listed
//! after it:
//! - `tracepoints`, `fentry`, `syscalls`: the hook programs, one file per hook set;
//! - `io`: what every hook calls (receive, send, close), dispatching by the socket's role;
//! - `server`: the request/response phase machine of server connections;
//! - `native`: the client side of native processes (not Go), requests seen at the socket;
//! - `go_client`: Go client sockets, which only offer the writer's span (CLIENT_LINK);
//! - `records`: the records of captured bytes and byte counts sent to the agent;
//! - `conns`: which sockets are followed (CONNS) and which processes (SELECTED);
//! - `bytes`: what the first bytes of a read or send are (HTTP/1, TLS, HTTP/2);
//! - `args`: the syscall behind a hook: its number, arguments and user buffers.
pub mod args;
pub mod bytes;
pub mod conns;
pub mod fentry;
pub mod go_client;
pub mod io;
pub mod native;
pub mod records;
pub mod server;
pub mod syscalls;
pub mod tracepoints;
