//! Finds the RET instructions of a function by decoding it (raw 0xC3 bytes also occur
//! inside other instructions). Uprobes on these addresses replace uretprobes, which would
//! corrupt Go programs because goroutine stacks move.
use std::{collections::HashSet, ops::Range};

use iced_x86::{Decoder, DecoderOptions, FlowControl, Instruction, InstructionInfoFactory, Mnemonic, OpAccess, OpKind, Register};

/// Offset of g.stackguard0 (after g.stack.lo and g.stack.hi) on amd64, in every Go version.
const STACKGUARD0: u64 = 0x10;

/// Address of the first instruction after a Go function's stack-growth check
/// (`[LEAQ -N(SP), R12;] CMPQ SP|R12, 0x10(R14); JBE morestack`), or None when the function
/// does not start with one. A uprobe there fires once per call: a probe on the entry fires
/// twice when the goroutine's stack has to grow (morestack restarts the function), and the
/// argument registers are still untouched at that point.
pub fn after_stack_check(code: &[u8], addr: u64) -> Option<u64> {
    let mut decoder = Decoder::with_ip(64, code, addr, DecoderOptions::NONE);
    let mut saw_check = false;
    for _ in 0..3 {
        if !decoder.can_decode() {
            return None;
        }
        let insn = decoder.decode();
        match insn.mnemonic() {
            Mnemonic::Lea if insn.op0_register() == Register::R12 => {}
            Mnemonic::Cmp
                if insn.op_count() == 2
                    && insn.op1_kind() == OpKind::Memory
                    && insn.memory_base() == Register::R14
                    && insn.memory_displacement64() == STACKGUARD0 =>
            {
                saw_check = true;
            }
            Mnemonic::Jbe if saw_check => return Some(insn.next_ip()),
            _ => return None,
        }
    }
    None
}

/// Addresses of every RET in `code`, which starts at virtual address `addr`.
/// Fails on bytes that do not decode (the function is then not hooked at all).
pub fn ret_addresses(code: &[u8], addr: u64) -> Result<Vec<u64>, String> {
    let mut decoder = Decoder::with_ip(64, code, addr, DecoderOptions::NONE);
    let mut rets = Vec::new();
    while decoder.can_decode() {
        let insn = decoder.decode();
        if insn.is_invalid() {
            // Go pads functions with INT3; anything else undecodable is a real problem.
            return Err(format!("invalid instruction at {:#x}", insn.ip()));
        }
        if matches!(insn.mnemonic(), Mnemonic::Ret | Mnemonic::Retf) {
            rets.push(insn.ip());
        }
    }
    Ok(rets)
}

/// General-purpose registers a uprobe program can read by index (`TargetConfig::tls_c_reg`
/// and the kernel's `reg_by_index`): the order matters to both.
pub const GPR_ORDER: [Register; 13] = [
    Register::RAX,
    Register::RBX,
    Register::RCX,
    Register::RDX,
    Register::RSI,
    Register::RDI,
    Register::R8,
    Register::R9,
    Register::R10,
    Register::R11,
    Register::R12,
    Register::R13,
    Register::R15,
];

