//! Which trace each kernel-made span id belongs to. The kernel names spans (64-bit ids it
//! draws at a request's start or a client call's entry) and passes them between goroutines
//! and processes as parents; only the agent knows trace ids (random, or from an incoming
//! `traceparent`). A child's record always comes after its parent's start record in the
//! ring buffer, so the parent's trace is known when the child needs it, as long as it is
//! still remembered: entries are kept for a bounded number of spans (oldest forgotten
//! first); a child whose parent was forgotten starts a new trace (counted).
use std::collections::{HashMap, VecDeque};

use crate::spans::{SpanId, TraceId};

/// Span ids remembered, at most (about 40 bytes each).
pub const MAX_REMEMBERED: usize = 262_144;

#[derive(Default)]
pub struct Traces {
    by_span: HashMap<u64, TraceId>,
    order: VecDeque<u64>,
    /// Children whose parent span was not (or no longer) known.
    pub parents_unknown: u64,
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
    /// the parent's trace when it is known, else a new trace without parent.
    pub fn child_of(&mut self, parent: u64) -> (TraceId, Option<SpanId>) {
        if parent != 0 {
            if let Some(t) = self.by_span.get(&parent) {
                return (*t, Some(span_id(parent)));
            }
            self.parents_unknown += 1;
        }
        (TraceId::random(), None)
    }

    pub fn len(&self) -> usize {
        self.by_span.len()
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
    fn children_find_their_parents_trace_and_forgotten_parents_start_new_traces() {
        let mut t = Traces::default();
        let root = TraceId::random();
        t.remember(7, root);
        assert_eq!(t.child_of(7), (root, Some(span_id(7))));
        assert_eq!(t.child_of(0).1, None);
        let (other, parent) = t.child_of(8);
        assert_ne!(other, root);
        assert_eq!(parent, None);
        assert_eq!(t.parents_unknown, 1);
        for i in 100..100 + MAX_REMEMBERED as u64 {
            t.remember(i, root);
        }
        assert_eq!(t.len(), MAX_REMEMBERED);
        assert_eq!(t.child_of(7).1, None, "oldest entries are forgotten first");
    }
}
