//! Kernel structure offsets from the running kernel's BTF (/sys/kernel/btf/vmlinux). aya's
//! Rust eBPF has no CO-RE relocations, so the agent resolves the few fields the programs
//! read and hands them over as a load-time global.
use std::{
    path::Path,
    sync::{Arc, Mutex},
};

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

/// BTF kinds (include/uapi/linux/btf.h).
mod kind {
    pub const INT: u32 = 1;
    pub const ARRAY: u32 = 3;
    pub const STRUCT: u32 = 4;
    pub const UNION: u32 = 5;
    pub const ENUM: u32 = 6;
    pub const TYPEDEF: u32 = 8;
    pub const VOLATILE: u32 = 9;
    pub const CONST: u32 = 10;
    pub const RESTRICT: u32 = 11;
    pub const FUNC: u32 = 12;
    pub const FUNC_PROTO: u32 = 13;
    pub const VAR: u32 = 14;
    pub const DATASEC: u32 = 15;
    pub const DECL_TAG: u32 = 17;
    pub const TYPE_TAG: u32 = 18;
    pub const ENUM64: u32 = 19;
}

/// A BTF blob indexed by type id: the bytes plus where each type starts. The kernel's BTF is
/// ~5 MB; a full type model (btfparse) took ~60 MB of memory for the dozen offsets needed.
pub struct Btf {
    data: Vec<u8>,
    strings: usize,
    strings_len: usize,
    /// Start of type id i (index 0: the void type, unused).
    types: Vec<usize>,
}

fn u32_at(d: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(d.get(at..at.checked_add(4)?)?.try_into().ok()?))
}

impl Btf {
    pub fn read(path: &Path) -> Result<Self, BtfError> {
        let data = std::fs::read(path).map_err(|source| BtfError::Read { path: path.display().to_string(), source })?;
        Self::parse(data)
    }

    pub fn parse(data: Vec<u8>) -> Result<Self, BtfError> {
        let bad = |what: &str| BtfError::Parse(what.to_owned());
        if data.get(0..2) != Some(&[0x9f, 0xeb][..]) {
            return Err(bad("bad magic (not little-endian BTF)"));
        }
        let h = |i: usize| u32_at(&data, i).map(|v| v as usize).ok_or_else(|| bad("truncated header"));
        let (hdr_len, type_off, type_len, str_off, str_len) = (h(4)?, h(8)?, h(12)?, h(16)?, h(20)?);
        let types_start = hdr_len.checked_add(type_off).ok_or_else(|| bad("type section"))?;
        let types_end = types_start.checked_add(type_len).filter(|&e| e <= data.len()).ok_or_else(|| bad("type section"))?;
        let strings = hdr_len.checked_add(str_off).ok_or_else(|| bad("string section"))?;
        if strings.checked_add(str_len).is_none_or(|e| e > data.len()) {
            return Err(bad("string section"));
        }
        let mut types = vec![0usize];
        let mut at = types_start;
        while at < types_end {
            let info = u32_at(&data, at + 4).ok_or_else(|| bad("truncated type"))?;
            let vlen = (info & 0xffff) as usize;
            let extra = match (info >> 24) & 0x1f {
                kind::INT | kind::VAR | kind::DECL_TAG => 4,
                kind::ARRAY => 12,
                kind::STRUCT | kind::UNION | kind::DATASEC | kind::ENUM64 => 12 * vlen,
                kind::ENUM | kind::FUNC_PROTO => 8 * vlen,
                k if k <= 19 => 0,
                k => return Err(BtfError::Parse(format!("unknown type kind {k}"))),
            };
            types.push(at);
            at += 12 + extra;
        }
        Ok(Btf { data, strings, strings_len: str_len, types })
    }

    fn name(&self, off: u32) -> &[u8] {
        let start = self.strings + off as usize;
        let end = self.strings + self.strings_len;
        let s = self.data.get(start..end).unwrap_or(&[]);
        &s[..s.iter().position(|&b| b == 0).unwrap_or(s.len())]
    }

    /// (name_off, kind, vlen, size_or_type, start) of type `id`.
    fn ty(&self, id: u32) -> Option<(u32, u32, usize, u32, usize)> {
        let at = *self.types.get(id as usize)?;
        let info = u32_at(&self.data, at + 4)?;
        Some((u32_at(&self.data, at)?, (info >> 24) & 0x1f, (info & 0xffff) as usize, u32_at(&self.data, at + 8)?, at))
    }