/// For every direct CALL to `target` in `code` (at `addr`): the register that holds the
/// address of a struct at that CALL, proven by an earlier access `[R + disp]` with `disp` in
/// `fields` (a member of that struct), with no write to R in between and no branch landing
/// between the access and the CALL. None for a CALL where that cannot be shown.
pub fn call_base_register(code: &[u8], addr: u64, target: u64, fields: Range<u64>) -> Result<Vec<(u64, Option<Register>)>, String> {
    let mut decoder = Decoder::with_ip(64, code, addr, DecoderOptions::NONE);
    let mut insns: Vec<Instruction> = Vec::new();
    let mut landings = HashSet::new();
    while decoder.can_decode() {
        let insn = decoder.decode();
        if insn.is_invalid() {
            return Err(format!("invalid instruction at {:#x}", insn.ip()));
        }
        if matches!(insn.flow_control(), FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch) && insn.op0_kind() == OpKind::NearBranch64 {
            landings.insert(insn.near_branch_target());
        }
        insns.push(insn);
    }
    let mut info = InstructionInfoFactory::new();
    // A CALL clobbers every register (Go's ABI has no callee-saved ones).
    let mut writes = |insn: &Instruction, reg: Register| {
        insn.mnemonic() == Mnemonic::Call
            || info.info(insn).used_registers().iter().any(|u| {
                u.register().full_register() == reg
                    && matches!(u.access(), OpAccess::Write | OpAccess::ReadWrite | OpAccess::CondWrite | OpAccess::ReadCondWrite)
            })
    };
    let mut out = Vec::new();
    for (k, call) in insns.iter().enumerate() {
        if !(call.mnemonic() == Mnemonic::Call && call.op0_kind() == OpKind::NearBranch64 && call.near_branch_target() == target) {
            continue;
        }
        let mut found = None;
        // Walk back from the CALL over at most 32 straight-line instructions.
        for j in (k.saturating_sub(32)..k).rev() {
            if landings.contains(&insns[j + 1].ip()) {
                break;
            }
            let insn = &insns[j];
            let base = insn.memory_base();
            let is_access = (0..insn.op_count()).any(|o| insn.op_kind(o) == OpKind::Memory)
                && GPR_ORDER.contains(&base)
                && insn.memory_index() == Register::None
                && fields.contains(&insn.memory_displacement64());
            if is_access && !writes(insn, base) && !insns[j + 1..k].iter().any(|i| writes(i, base)) {
                found = Some(base);
                break;
            }
        }
        out.push((call.ip(), found));
    }
    Ok(out)
}

/// Every direct CALL in `code` (at virtual address `addr`): (address of the CALL, target).
pub fn calls(code: &[u8], addr: u64) -> Result<Vec<(u64, u64)>, String> {
    let mut decoder = Decoder::with_ip(64, code, addr, DecoderOptions::NONE);
    let mut out = Vec::new();
    while decoder.can_decode() {
        let insn = decoder.decode();
        if insn.is_invalid() {
            return Err(format!("invalid instruction at {:#x}", insn.ip()));
        }
        if insn.mnemonic() == Mnemonic::Call && insn.op0_kind() == OpKind::NearBranch64 {
            out.push((insn.ip(), insn.near_branch_target()));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_rets_not_c3_bytes() {
        // mov eax, 0xc3c3c3c3 ; ret ; mov ecx, 1 ; ret ; int3
        let code = [0xb8, 0xc3, 0xc3, 0xc3, 0xc3, 0xc3, 0xb9, 1, 0, 0, 0, 0xc3, 0xcc];
        assert_eq!(ret_addresses(&code, 0x1000).unwrap(), vec![0x1005, 0x100b]);
    }

    #[test]
    fn finds_the_end_of_the_stack_check() {
        // Go 1.27 serverHandler.ServeHTTP: CMPQ SP, 0x10(R14); JBE; PUSHQ BP
        let small = [0x49, 0x3b, 0x66, 0x10, 0x0f, 0x86, 0x8a, 0, 0, 0, 0x55];
        assert_eq!(after_stack_check(&small, 0x6262e0), Some(0x6262ea));
        // (*conn).serve: LEAQ -0x418(SP), R12; CMPQ R12, 0x10(R14); JBE; PUSHQ BP
        let big = [0x4c, 0x8d, 0xa4, 0x24, 0xe8, 0xfb, 0xff, 0xff, 0x4d, 0x3b, 0x66, 0x10, 0x0f, 0x86, 0xc1, 0x18, 0, 0, 0x55];
        assert_eq!(after_stack_check(&big, 0x61c460), Some(0x61c472));
        // No check (a leaf function): probe the entry.
        assert_eq!(after_stack_check(&[0x55, 0x48, 0x89, 0xe5, 0xc3], 0x1000), None);
    }

    #[test]
    fn finds_direct_calls() {
        // call +0 (to 0x1005); call rax; nop
        let code = [0xe8, 0, 0, 0, 0, 0xff, 0xd0, 0x90];
        assert_eq!(calls(&code, 0x1000).unwrap(), vec![(0x1000, 0x1005)]);
    }

    #[test]
    fn reports_garbage() {
        // nop; push es (not encodable in 64-bit mode)
        assert!(ret_addresses(&[0x90, 0x06], 0).is_err());
    }
}
