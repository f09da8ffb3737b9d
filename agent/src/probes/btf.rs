//! Kernel structure offsets from the running kernel's BTF (/sys/kernel/btf/vmlinux). aya's
//! Rust eBPF has no CO-RE relocations, so the agent resolves the few fields the programs
//! read and hands them over as a load-time global.
use std::path::Path;

use btfparse::{Offset, Readable, TypeInformation};
use zerotrace_common::KernelOffsets;

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read kernel BTF at {path}: {source} (zerotrace needs a kernel built with CONFIG_DEBUG_INFO_BTF=y)")]
    Read { path: String, source: std::io::Error },
    #[error("kernel BTF could not be parsed: {0}")]
    Parse(String),
    #[error("kernel BTF has no {0}; this kernel's layout is not supported")]
    Missing(String),
}

struct Bytes(Vec<u8>);

impl Readable for Bytes {
    fn read(&self, offset: u64, buffer: &mut [u8]) -> btfparse::Result<()> {
        let start = offset as usize;
        match self.0.get(start..start + buffer.len()) {
            Some(src) => {
                buffer.copy_from_slice(src);
                Ok(())
            }
            None => Err(btfparse::Error::new(btfparse::ErrorKind::IOError, "read past the end of BTF")),
        }
    }
}

/// Parses a BTF file (the kernel's: VMLINUX_BTF).
pub fn type_information(path: &Path) -> Result<TypeInformation, BtfError> {
    let data = std::fs::read(path)
        .map_err(|source| BtfError::Read { path: path.display().to_string(), source })?;
    TypeInformation::new(&Bytes(data)).map_err(|e| BtfError::Parse(format!("{e:?}")))
}

/// Resolves every offset the kernel programs use.
pub fn kernel_offsets(path: &Path) -> Result<KernelOffsets, BtfError> {
    let ti = type_information(path)?;
    let off = |ty: &str, field: &str| -> Result<u32, BtfError> {
        let id = ti.id_of(ty).ok_or_else(|| BtfError::Missing(format!("struct {ty}")))?;
        match ti.offset_of(id, field) {
            Ok((_, Offset::ByteOffset(o))) => Ok(o),
            Ok((_, Offset::BitOffsetAndSize(bits, _))) if bits % 8 == 0 => Ok(bits / 8),
            _ => Err(BtfError::Missing(format!("{ty}.{field}"))),
        }
    };
    Ok(KernelOffsets {
        task_fsbase: off("task_struct", "thread.fsbase")?,
        task_files: off("task_struct", "files")?,
        files_fdt: off("files_struct", "fdt")?,
        fdtable_fd: off("fdtable", "fd")?,
        file_private_data: off("file", "private_data")?,
        socket_sk: off("socket", "sk")?,
        skc_family: off("sock_common", "skc_family")?,
        skc_daddr: off("sock_common", "skc_daddr")?,
        skc_rcv_saddr: off("sock_common", "skc_rcv_saddr")?,
        skc_dport: off("sock_common", "skc_dport")?,
        skc_num: off("sock_common", "skc_num")?,
        skc_v6_daddr: off("sock_common", "skc_v6_daddr")?,
        skc_v6_rcv_saddr: off("sock_common", "skc_v6_rcv_saddr")?,
        sock_sk_socket: off("sock", "sk_socket")?,
        socket_alloc_inode: off("socket_alloc", "vfs_inode")?,
        inode_ino: off("inode", "i_ino")?,
        msghdr_iter_count: off("msghdr", "msg_iter.count")?,
        _pad: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs a kernel with BTF (every machine zerotrace runs on); no privileges.
    #[test]
    fn resolves_running_kernel() {
        let k = kernel_offsets(Path::new(VMLINUX_BTF)).expect("kernel BTF");
        assert!(k.task_fsbase > 0 && k.task_files > 0);
        // sock_common starts with the address pair: daddr then rcv_saddr.
        assert_eq!(k.skc_rcv_saddr, k.skc_daddr + 4);
        assert_eq!(k.skc_num, k.skc_dport + 2);
        // msg_iter follows msg_name and msg_namelen; count follows its type, flags and offset.
        assert!(k.msghdr_iter_count >= 24 && k.msghdr_iter_count % 8 == 0, "msghdr.msg_iter.count at {}", k.msghdr_iter_count);
    }
}
