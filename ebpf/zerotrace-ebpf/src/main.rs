//! zerotrace's kernel programs: socket hooks that follow the sockets and HTTP exchanges of
//! selected processes (socket/), Go uprobes that add what sockets cannot show (go_*.rs),
//! CPU sampling (profiler.rs) and exec reports for discovery (processes.rs).
#![no_std]
#![no_main]
#![allow(static_mut_refs)]
#![allow(internal_features)]
#![feature(core_intrinsics)]
// Inline assembly: the preemption calls the agent rewrites (util::unpreempted).
#![feature(asm_experimental_arch)]
// aya's map methods take `impl Borrow<K>`: a key passed by reference stays where it is on the
// 512-byte BPF stack instead of being copied.
#![allow(clippy::needless_borrows_for_generic_args)]
// Indexed loops with constant bounds are the shape the verifier proves bounded.
#![allow(clippy::needless_range_loop)]

mod calibration;
mod causality;
mod go_client;
mod go_grpc;
mod go_h2;
mod go_http;
mod go_inject;
mod go_runtime;
mod go_sql;
mod go_tls;
mod maps;
mod processes;
mod profiler;
mod socket;
mod util;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier proves no panic path is reachable; this only satisfies the compiler.
    loop {}
}

/// bpf_probe_read_user and friends are GPL-only helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
