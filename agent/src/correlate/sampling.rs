//! Which traces are kept (`OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`). A decision is a
//! function of the trace id (as the OpenTelemetry SDKs' TraceIdRatioBased: the last 8 bytes
//! of the id, shifted right by one, against ratio x 2^63), so every span of a trace gets the
//! same one, in every process and in every agent that uses the same rule. Parent-based
//! samplers follow the sampled flag of an incoming traceparent instead, remembered per
//! trace when the request starts (its children end, and are decided, before it).
use std::collections::VecDeque;

use rustc_hash::FxHashMap as HashMap;

use crate::spans::TraceId;

/// Traces whose incoming sampled flag is remembered, at most.
/// (Below half of the table it grows to: `traces::MAX_REMEMBERED` says why.)
pub const MAX_REMOTE_DECISIONS: usize = 49_152;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Sampler {
    AlwaysOn,
    AlwaysOff,
    /// Keep this fraction of traces (0..=1).
    TraceIdRatio(f64),
    /// Follow an incoming traceparent's sampled flag; else the inner rule.
    ParentBased(Root),
}

/// The rule parent-based samplers apply to traces that start here.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Root {
    AlwaysOn,
    AlwaysOff,
    TraceIdRatio(f64),
}

/// The names OTEL_TRACES_SAMPLER accepts here.
pub const NAMES: &str = "always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off or parentbased_traceidratio";

impl Sampler {
    /// From OTEL_TRACES_SAMPLER and its argument (the ratio, default 1.0). Err: which of the
    /// two is wrong.
    pub fn parse(name: &str, arg: Option<&str>) -> Result<Self, (&'static str, &'static str)> {
        let ratio = || -> Result<f64, (&'static str, &'static str)> {
            match arg {
                None => Ok(1.0),
                Some(a) => match a.trim().parse::<f64>() {
                    Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
                    _ => Err(("OTEL_TRACES_SAMPLER_ARG", "a number from 0 to 1")),
                },
            }
        };
        Ok(match name.trim() {
            "always_on" => Sampler::AlwaysOn,
            "always_off" => Sampler::AlwaysOff,
            "traceidratio" => Sampler::TraceIdRatio(ratio()?),
            "parentbased_always_on" => Sampler::ParentBased(Root::AlwaysOn),
            "parentbased_always_off" => Sampler::ParentBased(Root::AlwaysOff),
            "parentbased_traceidratio" => Sampler::ParentBased(Root::TraceIdRatio(ratio()?)),
            _ => return Err(("OTEL_TRACES_SAMPLER", NAMES)),
        })
    }
}

/// A ratio rule on a trace id.
pub fn ratio_keeps(ratio: f64, t: &TraceId) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    if ratio <= 0.0 {
        return false;
    }
    zerotrace_common::trace_id_ratio_keeps(&t.0, ratio_bound(ratio))
}

/// The bound a ratio rule compares a trace id's last 8 bytes (shifted right by one) with;
/// the kernel applies the same bound to the traceparents it writes.
pub fn ratio_bound(ratio: f64) -> u64 {
    (ratio * (1u64 << 63) as f64) as u64
}

impl Sampler {
    /// The rule as the kernel applies it to the sampled flag of the traceparents it writes
    /// (`zerotrace_common::sampler_mode`, ratio bound): the same decision as `keeps`.
    pub fn kernel_rule(self) -> (u32, u64) {
        use zerotrace_common::sampler_mode as m;
        let ratio = |r: f64| -> (u32, u64) {
            if r >= 1.0 {
                (m::ALWAYS_ON, 0)
            } else if r <= 0.0 {
                (m::ALWAYS_OFF, 0)
            } else {
                (m::RATIO, ratio_bound(r))
            }
        };
        let root = |r: Root| match r {
            Root::AlwaysOn => (m::ALWAYS_ON, 0),
            Root::AlwaysOff => (m::ALWAYS_OFF, 0),
            Root::TraceIdRatio(r) => ratio(r),
        };
        match self {
            Sampler::AlwaysOn => (m::ALWAYS_ON, 0),
            Sampler::AlwaysOff => (m::ALWAYS_OFF, 0),
            Sampler::TraceIdRatio(r) => ratio(r),
            Sampler::ParentBased(r) => {
                let (mode, bound) = root(r);
                (mode | m::PARENT_BASED, bound)
            }
        }
    }
}

/// The sampler with what it remembers of incoming decisions.
#[derive(Debug)]
pub struct Sampling {
    pub sampler: Sampler,
    remote: HashMap<TraceId, bool>,
    order: VecDeque<TraceId>,
    /// Spans dropped by the sampler.
    pub dropped: u64,
}

impl Sampling {
    pub fn new(sampler: Sampler) -> Self {
        Self { sampler, remote: HashMap::default(), order: VecDeque::new(), dropped: 0 }
    }

