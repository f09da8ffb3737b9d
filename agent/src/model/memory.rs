//! Reading a traced process's memory from the agent (process_vm_readv), for strings the
//! kernel only points at. Used for Go route patterns, which live as long as the process.
use std::io;

/// Reads `len` bytes at `addr` in process `pid`.
pub fn read(pid: u32, addr: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let local = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: len };
    let remote = libc::iovec { iov_base: addr as *mut libc::c_void, iov_len: len };
    // SAFETY: both iovecs describe valid ranges (ours is owned; the remote one is checked by
    // the kernel, which fails the call rather than touching unmapped memory).
    let n = unsafe { libc::process_vm_readv(pid as libc::pid_t, &local, 1, &remote, 1, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_memory() {
        let s = String::from("GET /users/{id}");
        let got = read(std::process::id(), s.as_ptr() as u64, s.len()).unwrap();
        assert_eq!(got, s.as_bytes());
        assert!(read(std::process::id(), 8, 16).is_err(), "unmapped memory is an error, not a crash");
    }
}
