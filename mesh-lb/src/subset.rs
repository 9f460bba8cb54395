//! Subset load balancing (Envoy's `lb_subset_config`): endpoints are
//! grouped by the values of the metadata keys named in each
//! `subset_selectors[].keys` (from `filter_metadata["envoy.lb"]`), and a
//! request's `metadata_match` names the subset by exactly those keys and
//! values. A request with no `metadata_match`, or one that names no
//! existing subset, gets the `fallback_policy`: nothing (`NO_FALLBACK`, the
//! default, 503 `UH`), any endpoint (`ANY_ENDPOINT`), or the endpoints whose
//! metadata contains `default_subset` (`DEFAULT_SUBSET`). Each subset has
//! its own priority levels, panic mode and balancer state.

use std::collections::HashMap;
use std::sync::Arc;

use mesh_core::config::{LbMetadata, SubsetConfig};

use crate::priority::HostGroup;
use crate::{Endpoint, Settings};

/// Every subset of an endpoint set.
#[derive(Debug)]
pub(crate) struct Subsets {
    map: HashMap<LbMetadata, HostGroup>,
    /// The `DEFAULT_SUBSET` endpoints.
    default: Option<HostGroup>,
}

fn contains(e: &Endpoint, wanted: &LbMetadata) -> bool {
    wanted.iter().all(|(k, v)| e.metadata.get(k) == Some(v))
}

impl Subsets {
    pub(crate) fn build(hosts: &[Arc<Endpoint>], cfg: &SubsetConfig, s: &Settings) -> Subsets {
        let mut groups: HashMap<LbMetadata, Vec<Arc<Endpoint>>> = HashMap::new();
        let mut selectors = cfg.selectors.clone();
        selectors.sort();
        selectors.dedup();
        for keys in &selectors {
            for h in hosts {
                let mut key = LbMetadata::new();
                for k in keys {
                    match h.metadata.get(k) {
                        Some(v) => {
                            key.insert(k.clone(), v.clone());
                        }
                        None => break,
                    }
                }
                if key.len() == keys.len() && !keys.is_empty() {
                    groups.entry(key).or_default().push(h.clone());
                }
            }
        }
        let map = groups
            .into_iter()
            .map(|(k, v)| (k, HostGroup::build(&v, s)))
            .collect();
        let default = (cfg.fallback_policy == mesh_core::config::SubsetFallback::DefaultSubset)
            .then(|| {
                let v: Vec<_> = hosts
                    .iter()
                    .filter(|h| contains(h, &cfg.default_subset))
                    .cloned()
                    .collect();
                HostGroup::build(&v, s)
            });
        Subsets { map, default }
    }

    /// The group a request with `metadata_match` picks from, if any.
    pub(crate) fn find(&self, metadata_match: Option<&LbMetadata>) -> Option<&HostGroup> {
        metadata_match
            .filter(|m| !m.is_empty())
            .and_then(|m| self.map.get(m))
            .filter(|g| !g.is_empty())
    }

    /// The `DEFAULT_SUBSET` group.
    pub(crate) fn default_group(&self) -> Option<&HostGroup> {
        self.default.as_ref()
    }
}