    /// An incoming traceparent put a request in trace `t` with this sampled flag.
    pub fn remote_decision(&mut self, t: TraceId, sampled: bool) {
        if !matches!(self.sampler, Sampler::ParentBased(_)) {
            return;
        }
        if self.remote.insert(t, sampled).is_none() {
            self.order.push_back(t);
            while self.order.len() > MAX_REMOTE_DECISIONS {
                if let Some(old) = self.order.pop_front() {
                    self.remote.remove(&old);
                }
            }
        }
    }

    /// Whether spans of trace `t` are kept.
    pub fn keeps(&self, t: &TraceId) -> bool {
        match self.sampler {
            Sampler::AlwaysOn => true,
            Sampler::AlwaysOff => false,
            Sampler::TraceIdRatio(r) => ratio_keeps(r, t),
            Sampler::ParentBased(root) => match self.remote.get(t) {
                Some(s) => *s,
                None => match root {
                    Root::AlwaysOn => true,
                    Root::AlwaysOff => false,
                    Root::TraceIdRatio(r) => ratio_keeps(r, t),
                },
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_keep_about_their_share_and_whole_traces() {
        for ratio in [0.01, 0.25, 0.5, 0.9] {
            let n = 20_000;
            let kept = (0..n).filter(|_| ratio_keeps(ratio, &TraceId::random())).count() as f64;
            // Binomial: 6 standard deviations either side.
            let sd = (n as f64 * ratio * (1.0 - ratio)).sqrt();
            assert!((kept - n as f64 * ratio).abs() < 6.0 * sd, "ratio {ratio}: kept {kept} of {n}");
        }
        let t = TraceId::random();
        assert_eq!(ratio_keeps(0.5, &t), ratio_keeps(0.5, &t), "a decision is a function of the trace id");
        assert!(ratio_keeps(1.0, &t) && !ratio_keeps(0.0, &t));
        // Monotone: what a smaller ratio keeps, a larger one keeps too.
        for _ in 0..1000 {
            let t = TraceId::random();
            assert!(!ratio_keeps(0.2, &t) || ratio_keeps(0.6, &t));
        }
    }

    #[test]
    fn parent_based_follows_the_incoming_flag() {
        let mut s = Sampling::new(Sampler::ParentBased(Root::TraceIdRatio(0.0)));
        let (yes, no, local) = (TraceId([1; 16]), TraceId([2; 16]), TraceId([3; 16]));
        s.remote_decision(yes, true);
        s.remote_decision(no, false);
        assert!(s.keeps(&yes));
        assert!(!s.keeps(&no));
        assert!(!s.keeps(&local), "a trace that starts here: the root rule (ratio 0)");
        let mut on = Sampling::new(Sampler::ParentBased(Root::AlwaysOn));
        on.remote_decision(no, false);
        assert!(!on.keeps(&no) && on.keeps(&local));
        let mut plain = Sampling::new(Sampler::TraceIdRatio(1.0));
        plain.remote_decision(no, false);
        assert!(plain.keeps(&no), "non-parent-based samplers ignore the flag");
    }

    /// The kernel decides the sampled flag of the headers it writes as the agent decides
    /// which traces it keeps.
    #[test]
    fn the_kernels_rule_is_the_agents() {
        use zerotrace_common::{sampler_mode as m, trace_id_ratio_keeps};
        assert_eq!(Sampler::AlwaysOn.kernel_rule(), (m::ALWAYS_ON, 0));
        assert_eq!(Sampler::AlwaysOff.kernel_rule().0, m::ALWAYS_OFF);
        assert_eq!(Sampler::TraceIdRatio(1.0).kernel_rule().0, m::ALWAYS_ON);
        assert_eq!(Sampler::TraceIdRatio(0.0).kernel_rule().0, m::ALWAYS_OFF);
        assert_eq!(Sampler::ParentBased(Root::AlwaysOff).kernel_rule().0, m::ALWAYS_OFF | m::PARENT_BASED);
        for ratio in [0.01, 0.3, 0.75] {
            let (mode, bound) = Sampler::TraceIdRatio(ratio).kernel_rule();
            assert_eq!(mode, m::RATIO);
            assert_eq!(Sampler::ParentBased(Root::TraceIdRatio(ratio)).kernel_rule(), (m::RATIO | m::PARENT_BASED, bound));
            for _ in 0..2000 {
                let t = TraceId::random();
                assert_eq!(trace_id_ratio_keeps(&t.0, bound), ratio_keeps(ratio, &t));
            }
        }
    }

    #[test]
    fn settings_are_checked() {
        assert_eq!(Sampler::parse("traceidratio", Some("0.25")), Ok(Sampler::TraceIdRatio(0.25)));
        assert_eq!(Sampler::parse("parentbased_traceidratio", None), Ok(Sampler::ParentBased(Root::TraceIdRatio(1.0))));
        assert_eq!(Sampler::parse("always_off", Some("junk")), Ok(Sampler::AlwaysOff), "the argument is only read by ratio samplers");
        assert_eq!(Sampler::parse("traceidratio", Some("2")).unwrap_err().0, "OTEL_TRACES_SAMPLER_ARG");
        assert_eq!(Sampler::parse("jaeger_remote", None).unwrap_err().0, "OTEL_TRACES_SAMPLER");
    }
}
