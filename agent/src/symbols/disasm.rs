//! Finds the RET instructions of a function by decoding it (raw 0xC3 bytes also occur
//! inside other instructions). Uprobes on these addresses replace uretprobes, which would
//! corrupt Go programs because goroutine stacks move.
use iced_x86::{Decoder, DecoderOptions, Mnemonic};

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
    fn reports_garbage() {
        // nop; push es (not encodable in 64-bit mode)
        assert!(ret_addresses(&[0x90, 0x06], 0).is_err());
    }
}
