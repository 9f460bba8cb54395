//! The secret store: named certificates and trust bundles (Envoy SDS
//! secrets), published by any source and read by every TLS context that
//! names them.
//!
//! Sources call [`SecretStore::update`] with a typed
//! [`Secret`](mesh_core::config::tls::Secret): the file watcher
//! ([`crate::watch`]) today, the xDS SDS stream later, or a program's own
//! code ([`SecretStore::feed`] takes any `Stream` of secrets). Each update
//! is loaded and checked before it replaces anything; a bad one is refused
//! (logged, counted in `mesh_sds_update_rejected{secret}`) and the previous
//! version keeps serving. A good one bumps [`SecretStore::generation`], and
//! [`ServerTls`](crate::ServerTls) / [`ClientTls`](crate::ClientTls) rebuild
//! their configuration on their next handshake: new handshakes use the new
//! certificate at once, established connections are left alone.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::{Stream, StreamExt};
use mesh_core::config::tls::{Secret, SecretKind};
use mesh_core::stats::{Counter, Gauge, Store};

use crate::material::{LoadedCert, LoadedValidation};
use crate::TlsError;

/// A loaded, checked secret.
#[derive(Debug, Clone)]
pub enum LoadedSecret {
    /// A certificate chain with its key.
    Certificate(Arc<LoadedCert>),
    /// A trust bundle (and SAN matchers).
    Validation(Arc<LoadedValidation>),
}

#[derive(Debug, Clone)]
struct SecretStats {
    success: Counter,
    rejected: Counter,
    expiration: Gauge,
}

/// Named secrets shared by every TLS context of a proxy (or a program).
#[derive(Debug, Default)]
pub struct SecretStore {
    secrets: Mutex<HashMap<String, LoadedSecret>>,
    generation: AtomicU64,
    stats_store: Option<Store>,
    stats: Mutex<HashMap<String, SecretStats>>,
}

impl SecretStore {
    /// An empty store; with `stats`, per-secret stats are registered there.
    pub fn new(stats: Option<Store>) -> Arc<Self> {
        Arc::new(SecretStore {
            stats_store: stats,
            ..Default::default()
        })
    }

    fn stats(&self, name: &str) -> Option<SecretStats> {
        let store = self.stats_store.as_ref()?;
        let mut map = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        Some(
            map.entry(name.to_string())
                .or_insert_with(|| {
                    let l = vec![("secret", name.to_string())];
                    SecretStats {
                        success: store.counter("mesh_sds_update_success", &l),
                        rejected: store.counter("mesh_sds_update_rejected", &l),
                        expiration: store
                            .gauge("mesh_tls_certificate_expiration_unix_time_seconds", &l),
                    }
                })
                .clone(),
        )
    }

    /// Loads and checks `secret`, then publishes it under its name. On error
    /// the previous version (if any) stays, the error is logged and counted,
    /// and returned.
    pub fn update(&self, secret: &Secret) -> Result<(), TlsError> {
        let stats = self.stats(&secret.name);
        let loaded = match &secret.kind {
            SecretKind::TlsCertificate(c) => LoadedCert::load(c).map(|c| {
                if let Some(s) = &stats {
                    s.expiration.set(c.info.not_after);
                }
                LoadedSecret::Certificate(Arc::new(c))
            }),
            SecretKind::ValidationContext(v) => {
                LoadedValidation::load(v).map(|v| LoadedSecret::Validation(Arc::new(v)))
            }
        };
        match loaded {
            Ok(l) => {
                if let LoadedSecret::Certificate(c) = &l {
                    tracing::info!(secret = %secret.name, serial = %c.info.serial, "certificate loaded");
                } else {
                    tracing::info!(secret = %secret.name, "validation context loaded");
                }
                self.insert(&secret.name, l);
                if let Some(s) = stats {
                    s.success.inc();
                }
                Ok(())
            }
            Err(e) => {
                tracing::error!(secret = %secret.name, error = %e,
                    "secret update rejected; the previous version keeps serving");
                if let Some(s) = stats {
                    s.rejected.inc();
                }
                Err(e)
            }
        }
    }

