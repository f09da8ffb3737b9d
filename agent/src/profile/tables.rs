//! The tables every profile format builds the same way (pprof's `profile.proto` and OTLP
//! profiles' dictionary): strings, functions, mappings and locations, each entry once. Both
//! formats number them alike: string 0 is "", and function, mapping and location ids start
//! at 1 (pprof's ids; OTLP's indices into tables whose entry 0 is the zero value).
use std::collections::HashMap;

use super::model::Location;

/// A function: its name and file as string indices (0: no file).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Function {
    pub name: usize,
    pub file: usize,
}

/// A binary, with the address range its locations span and what its locations carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping<'a> {
    /// File name (string index) and build id (hex GNU or Go build id, empty when unknown).
    pub file: usize,
    pub build_id: &'a str,
    pub memory_start: u64,
    pub memory_limit: u64,
    pub has_functions: bool,
    pub has_filenames: bool,
    pub has_line_numbers: bool,
    pub has_inline_frames: bool,
}

/// A symbolized address: its mapping id and its lines (function id, line), innermost first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocationEntry {
    pub mapping: usize,
    pub address: u64,
    pub kernel: bool,
    pub lines: Vec<(usize, u32)>,
}

pub struct Tables<'a> {
    pub strings: Vec<String>,
    string_ix: HashMap<String, usize>,
    pub functions: Vec<Function>,
    function_ix: HashMap<(usize, usize), usize>,
    pub mappings: Vec<Mapping<'a>>,
    mapping_ix: HashMap<(bool, &'a str, &'a str), usize>,
    pub locations: Vec<LocationEntry>,
    location_ix: HashMap<&'a Location, usize>,
}

impl Default for Tables<'_> {
    fn default() -> Self {
        Tables {
            strings: vec![String::new()],
            string_ix: HashMap::from([(String::new(), 0)]),
            functions: Vec::new(),
            function_ix: HashMap::new(),
            mappings: Vec::new(),
            mapping_ix: HashMap::new(),
            locations: Vec::new(),
            location_ix: HashMap::new(),
        }
    }
}

impl<'a> Tables<'a> {
    /// The index of string `s`.
    pub fn str(&mut self, s: &str) -> usize {
        if let Some(&i) = self.string_ix.get(s) {
            return i;
        }
        let i = self.strings.len();
        self.strings.push(s.to_owned());
        self.string_ix.insert(s.to_owned(), i);
        i
    }

    /// The id of function `name` in `file`.
    pub fn function(&mut self, name: &str, file: Option<&str>) -> usize {
        let key = (self.str(name), file.map_or(0, |f| self.str(f)));
        if let Some(&id) = self.function_ix.get(&key) {
            return id;
        }
        self.functions.push(Function { name: key.0, file: key.1 });
        let id = self.functions.len();
        self.function_ix.insert(key, id);
        id
    }

    /// The id of the mapping `loc` lies in; its range grows to cover `loc`.
    pub fn mapping(&mut self, loc: &'a Location) -> usize {
        let key = (loc.kernel, &*loc.module, &*loc.build_id);
        let id = match self.mapping_ix.get(&key) {
            Some(&id) => id,
            None => {
                let file = self.str(&loc.module);
                self.mappings.push(Mapping {
                    file,
                    build_id: &loc.build_id,
                    memory_start: loc.address,
                    memory_limit: loc.address.saturating_add(1),
                    has_functions: false,
                    has_filenames: false,
                    has_line_numbers: false,
                    has_inline_frames: false,
                });
                let id = self.mappings.len();
                self.mapping_ix.insert(key, id);
                id
            }
        };
        let m = &mut self.mappings[id - 1];
        m.memory_start = m.memory_start.min(loc.address);
        m.memory_limit = m.memory_limit.max(loc.address.saturating_add(1));
        m.has_functions |= !loc.lines.is_empty();
        m.has_filenames |= loc.lines.iter().any(|l| l.file.is_some());
        m.has_line_numbers |= loc.lines.iter().any(|l| l.line != 0);
        m.has_inline_frames |= loc.lines.len() > 1;
        id
    }

    /// The id of location `loc` (with its mapping and functions).
    pub fn location(&mut self, loc: &'a Location) -> usize {
        if let Some(&id) = self.location_ix.get(loc) {
            return id;
        }
        let mapping = self.mapping(loc);
        let lines = loc.lines.iter().map(|l| (self.function(&l.function, l.file.as_deref()), l.line)).collect();
        self.locations.push(LocationEntry { mapping, address: loc.address, kernel: loc.kernel, lines });
        let id = self.locations.len();
        self.location_ix.insert(loc, id);
        id
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::profile::model::Line;

    fn loc(address: u64, module: &str, lines: &[(&str, u32)]) -> Location {
        Location {
            address,
            module: module.into(),
            build_id: "ab".into(),
            lines: lines.iter().map(|(f, l)| Line { function: Arc::from(*f), file: Some("a.rs".into()), line: *l }).collect(),
            kernel: false,
        }
    }

    #[test]
    fn each_entry_once_numbered_from_one() {
        let (a, b, c) = (loc(0x20, "bin", &[("f", 1), ("g", 2)]), loc(0x10, "bin", &[("g", 3)]), loc(0x30, "lib", &[]));
        let mut t = Tables::default();
        assert_eq!(t.str(""), 0);
        assert_eq!([t.location(&a), t.location(&b), t.location(&a), t.location(&c)], [1, 2, 1, 3]);
        assert_eq!(t.functions.len(), 2, "f and g");
        assert_eq!(t.mappings.len(), 2);
        let m = &t.mappings[0];
        assert_eq!((m.memory_start, m.memory_limit), (0x10, 0x21), "the range covers both locations");
        assert!(m.has_functions && m.has_filenames && m.has_line_numbers && m.has_inline_frames);
        assert!(!t.mappings[1].has_functions);
        assert_eq!(t.locations[1].lines, vec![(2, 3)], "g is function 2");
    }
}
