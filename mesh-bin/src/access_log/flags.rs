//! The response flags of one stream. Envoy sets several on some streams
//! (`URX,UF` when retries end on a connect failure, `DI,FI` for a delayed
//! abort, `UF,URX` for a TCP proxy's failed connect) and writes them
//! comma-separated in the order they were set.

use mesh_core::flags::ResponseFlag;

/// How many flags a stream may carry (Envoy's streams carry a few).
const MAX: usize = 6;

/// Response flags in the order they were set, each once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlagSet([Option<ResponseFlag>; MAX]);

impl FlagSet {
    /// The set holding `flag`, if any.
    pub fn of(flag: Option<ResponseFlag>) -> Self {
        let mut s = FlagSet::default();
        if let Some(f) = flag {
            s.insert(f);
        }
        s
    }

    /// Adds `flag` after the others (a flag already set keeps its place).
    pub fn insert(&mut self, flag: ResponseFlag) {
        if self.contains(flag) {
            return;
        }
        if let Some(slot) = self.0.iter_mut().find(|f| f.is_none()) {
            *slot = Some(flag);
        }
    }

    /// This set's flags, then `other`'s.
    pub fn union(mut self, other: FlagSet) -> FlagSet {
        for f in other.iter() {
            self.insert(f);
        }
        self
    }

    /// Whether `flag` is in the set.
    pub fn contains(self, flag: ResponseFlag) -> bool {
        self.0.contains(&Some(flag))
    }

    /// Whether no flag is set.
    pub fn is_empty(self) -> bool {
        self.0[0].is_none()
    }

    /// The flags, in the order they were set.
    pub fn iter(self) -> impl Iterator<Item = ResponseFlag> {
        self.0.into_iter().map_while(|f| f)
    }

    /// Writes the flags comma-separated, in the order they were set.
    pub fn write(self, w: &mut impl std::fmt::Write) -> std::fmt::Result {
        for (i, f) in self.iter().enumerate() {
            if i > 0 {
                w.write_char(',')?;
            }
            w.write_str(f.as_str())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: FlagSet) -> String {
        let mut out = String::new();
        let _ = s.write(&mut out);
        out
    }

    #[test]
    fn written_in_the_order_set() {
        let mut s = FlagSet::of(Some(ResponseFlag::UpstreamRetryLimitExceeded));
        s.insert(ResponseFlag::UpstreamConnectionFailure);
        assert_eq!(text(s), "URX,UF");
        let s = FlagSet::of(Some(ResponseFlag::DelayInjected))
            .union(FlagSet::of(Some(ResponseFlag::FaultInjected)));
        assert_eq!(text(s), "DI,FI");
        let mut s = FlagSet::of(Some(ResponseFlag::UpstreamConnectionFailure));
        s.insert(ResponseFlag::UpstreamRetryLimitExceeded);
        s.insert(ResponseFlag::UpstreamConnectionFailure);
        assert_eq!(text(s), "UF,URX");
        assert!(s.contains(ResponseFlag::UpstreamRetryLimitExceeded));
        assert!(!s.contains(ResponseFlag::DelayInjected));
        assert!(FlagSet::of(None).is_empty());
        assert_eq!(text(FlagSet::default()), "");
    }

    #[test]
    fn a_full_set_keeps_the_first_flags() {
        let mut s = FlagSet::default();
        for f in ResponseFlag::ALL {
            s.insert(f);
        }
        assert_eq!(s.iter().count(), MAX);
        assert_eq!(s.iter().next(), Some(ResponseFlag::ALL[0]));
    }
}
