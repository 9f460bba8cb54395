//! Secrets from files, watched for changes (Envoy's SDS `path_config_source`).
//!
//! How changes are noticed: the watcher polls (every second by default).
//! Each poll `stat`s the SDS file and every certificate, key and CA file its
//! secrets name, following symlinks; when any identity (device, inode),
//! size or modification time changed, the files are read and hashed, and
//! only a changed hash reloads. Polling was chosen over inotify (`notify`)
//! because it needs no extra thread or dependency, works on every file
//! system (including network and overlay mounts, where inotify events are
//! unreliable), and follows Kubernetes' secret updates for free: those swap
//! a `..data` symlink to a new directory, which changes the inode seen
//! through the path, whereas an inotify watch on the old file would see
//! nothing. The cost is a few `stat` calls per second and up to one second
//! of delay.
//!
//! A change republishes every secret of the file through
//! [`SecretStore::update`], which refuses a bad one (the old one keeps
//! serving). A certificate and key written one after the other may be seen
//! half-updated (key mismatch): that update is refused and the next poll,
//! which sees the second write, succeeds.

use std::collections::hash_map::DefaultHasher;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mesh_core::config::tls::{DataSource, Secret, SecretKind};

use crate::SecretStore;

/// Turns the SDS file's bytes into secrets (the YAML/JSON reading lives with
/// the configuration loader, outside this crate).
pub type SecretParser = Arc<dyn Fn(&[u8]) -> Result<Vec<Secret>, String> + Send + Sync>;

/// Default polling interval.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);

/// A file of secrets (an SDS `path_config_source`).
#[derive(Clone)]
pub struct SecretFile {
    path: PathBuf,
    parse: SecretParser,
}

impl std::fmt::Debug for SecretFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretFile")
            .field("path", &self.path)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Stamp(Vec<(PathBuf, Option<FileId>)>);

/// Device, inode, size, mtime seconds and nanoseconds.
type FileId = (u64, u64, u64, i64, i64);

fn stamp(paths: &[PathBuf]) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    Stamp(
        paths
            .iter()
            .map(|p| {
                let m = std::fs::metadata(p)
                    .ok()
                    .map(|m| (m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec()));
                (p.clone(), m)
            })
            .collect(),
    )
}

fn files_of(secrets: &[Secret]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut add = |d: &DataSource| {
        if let DataSource::Filename(f) = d {
            out.push(PathBuf::from(f));
        }
    };
    for s in secrets {
        match &s.kind {
            SecretKind::TlsCertificate(c) => {
                add(&c.certificate_chain);
                add(&c.private_key);
            }
            SecretKind::ValidationContext(v) => {
                if let Some(ca) = &v.trusted_ca {
                    add(ca);
                }
            }
        }
    }
    out
}

/// What one read of the file found.
struct Snapshot {
    secrets: Vec<Secret>,
    paths: Vec<PathBuf>,
    hash: u64,
}

impl SecretFile {
    /// A file at `path` whose bytes `parse` turns into secrets.
    pub fn new(path: impl Into<PathBuf>, parse: SecretParser) -> Self {
        SecretFile {
            path: path.into(),
            parse,
        }
    }

    fn read(&self) -> Result<Snapshot, String> {
        let bytes = std::fs::read(&self.path)
            .map_err(|e| format!("reading {}: {e}", self.path.display()))?;
        let secrets = (self.parse)(&bytes).map_err(|e| format!("{}: {e}", self.path.display()))?;
        let mut paths = vec![self.path.clone()];
        paths.extend(files_of(&secrets));
        let mut h = DefaultHasher::new();
        bytes.hash(&mut h);
        for p in &paths[1..] {
            // A missing file hashes as empty; loading reports it.
            std::fs::read(p).unwrap_or_default().hash(&mut h);
        }
        Ok(Snapshot {
            secrets,
            paths,
            hash: h.finish(),
        })
    }

    /// Reads the file and publishes its secrets. Returns an error when the
    /// file cannot be read or parsed, or any secret was refused (at start-up
    /// that should stop the proxy).
    pub fn load(&self, store: &SecretStore) -> Result<(), String> {
        let snap = self.read()?;
        let mut errors = Vec::new();
        for s in &snap.secrets {
            if let Err(e) = store.update(s) {
                errors.push(format!("secret {:?}: {e}", s.name));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    /// Watches the file (and the files its secrets name) until `stop`
    /// resolves, republishing on every change. Errors are logged; the
    /// previous secrets keep serving.
    pub async fn watch(
        self,
        store: Arc<SecretStore>,
        interval: Duration,
        stop: impl Future<Output = ()>,
    ) {
        tokio::pin!(stop);
        let (mut paths, mut last_hash) = match self.read() {
            Ok(s) => (s.paths, Some(s.hash)),
            Err(_) => (vec![self.path.clone()], None),
        };
        let mut last_stamp = stamp(&paths);
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(interval) => {}
            }
            let now = stamp(&paths);
            if now == last_stamp {
                continue;
            }
            last_stamp = now;
            match self.read() {
                Ok(snap) => {
                    if paths != snap.paths {
                        paths = snap.paths.clone();
                        last_stamp = stamp(&paths);
                    }
                    if last_hash == Some(snap.hash) {
                        continue;
                    }
                    last_hash = Some(snap.hash);
                    tracing::info!(path = %self.path.display(), "secret file changed; reloading");
                    for s in &snap.secrets {
                        let _ = store.update(s);
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "secret file could not be read; the previous secrets keep serving");
                    last_hash = None;
                }
            }
        }
    }
}