    /// Publishes an already loaded secret.
    pub fn insert(&self, name: &str, secret: LoadedSecret) {
        self.secrets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), secret);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Removes a secret (handshakes needing it then fail until it returns).
    pub fn remove(&self, name: &str) {
        let removed = self
            .secrets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        if removed.is_some() {
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// The current version of a secret.
    pub fn get(&self, name: &str) -> Option<LoadedSecret> {
        self.secrets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// Changes every time a secret is published or removed.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Every secret, sorted by name.
    pub fn snapshot(&self) -> Vec<(String, LoadedSecret)> {
        let map = self.secrets.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = map.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Publishes every secret `updates` yields until it ends (bad ones are
    /// refused as in [`SecretStore::update`]).
    pub async fn feed<S: Stream<Item = Secret>>(self: Arc<Self>, updates: S) {
        futures::pin_mut!(updates);
        while let Some(s) = updates.next().await {
            let _ = self.update(&s);
        }
    }
}

/// Where a TLS context's certificate and validation come from: loaded once
/// (inline or files given in the context) or looked up in the store by name
/// (SDS), resolved again whenever the store's generation changes.
#[derive(Debug)]
pub(crate) struct Sources {
    cert: Option<CertRef>,
    validation: Option<ValRef>,
    secrets: Option<Arc<SecretStore>>,
}

#[derive(Debug)]
enum CertRef {
    Static(Arc<LoadedCert>),
    Sds(String),
}

#[derive(Debug)]
enum ValRef {
    Static(Arc<LoadedValidation>),
    Sds(String),
    Combined(Arc<LoadedValidation>, String),
}

impl Sources {
    pub(crate) fn new(
        common: &mesh_core::config::tls::CommonTlsContext,
        secrets: Option<Arc<SecretStore>>,
    ) -> Result<Self, TlsError> {
        use mesh_core::config::tls::ValidationSource;
        let cert = if let Some(c) = common.tls_certificates.first() {
            Some(CertRef::Static(Arc::new(LoadedCert::load(c).map_err(
                |e| TlsError::Invalid(format!("common_tls_context.tls_certificates[0]: {e}")),
            )?)))
        } else {
            common
                .tls_certificate_sds
                .first()
                .map(|s| CertRef::Sds(s.name.clone()))
        };
        let validation = match &common.validation {
            None => None,
            Some(ValidationSource::Static(v)) => Some(ValRef::Static(Arc::new(
                LoadedValidation::load(v)
                    .map_err(|e| TlsError::Invalid(format!("common_tls_context.validation_context: {e}")))?,
            ))),
            Some(ValidationSource::Sds(s)) => Some(ValRef::Sds(s.name.clone())),
            Some(ValidationSource::Combined { default, sds }) => Some(ValRef::Combined(
                Arc::new(LoadedValidation::load(default).map_err(|e| {
                    TlsError::Invalid(format!(
                        "common_tls_context.combined_validation_context.default_validation_context: {e}"
                    ))
                })?),
                sds.name.clone(),
            )),
        };
        let needs_store = matches!(cert, Some(CertRef::Sds(_)))
            || matches!(validation, Some(ValRef::Sds(_) | ValRef::Combined(..)));
        if needs_store && secrets.is_none() {
            return Err(TlsError::Invalid(
                "SDS secrets are named but no secret store was given".into(),
            ));
        }
        Ok(Sources {
            cert,
            validation,
            secrets,
        })
    }

    /// The certificate and trust bundle currently resolved; `None` where
    /// none is configured or its secret is missing.
    pub(crate) fn loaded(&self) -> (Option<Arc<LoadedCert>>, Option<Arc<LoadedValidation>>) {
        (self.cert().ok().flatten(), self.validation().ok().flatten())
    }

    pub(crate) fn generation(&self) -> u64 {
        self.secrets.as_ref().map_or(0, |s| s.generation())
    }

    fn lookup(&self, name: &str) -> Result<LoadedSecret, TlsError> {
        self.secrets
            .as_ref()
            .and_then(|s| s.get(name))
            .ok_or_else(|| TlsError::MissingSecret(name.to_string()))
    }

    pub(crate) fn cert(&self) -> Result<Option<Arc<LoadedCert>>, TlsError> {
        match &self.cert {
            None => Ok(None),
            Some(CertRef::Static(c)) => Ok(Some(c.clone())),
            Some(CertRef::Sds(name)) => match self.lookup(name)? {
                LoadedSecret::Certificate(c) => Ok(Some(c)),
                LoadedSecret::Validation(_) => Err(TlsError::Invalid(format!(
                    "secret {name:?} is a validation context, not a certificate"
                ))),
            },
        }
    }

    pub(crate) fn validation(&self) -> Result<Option<Arc<LoadedValidation>>, TlsError> {
        let sds = |name: &str| match self.lookup(name)? {
            LoadedSecret::Validation(v) => Ok(v),
            LoadedSecret::Certificate(_) => Err(TlsError::Invalid(format!(
                "secret {name:?} is a certificate, not a validation context"
            ))),
        };
        match &self.validation {
            None => Ok(None),
            Some(ValRef::Static(v)) => Ok(Some(v.clone())),
            Some(ValRef::Sds(name)) => sds(name).map(Some),
            Some(ValRef::Combined(default, name)) => {
                let s = sds(name)?;
                let mut merged = (**default).clone();
                if s.roots.is_some() {
                    merged.roots = s.roots.clone();
                    merged.ca_infos = s.ca_infos.clone();
                }
                if !s.sans.is_empty() && merged.sans.is_empty() {
                    merged.sans = s.sans.clone();
                }
                Ok(Some(Arc::new(merged)))
            }
        }
    }
}
