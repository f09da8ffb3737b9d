//! Which trace each kernel-made span id belongs to. The kernel names spans (64-bit ids it
//! draws at a request's start or a client call's entry) and passes them between goroutines
//! and processes as parents; only the agent knows trace ids (random, or from an incoming
//! `traceparent`). A child's record always comes after its parent's start record in the
//! ring buffer, so the parent's trace is known when the child needs it, as long as it is
//! still remembered: entries are kept for a bounded number of spans (oldest forgotten
//! first); a child whose parent was forgotten starts a new trace (counted).
use std::collections::VecDeque;

use rustc_hash::FxHashMap as HashMap;

use crate::spans::{SpanId, TraceId};

/// Span ids remembered, at most (about 40 bytes each). A hash table kept at its bound by
/// insert-then-evict fills with deleted markers, and rebuilds in place only while at most
/// half full, else doubles: at 262,144 in a 524,288-bucket table it doubled once, after
/// ~2.4 M spans (the 10-minute soak's +14 MiB step at ~490 s). Now the table is made at its
/// final size (524,288 buckets) and the bound is 3/8 of it.
pub const MAX_REMEMBERED: usize = 196_608;
/// Trace aliases remembered, at most.
pub const MAX_ALIASES: usize = 49_152;

pub struct Traces {
    by_span: HashMap<u64, TraceId>,
    order: VecDeque<u64>,
    /// Children whose parent span was not (or no longer) known.
    pub parents_unknown: u64,
    /// `--inject-traceparent`: the kernel names a trace in the headers it writes before
    /// the agent has seen the request's own incoming traceparent (the kernel does not parse
    /// headers). Such a kernel trace id is an alias of the incoming one; a request arriving
    /// with the alias joins the real trace.
    pub record_aliases: bool,
    aliases: HashMap<TraceId, TraceId>,
    alias_order: VecDeque<TraceId>,
}

impl Default for Traces {
    /// The span table at the size it keeps (twice its bound): it never grows at run time.
    fn default() -> Self {
        Self {
            by_span: HashMap::with_capacity_and_hasher(2 * MAX_REMEMBERED, Default::default()),
            order: VecDeque::with_capacity(MAX_REMEMBERED + 1),
            parents_unknown: 0,
            record_aliases: false,
            aliases: HashMap::default(),
            alias_order: VecDeque::new(),
        }
    }
}

impl Traces {
    /// Span `span` belongs to `trace` (a later call for the same span updates it).
    pub fn remember(&mut self, span: u64, trace: TraceId) {
        if span == 0 {
            return;
        }
        if self.by_span.insert(span, trace).is_none() {
            self.order.push_back(span);
            while self.order.len() > MAX_REMEMBERED {
                if let Some(old) = self.order.pop_front() {
                    self.by_span.remove(&old);
                }
            }
        }
    }

    /// The trace and parent of a span whose kernel-reported parent is `parent` (0: none):
    /// the parent's trace when it is known, else a new trace without parent: the one the
    /// kernel drew for it (`kernel`, all zero: none), which is also the trace id any
    /// traceparent the kernel writes for it names.
    pub fn child_of(&mut self, parent: u64, kernel: [u8; 16]) -> (TraceId, Option<SpanId>) {
        if parent != 0 {
            if let Some(t) = self.by_span.get(&parent) {
                return (*t, Some(span_id(parent)));
            }
            self.parents_unknown += 1;
        }
        (if kernel == [0; 16] { TraceId::random() } else { TraceId(kernel) }, None)
    }

    /// The kernel gave a span trace `kernel`; the agent put it in trace `real` (from an
    /// incoming traceparent).
    pub fn alias(&mut self, kernel: [u8; 16], real: TraceId) {
        let k = TraceId(kernel);
        if !self.record_aliases || kernel == [0; 16] || k == real {
            return;
        }
        if self.aliases.insert(k, real).is_none() {
            self.alias_order.push_back(k);
            while self.alias_order.len() > MAX_ALIASES {
                if let Some(old) = self.alias_order.pop_front() {
                    self.aliases.remove(&old);
                }
            }
        }
    }

    /// The trace an incoming traceparent's trace id stands for.
    pub fn resolve(&self, t: TraceId) -> TraceId {
        self.aliases.get(&t).copied().unwrap_or(t)
    }

    /// The trace of a span the kernel made, when still remembered.
    pub fn trace_of(&self, span: u64) -> Option<TraceId> {
        self.by_span.get(&span).copied()
    }

    pub fn len(&self) -> usize {
        self.by_span.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_span.is_empty()
    }
}

/// The OpenTelemetry span id of a kernel-made span id.
pub fn span_id(kernel: u64) -> SpanId {
    SpanId(kernel.to_be_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_at_its_bound_never_grows_again() {
        let mut t = Traces::default();
        let trace = TraceId::random();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            // xorshift: span ids are random, as the kernel's are.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..MAX_REMEMBERED + 1 {
            t.remember(next(), trace);
        }
        let full = t.by_span.capacity();
        for _ in 0..12 * MAX_REMEMBERED {
            t.remember(next(), trace);
            assert!(t.by_span.capacity() <= full, "the span table grew after it was full");
        }
        // (Deleted markers lower the capacity it reports until it rebuilds in place; a
        // table that grew would report twice as much.)
        assert!(t.by_span.capacity() <= full, "the span table grew after it was full: {full} -> {}", t.by_span.capacity());
    }

    #[test]
    fn children_find_their_parents_trace_and_forgotten_parents_start_new_traces() {
        let mut t = Traces::default();
        let root = TraceId::random();
        t.remember(7, root);
        assert_eq!(t.child_of(7, [0; 16]), (root, Some(span_id(7))));
        assert_eq!(t.child_of(0, [0; 16]).1, None);
        assert_eq!(t.child_of(0, [9; 16]), (TraceId([9; 16]), None), "a new trace is the kernel's when it drew one");
        let (other, parent) = t.child_of(8, [0; 16]);
        assert_ne!(other, root);
        assert_eq!(parent, None);
        assert_eq!(t.parents_unknown, 1);
        for i in 100..100 + MAX_REMEMBERED as u64 {
            t.remember(i, root);
        }
        assert_eq!(t.len(), MAX_REMEMBERED);
        assert_eq!(t.child_of(7, [0; 16]).1, None, "oldest entries are forgotten first");
    }

    #[test]
    fn kernel_trace_ids_alias_incoming_ones_only_when_injecting() {
        let mut t = Traces::default();
        let real = TraceId([1; 16]);
        t.alias([2; 16], real);
        assert_eq!(t.resolve(TraceId([2; 16])), TraceId([2; 16]), "no aliases without injection");
        t.record_aliases = true;
        t.alias([2; 16], real);
        t.alias([0; 16], real);
        assert_eq!(t.resolve(TraceId([2; 16])), real);
        assert_eq!(t.resolve(TraceId([3; 16])), TraceId([3; 16]));
        for i in 0..MAX_ALIASES as u32 {
            let mut k = [9u8; 16];
            k[..4].copy_from_slice(&i.to_be_bytes());
            t.alias(k, real);
        }
        assert_eq!(t.resolve(TraceId([2; 16])), TraceId([2; 16]), "oldest aliases are forgotten first");
    }
}
