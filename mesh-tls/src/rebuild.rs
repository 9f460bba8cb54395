//! A TLS configuration built from its certificate sources and rebuilt by
//! the first handshake after an SDS secret it depends on changed (the
//! [`crate::secret::Sources`] generation moved). Handshakes read the
//! current configuration without locking; one rebuild runs at a time, and
//! a rebuild that fails keeps the previous configuration serving.

use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::TlsError;

#[derive(Debug)]
struct Built<T> {
    generation: u64,
    config: Result<T, TlsError>,
}

/// The configuration of one TLS context and the source generation it was
/// built for.
#[derive(Debug)]
pub(crate) struct Rebuilt<T> {
    built: ArcSwap<Built<T>>,
    rebuilding: Mutex<()>,
    /// What the configuration is, for the log line of a failed rebuild.
    what: &'static str,
}

impl<T: Clone> Rebuilt<T> {
    /// Nothing built yet; [`Rebuilt::first`] stores the first build.
    pub(crate) fn unbuilt(what: &'static str) -> Self {
        Rebuilt {
            built: ArcSwap::from_pointee(Built {
                generation: u64::MAX,
                config: Err(TlsError::Invalid("not built".into())),
            }),
            rebuilding: Mutex::new(()),
            what,
        }
    }

    /// Stores the first build, made at `generation`. An invalid
    /// configuration is an error; any other failure (an SDS secret not
    /// received yet) is kept, and retried once the sources change.
    pub(crate) fn first(
        &self,
        generation: u64,
        config: Result<T, TlsError>,
    ) -> Result<(), TlsError> {
        if let Err(e @ TlsError::Invalid(_)) = &config {
            return Err(e.clone());
        }
        self.built.store(Arc::new(Built { generation, config }));
        Ok(())
    }

    /// `pick` of the configuration for the sources at `generation`, built
    /// again with `build` first when the stored one is older.
    pub(crate) fn get<R>(
        &self,
        generation: u64,
        build: impl FnOnce() -> Result<T, TlsError>,
        pick: impl Fn(&T) -> R,
    ) -> Result<R, TlsError> {
        let built = self.built.load();
        if built.generation == generation {
            return built.config.as_ref().map(&pick).map_err(Clone::clone);
        }
        let _guard = self.rebuilding.lock().unwrap_or_else(|e| e.into_inner());
        let built = self.built.load();
        if built.generation == generation {
            return built.config.as_ref().map(&pick).map_err(Clone::clone);
        }
        let config = match (build(), &built.config) {
            (Ok(c), _) => Ok(c),
            (Err(e), Ok(old)) => {
                tracing::error!(error = %e, "{} could not be rebuilt; the previous certificate keeps serving", self.what);
                Ok(old.clone())
            }
            (Err(e), Err(_)) => Err(e),
        };
        let picked = config.as_ref().map(&pick).map_err(Clone::clone);
        self.built.store(Arc::new(Built { generation, config }));
        picked
    }
}