    /// The id of the first type named `name` (a struct or union with members, else any).
    pub fn id_of(&self, name: &str) -> Option<u32> {
        let mut any = None;
        for id in 1..self.types.len() as u32 {
            let (n, k, vlen, _, _) = self.ty(id)?;
            if self.name(n) == name.as_bytes() {
                if matches!(k, kind::STRUCT | kind::UNION) && vlen > 0 {
                    return Some(id);
                }
                any.get_or_insert(id);
            }
        }
        any
    }

    /// Kernel function `name`: its type id and its parameters' names (None: not in BTF).
    pub fn func(&self, name: &str) -> Option<(u32, Vec<String>)> {
        (1..self.types.len() as u32).find_map(|id| {
            let (n, k, _, proto, _) = self.ty(id)?;
            if k != kind::FUNC || self.name(n) != name.as_bytes() {
                return None;
            }
            let (_, pk, vlen, _, at) = self.ty(proto)?;
            if pk != kind::FUNC_PROTO {
                return None;
            }
            let params = (0..vlen)
                .map(|i| u32_at(&self.data, at + 12 + 8 * i).map(|n| String::from_utf8_lossy(self.name(n)).into_owned()))
                .collect::<Option<Vec<_>>>()?;
            Some((id, params))
        })
    }

    /// Through typedefs and qualifiers to the type itself.
    fn resolve(&self, mut id: u32) -> Option<u32> {
        for _ in 0..32 {
            let (_, k, _, t, _) = self.ty(id)?;
            if !matches!(k, kind::TYPEDEF | kind::VOLATILE | kind::CONST | kind::RESTRICT | kind::TYPE_TAG) {
                return Some(id);
            }
            id = t;
        }
        None
    }

    /// Byte offset of member `field` of struct/union `id`, also through anonymous members.
    fn member(&self, id: u32, field: &[u8], depth: u32) -> Option<(u32, u32)> {
        if depth > 8 {
            return None;
        }
        let id = self.resolve(id)?;
        let (_, k, vlen, _, at) = self.ty(id)?;
        if !matches!(k, kind::STRUCT | kind::UNION) {
            return None;
        }
        let info = u32_at(&self.data, at + 4)?;
        let bitfields = info >> 31 == 1;
        for i in 0..vlen {
            let m = at + 12 + 12 * i;
            let (name, ty, off) = (u32_at(&self.data, m)?, u32_at(&self.data, m + 4)?, u32_at(&self.data, m + 8)?);
            let bits = if bitfields { off & 0x00ff_ffff } else { off };
            if name != 0 && self.name(name) == field {
                // A bitfield (e.g. sock.sk_protocol before Linux 5.6) is no byte offset.
                let bitfield = bitfields && off >> 24 != 0;
                return (bits % 8 == 0 && !bitfield).then_some((bits / 8, ty));
            }
            if name == 0
                && let Some((inner, t)) = self.member(ty, field, depth + 1)
            {
                return Some((bits / 8 + inner, t));
            }
        }
        None
    }

    /// Byte offset of `path` (`thread.fsbase`) inside type `id`.
    pub fn offset_of(&self, id: u32, path: &str) -> Option<u32> {
        let (mut off, mut ty) = (0u32, id);
        for part in path.split('.') {
            let (o, t) = self.member(ty, part.as_bytes(), 0)?;
            off += o;
            ty = t;
        }
        Some(off)
    }
}

/// The running kernel's BTF, parsed once while the agent starts: the feature checks, the
/// hook choice and the offsets all read it, and each parse of its ~5 MB costs ~50 ms here
/// (seconds under emulation). [`forget_kernel`] frees it once loading is done.
static KERNEL: Mutex<Option<Arc<Btf>>> = Mutex::new(None);

pub fn kernel() -> Result<Arc<Btf>, BtfError> {
    let mut cached = KERNEL.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(btf) = cached.as_ref() {
        return Ok(btf.clone());
    }
    let btf = Arc::new(Btf::read(Path::new(VMLINUX_BTF))?);
    *cached = Some(btf.clone());
    Ok(btf)
}

/// Frees the cached kernel BTF (the next [`kernel`] reads it again).
pub fn forget_kernel() {
    KERNEL.lock().unwrap_or_else(|e| e.into_inner()).take();
}

