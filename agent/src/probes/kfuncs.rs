//! The kernel object as this kernel loads it: the programs' placeholder calls for
//! preemption (`util::unpreempted` in the kernel crate, helper numbers CALL_PREEMPT_*)
//! become calls of the kernel functions bpf_preempt_disable/bpf_preempt_enable where the
//! kernel's BTF has them (Linux 6.10+), else `r0 = 0` (kernels before 6.10 run tracepoint
//! programs unpreempted; their fentry and uprobe programs are preemptible on fully
//! preemptible kernels: docs/limits.md). aya 0.14 does not relocate kernel function calls, hence the
//! rewrite here, on the object's bytes, before aya parses them.
use object::{Object, ObjectSection, SectionKind};

use super::btf::Btf;

/// The placeholder helper numbers (ebpf/zerotrace-ebpf/src/util.rs).
const CALL_PREEMPT_DISABLE: u32 = 0x7a70_0001;
const CALL_PREEMPT_ENABLE: u32 = 0x7a70_0002;
const BPF_CALL: u8 = 0x85;
/// `call` with src_reg BPF_PSEUDO_KFUNC_CALL (2): imm is a kernel BTF id.
const KFUNC_REGS: u8 = 2 << 4;
/// `r0 = 0` (BPF_ALU64 | BPF_MOV | BPF_K).
const MOV_R0_0: [u8; 8] = [0xb7, 0, 0, 0, 0, 0, 0, 0];

/// What the rewrite made of the placeholders.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preemption {
    /// Calls of bpf_preempt_disable/enable.
    Disabled,
    /// No-ops: this kernel has no such kernel functions.
    NoOps,
}

/// `object` with its placeholder calls rewritten for a kernel whose BTF is `btf` (None: no
/// BTF, no-ops), and how many calls were rewritten.
pub fn rewrite(object: &[u8], btf: Option<&Btf>) -> Result<(Vec<u8>, Preemption, usize), String> {
    let ids = btf.and_then(|b| Some((b.func("bpf_preempt_disable")?.0, b.func("bpf_preempt_enable")?.0)));
    let file = object::File::parse(object).map_err(|e| format!("kernel object: {e}"))?;
    let mut out = object.to_vec();
    let mut rewritten = 0;
    for section in file.sections().filter(|s| s.kind() == SectionKind::Text) {
        let Some((start, size)) = section.file_range() else { continue };
        let (start, size) = (start as usize, size as usize);
        let code = out.get_mut(start..start + size).ok_or("kernel object: a section past its end")?;
        for insn in code.chunks_exact_mut(8) {
            if insn[0] != BPF_CALL || insn[1] != 0 {
                continue;
            }
            let imm = u32::from_le_bytes([insn[4], insn[5], insn[6], insn[7]]);
            let id = match (imm, ids) {
                (CALL_PREEMPT_DISABLE, Some((disable, _))) => disable,
                (CALL_PREEMPT_ENABLE, Some((_, enable))) => enable,
                (CALL_PREEMPT_DISABLE | CALL_PREEMPT_ENABLE, None) => {
                    insn.copy_from_slice(&MOV_R0_0);
                    rewritten += 1;
                    continue;
                }
                _ => continue,
            };
            insn[1] = KFUNC_REGS;
            insn[2..4].fill(0);
            insn[4..8].copy_from_slice(&id.to_le_bytes());
            rewritten += 1;
        }
    }
    Ok((out, if ids.is_some() { Preemption::Disabled } else { Preemption::NoOps }, rewritten))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The object built into this binary: every placeholder call is rewritten, both kinds
    /// are there, and nothing else changes.
    #[test]
    fn placeholders_become_no_ops_without_the_kernel_functions() {
        let object = super::super::KERNEL_OBJECT;
        assert!(!object.is_empty(), "built with AYA_BUILD_SKIP=1: no kernel object to rewrite (cargo xtask test builds it)");
        let (out, how, n) = rewrite(object, None).unwrap();
        assert_eq!(how, Preemption::NoOps);
        assert!(n > 0, "{n}");
        for magic in [CALL_PREEMPT_DISABLE, CALL_PREEMPT_ENABLE] {
            let mut call = [BPF_CALL, 0, 0, 0, 0, 0, 0, 0];
            call[4..].copy_from_slice(&magic.to_le_bytes());
            assert!(object.chunks_exact(8).any(|i| i == call), "{magic:#x} in the object");
            assert!(!out.chunks_exact(8).any(|i| i == call), "{magic:#x} left");
        }
        let changed = object.chunks_exact(8).zip(out.chunks_exact(8)).filter(|(a, b)| a != b).count();
        assert_eq!(changed, n);
        assert!(out.chunks_exact(8).filter(|i| *i == MOV_R0_0).count() >= n);
    }
}
