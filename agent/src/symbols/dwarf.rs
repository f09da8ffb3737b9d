//! Go struct layouts from an executable's DWARF: member offsets of the runtime and net/http
//! structures zerotrace reads, and the runtime type descriptors of a few pointer types
//! (DW_AT_go_runtime_type, an offset from the start of the module's types).
use std::{borrow::Cow, collections::HashMap};

use gimli::{AttributeValue, EndianSlice, LittleEndian};

use super::{Executable, SymbolError};

/// Go's vendor attribute holding a type's runtime descriptor offset.
const DW_AT_GO_RUNTIME_TYPE: gimli::DwAt = gimli::DwAt(0x2904);

/// Members found for each wanted struct, and runtime type offsets of wanted types.
#[derive(Debug, Default)]
pub struct GoDwarf {
    structs: HashMap<String, HashMap<String, u64>>,
    runtime_types: HashMap<String, u64>,
}

impl GoDwarf {
    /// Offset of `member` in struct `ty`, e.g. ("net/http.conn", "rwc").
    pub fn member(&self, ty: &str, member: &str) -> Option<u64> {
        self.structs.get(ty)?.get(member).copied()
    }

    pub fn has_struct(&self, ty: &str) -> bool {
        self.structs.contains_key(ty)
    }

    /// Offset of the runtime type descriptor of `ty` from the module's types start.
    pub fn runtime_type(&self, ty: &str) -> Option<u64> {
        self.runtime_types.get(ty).copied()
    }

    /// Reads the DWARF of `exe`, keeping only the structs and types asked for.
    pub fn load(exe: &Executable, structs: &[&str], types: &[&str]) -> Result<Self, SymbolError> {
        let missing = |what: &str| SymbolError::MissingDwarf { path: exe.path.clone(), what: what.to_owned(), hint: super::STRIPPED_HINT };
        if exe.section(".debug_info").is_none_or(|s| s.is_empty()) {
            return Err(missing("a .debug_info section"));
        }
        let sections = gimli::DwarfSections::load(|id| -> Result<Cow<'_, [u8]>, gimli::Error> { Ok(exe.section(id.name()).unwrap_or(Cow::Borrowed(&[]))) })
            .map_err(|e| missing(&format!("readable DWARF ({e})")))?;
        let dwarf = sections.borrow(|s| EndianSlice::new(s, LittleEndian));
        let mut out = GoDwarf::default();
        let mut units = dwarf.units();
        while let Ok(Some(header)) = units.next() {
            let Ok(unit) = dwarf.unit(header) else { continue };
            let mut entries = unit.entries();
            // The struct whose members we are collecting, with its depth.
            let mut current: Option<(String, isize)> = None;
            while let Ok(Some(entry)) = entries.next_dfs() {
                let depth = entry.depth();
                if let Some((_, d)) = &current
                    && depth <= *d
                {
                    current = None;
                }
                match entry.tag() {
                    gimli::DW_TAG_structure_type => {
                        let Some(name) = name_of(&dwarf, &unit, entry) else { continue };
                        if structs.contains(&name.as_str()) && !out.structs.contains_key(&name) {
                            out.structs.insert(name.clone(), HashMap::new());
                            current = Some((name, depth));
                        }
                    }
                    gimli::DW_TAG_member => {
                        let Some((ty, _)) = &current else { continue };
                        let Some(name) = name_of(&dwarf, &unit, entry) else { continue };
                        let off = match entry.attr_value(gimli::DW_AT_data_member_location) {
                            Some(AttributeValue::Udata(off)) => Some(off),
                            Some(v) => v.udata_value(),
                            None => None,
                        };
                        if let Some(off) = off {
                            out.structs.entry(ty.clone()).or_default().insert(name, off);
                        }
                    }
                    gimli::DW_TAG_pointer_type => {
                        let Some(name) = name_of(&dwarf, &unit, entry) else { continue };
                        if types.contains(&name.as_str()) {
                            let off = match entry.attr_value(DW_AT_GO_RUNTIME_TYPE) {
                                Some(AttributeValue::Addr(a)) => Some(a),
                                Some(v) => v.udata_value(),
                                None => None,
                            };
                            if let Some(off) = off {
                                out.runtime_types.insert(name, off);
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(out)
    }
}

fn name_of<R: gimli::Reader<Offset = usize>>(dwarf: &gimli::Dwarf<R>, unit: &gimli::Unit<R>, entry: &gimli::DebuggingInformationEntry<R>) -> Option<String> {
    let attr = entry.attr_value(gimli::DW_AT_name)?;
    let s = dwarf.attr_string(unit, attr).ok()?;
    Some(s.to_string_lossy().ok()?.into_owned())
}