/// Resolves every offset the kernel programs use.
pub fn kernel_offsets(ti: &Btf) -> Result<KernelOffsets, BtfError> {
    let off = |ty: &str, field: &str| -> Result<u32, BtfError> {
        let id = ti.id_of(ty).ok_or_else(|| BtfError::Missing(format!("struct {ty}")))?;
        ti.offset_of(id, field).ok_or_else(|| BtfError::Missing(format!("{ty}.{field}")))
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
        skc_state: off("sock_common", "skc_state")?,
        sock_sk_socket: off("sock", "sk_socket")?,
        socket_alloc_inode: off("socket_alloc", "vfs_inode")?,
        inode_ino: off("inode", "i_ino")?,
        msghdr_iter_count: off("msghdr", "msg_iter.count")?,
        // Only for telling a retried send from a new one: optional.
        tcp_write_seq: off("tcp_sock", "write_seq").unwrap_or(0),
        fdtable_max_fds: off("fdtable", "max_fds")?,
        file_inode: off("file", "f_inode")?,
        inode_mode: off("inode", "i_mode")?,
        sk_type: off("sock", "sk_type")?,
        sk_protocol: off("sock", "sk_protocol")?,
        task_stack: off("task_struct", "stack")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs a kernel with BTF (every machine zerotrace runs on); no privileges.
    #[test]
    fn resolves_running_kernel() {
        let k = kernel_offsets(&kernel().expect("kernel BTF")).expect("kernel offsets");
        assert!(k.task_fsbase > 0 && k.task_files > 0);
        // sock_common starts with the address pair: daddr then rcv_saddr.
        assert_eq!(k.skc_rcv_saddr, k.skc_daddr + 4);
        assert_eq!(k.skc_num, k.skc_dport + 2);
        // msg_iter follows msg_name and msg_namelen; count follows its type, flags and offset.
        assert!(k.msghdr_iter_count >= 24 && k.msghdr_iter_count.is_multiple_of(8), "msghdr.msg_iter.count at {}", k.msghdr_iter_count);
        // tcp_sock starts with inet_connection_sock (sock and more): write_seq is far in.
        assert!(k.tcp_write_seq > 1000, "tcp_sock.write_seq at {}", k.tcp_write_seq);
    }
}

/// The same offsets as btfparse's full type model (the reader this one replaced).
#[cfg(test)]
mod oracle {
    use btfparse::{Offset, Readable, TypeInformation};

    struct Bytes(Vec<u8>);
    impl Readable for Bytes {
        fn read(&self, offset: u64, buffer: &mut [u8]) -> btfparse::Result<()> {
            let start = offset as usize;
            match self.0.get(start..start + buffer.len()) {
                Some(src) => {
                    buffer.copy_from_slice(src);
                    Ok(())
                }
                None => Err(btfparse::Error::new(btfparse::ErrorKind::IOError, "read past the end")),
            }
        }
    }

    #[test]
    fn offsets_match_btfparse() {
        let data = std::fs::read(super::VMLINUX_BTF).expect("kernel BTF");
        let ti = TypeInformation::new(&Bytes(data.clone())).expect("btfparse");
        let ours = super::Btf::parse(data).expect("parse");
        let fields = [
            ("task_struct", "thread.fsbase"),
            ("task_struct", "files"),
            ("files_struct", "fdt"),
            ("fdtable", "fd"),
            ("file", "private_data"),
            ("socket", "sk"),
            ("sock_common", "skc_family"),
            ("sock_common", "skc_daddr"),
            ("sock_common", "skc_rcv_saddr"),
            ("sock_common", "skc_dport"),
            ("sock_common", "skc_num"),
            ("sock_common", "skc_v6_daddr"),
            ("sock_common", "skc_v6_rcv_saddr"),
            ("sock_common", "skc_state"),
            ("sock", "sk_socket"),
            ("socket_alloc", "vfs_inode"),
            ("inode", "i_ino"),
            ("msghdr", "msg_iter.count"),
            ("tcp_sock", "write_seq"),
            ("fdtable", "max_fds"),
            ("file", "f_inode"),
            ("inode", "i_mode"),
            ("sock", "sk_type"),
            ("sock", "sk_protocol"),
            ("task_struct", "stack"),
            ("task_struct", "pid"),
            ("sk_buff", "len"),
        ];
        for (ty, field) in fields {
            let id = ti.id_of(ty).expect("type");
            let want = match ti.offset_of(id, field) {
                Ok((_, Offset::ByteOffset(o))) => o,
                Ok((_, Offset::BitOffsetAndSize(bits, _))) => bits / 8,
                Err(e) => panic!("btfparse {ty}.{field}: {e:?}"),
            };
            let got = ours.id_of(ty).and_then(|id| ours.offset_of(id, field));
            assert_eq!(got, Some(want), "{ty}.{field}");
        }
        assert!(ours.id_of("do_nanosleep").is_some());
        assert!(super::Btf::parse(b"garbage".to_vec()).is_err());
        assert!(ours.offset_of(ours.id_of("task_struct").unwrap(), "no_such_field").is_none());
    }
}
