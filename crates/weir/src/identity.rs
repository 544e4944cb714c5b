//! Node identity: which node wrote a batch.
//!
//! Several nodes may write to one destination (a shared directory, one Kafka topic). Batch times
//! are multiples of the batch interval and so coincide across nodes: a name keyed by batch time
//! alone would let one node replace another's batch. Every name that identifies a batch therefore
//! also carries the node's **`node_id`**.
//!
//! - `node_id` is configured (`StreamingConfig::node_id`, top-level `node_id` in the node's
//!   file) or, by default, derived once from the host name and a short hash of the absolute data
//!   directory (`<host>-<8 hex digits>`).
//! - It is recorded in the data directory ([`IDENTITY_FILE`]) at the first start, together with a
//!   random **instance** token that identifies this data directory wherever it is later moved.
//!   Later starts read it back, so a default id stays the same even if the host is renamed or
//!   the node is started from another working directory.
//! - A destination shared by several nodes holds a **claim** per node ([`claim_dir`]): a small
//!   file naming the id, the instance, the data directory and the host. A node whose id is
//!   claimed there by another data directory (another instance) refuses to start: two nodes with
//!   one id would overwrite each other's batches.

use std::fs::{File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The file in the data directory that records the node's identity.
pub const IDENTITY_FILE: &str = "node-identity.json";

/// The longest `node_id` accepted.
pub const MAX_NODE_ID_LEN: usize = 64;

/// Why an identity could not be established or claimed.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The configured `node_id` is not usable in names.
    #[error("node_id {id:?}: {reason}")]
    Invalid {
        /// The id.
        id: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Reading or writing an identity or claim file failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// The operation.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// An identity or claim file holds something else than expected.
    #[error("{}: unreadable ({reason}); if nothing else uses it, delete it and start again", path.display())]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// The parse error.
        reason: String,
    },
    /// Another node (another data directory) already writes to this destination under this id.
    #[error(transparent)]
    Claimed(Box<ClaimConflict>),
}

/// A destination where this node's id is claimed by another data directory.
#[derive(Debug, thiserror::Error)]
#[error(
    "node_id {node_id:?} is already used in {dest} by another node (data directory {their_dir} \
     on host {their_host}, claimed in {claim}); this node's data directory is {our_dir}. Two \
     nodes writing one destination must have distinct node ids, or they overwrite each \
     other's batches: set a different top-level `node_id` in this node's configuration (or \
     leave it unset for a default derived from the host and data directory). If this node \
     replaces that one for good (its data directory was recreated), stop the other node and \
     delete {claim}."
)]
pub struct ClaimConflict {
    /// The id.
    pub node_id: String,
    /// The destination.
    pub dest: String,
    /// The claim file.
    pub claim: String,
    /// The other node's data directory.
    pub their_dir: String,
    /// The other node's host.
    pub their_host: String,
    /// This node's data directory.
    pub our_dir: String,
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> IdentityError + 'a {
    move |source| IdentityError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Checks that `id` is usable in file names, object keys and headers: 1 to 64 characters of
/// `A-Z a-z 0-9 . _ -`, not starting with `.` or `-`.
///
/// # Errors
/// A description of what is wrong.
pub fn validate_node_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("must not be empty".into());
    }
    if id.len() > MAX_NODE_ID_LEN {
        return Err(format!("must be at most {MAX_NODE_ID_LEN} characters"));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{c:?} is not allowed (use letters, digits, '.', '_' and '-')"
        ));
    }
    if id.starts_with(['.', '-']) {
        return Err("must not start with '.' or '-'".into());
    }
    Ok(())
}

/// This machine's host name, reduced to lowercase letters, digits and `-` (at most 40
/// characters; `node` if there is none).
pub fn host_name() -> String {
    let raw = gethostname::gethostname().to_string_lossy().into_owned();
    let mut s: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    s = s.trim_matches('-').chars().take(40).collect();
    let s = s.trim_end_matches('-').to_string();
    if s.is_empty() {
        "node".into()
    } else {
        s
    }
}

/// `dir` made absolute (lexically, against the working directory; symbolic links kept).
fn absolute(dir: &Path) -> PathBuf {
    std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf())
}

/// The default `node_id` for a data directory: the host name, `-`, and the CRC-32 of the absolute
/// data directory path in hex (e.g. `ingest-3-1f0c9a2e`).
pub fn default_node_id(data_dir: &Path) -> String {
    let path = absolute(data_dir);
    let hash = crc32fast::hash(path.as_os_str().as_encoded_bytes());
    format!("{}-{hash:08x}", host_name())
}

/// What [`IDENTITY_FILE`] holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Stored {
    /// The default derived at the first start: used whenever no id is configured, so that
    /// removing a configured id goes back to this data directory's own default, not to the id
    /// configured last (which may have been a mistake).
    default_node_id: String,
    /// The id of the last start (to log a change).
    last_node_id: String,
    instance: String,
}

/// Where an effective `node_id` came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdSource {
    /// Set in the configuration.
    Configured,
    /// Recorded in the data directory at an earlier start (a default derived then).
    Stored,
    /// Derived now from the host name and the data directory (recorded at the first start).
    Derived,
}

impl std::fmt::Display for IdSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IdSource::Configured => "configured",
            IdSource::Stored => "recorded in the data directory at an earlier start",
            IdSource::Derived => "default: host name and a hash of the data directory",
        })
    }
}

/// A node's identity: its `node_id` and the instance token of its data directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The effective `node_id`.
    pub node_id: String,
    /// A random token created with the data directory (see the module docs).
    pub instance: String,
    /// The data directory, absolute.
    pub data_dir: PathBuf,
    /// Where `node_id` came from.
    pub source: IdSource,
}

fn read_stored(path: &Path) -> Result<Option<Stored>, IdentityError> {
    match std::fs::read(path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| IdentityError::Unreadable {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("reading", path)(e)),
    }
}

/// A random 128-bit token in hex (from the standard library's randomly seeded hasher keys,
/// mixed with the time and process id).
fn new_instance() -> String {
    let mut words = [0u64; 2];
    for (i, w) in words.iter_mut().enumerate() {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        h.write_u32(std::process::id());
        h.write_usize(i);
        *w = h.finish();
    }
    format!("{:016x}{:016x}", words[0], words[1])
}

/// Writes `bytes` to `path` atomically: a temp file beside it, fsync, rename, fsync the directory.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), IdentityError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("json.tmp");
    let mut f = File::create(&tmp).map_err(io_err("creating", &tmp))?;
    f.write_all(bytes).map_err(io_err("writing", &tmp))?;
    f.sync_all().map_err(io_err("fsync", &tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io_err("renaming into", path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))
}

/// The identity `configured` (or the default) would have in `data_dir`, without writing anything
/// (for `check-config`).
///
/// # Errors
/// [`IdentityError`] if the configured id is invalid or the identity file is unreadable.
pub fn peek(data_dir: &Path, configured: Option<&str>) -> Result<Identity, IdentityError> {
    let stored = read_stored(&data_dir.join(IDENTITY_FILE))?;
    effective(data_dir, configured, stored.as_ref())
}

fn effective(
    data_dir: &Path,
    configured: Option<&str>,
    stored: Option<&Stored>,
) -> Result<Identity, IdentityError> {
    let (node_id, source) = match (configured, stored) {
        (Some(id), _) => (id.to_string(), IdSource::Configured),
        (None, Some(s)) => (s.default_node_id.clone(), IdSource::Stored),
        (None, None) => (default_node_id(data_dir), IdSource::Derived),
    };
    validate_node_id(&node_id).map_err(|reason| IdentityError::Invalid {
        id: node_id.clone(),
        reason,
    })?;
    Ok(Identity {
        node_id,
        instance: stored.map(|s| s.instance.clone()).unwrap_or_default(),
        data_dir: absolute(data_dir),
        source,
    })
}

/// The node's identity in `data_dir` (created if missing): the configured id, else the default
/// recorded at an earlier start, else a derived default, which is then recorded. A change of
/// id from the last start is logged (batches run from now on are named and tagged with the new
/// id).
///
/// # Errors
/// [`IdentityError`] if the id is invalid or the identity file cannot be read or written.
pub fn resolve(data_dir: &Path, configured: Option<&str>) -> Result<Identity, IdentityError> {
    std::fs::create_dir_all(data_dir).map_err(io_err("creating", data_dir))?;
    let path = data_dir.join(IDENTITY_FILE);
    let stored = read_stored(&path)?;
    let mut id = effective(data_dir, configured, stored.as_ref())?;
    let want = match &stored {
        Some(s) => {
            if s.last_node_id != id.node_id {
                tracing::warn!(
                    previous = %s.last_node_id, now = %id.node_id,
                    "node_id changed: batches run from now on are named and tagged with the new id"
                );
            }
            Stored {
                last_node_id: id.node_id.clone(),
                ..s.clone()
            }
        }
        None => {
            id.instance = new_instance();
            Stored {
                default_node_id: default_node_id(data_dir),
                last_node_id: id.node_id.clone(),
                instance: id.instance.clone(),
            }
        }
    };
    if stored.as_ref() != Some(&want) {
        let bytes = serde_json::to_vec_pretty(&want).expect("serialisable");
        write_atomic(&path, &bytes)?;
    }
    Ok(id)
}

/// Records in an empty `data_dir` the identity of the node it adopts (replication): `node_id`
/// with the previous owner's `instance` token, so that the destinations that node claimed admit
/// this directory as the same node. An existing identity file is replaced.
///
/// # Errors
/// [`IdentityError`] if the id is invalid or the file cannot be written.
pub fn adopt(data_dir: &Path, node_id: &str, instance: &str) -> Result<Identity, IdentityError> {
    std::fs::create_dir_all(data_dir).map_err(io_err("creating", data_dir))?;
    let mut id = effective(data_dir, Some(node_id), None)?;
    id.instance = instance.to_string();
    let stored = Stored {
        default_node_id: default_node_id(data_dir),
        last_node_id: node_id.to_string(),
        instance: instance.to_string(),
    };
    let bytes = serde_json::to_vec_pretty(&stored).expect("serialisable");
    write_atomic(&data_dir.join(IDENTITY_FILE), &bytes)?;
    Ok(id)
}

/// What a claim file in a shared destination holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Claim {
    node_id: String,
    instance: String,
    data_dir: String,
    host: String,
    claimed_at_ms: u64,
}

/// The name of `node_id`'s claim file in a destination directory (hidden, so that readers
/// listing `batch-*` files do not see it).
pub fn claim_file_name(node_id: &str) -> String {
    format!(".weir-node-{node_id}.json")
}

/// Claims `node_id` in the directory `dest` for this node (see the module docs); creates `dest`
/// if missing. Succeeds if the id is unclaimed there (the claim is then written, atomically and
/// without replacing a concurrent one) or claimed by this same instance.
///
/// # Errors
/// [`IdentityError::Claimed`] if another instance holds the id there; I/O errors.
pub fn claim_dir(dest: &Path, id: &Identity) -> Result<(), IdentityError> {
    std::fs::create_dir_all(dest).map_err(io_err("creating", dest))?;
    let path = dest.join(claim_file_name(&id.node_id));
    let ours = Claim {
        node_id: id.node_id.clone(),
        instance: id.instance.clone(),
        data_dir: id.data_dir.display().to_string(),
        host: gethostname::gethostname().to_string_lossy().into_owned(),
        claimed_at_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    };
    loop {
        match std::fs::read(&path) {
            Ok(bytes) => {
                let theirs: Claim =
                    serde_json::from_slice(&bytes).map_err(|e| IdentityError::Unreadable {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
                if theirs.instance == id.instance {
                    return Ok(());
                }
                return Err(IdentityError::Claimed(Box::new(ClaimConflict {
                    node_id: id.node_id.clone(),
                    dest: dest.display().to_string(),
                    claim: path.display().to_string(),
                    their_dir: theirs.data_dir,
                    their_host: theirs.host,
                    our_dir: ours.data_dir,
                })));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("reading", &path)(e)),
        }
        // Written whole under a name of our own, then linked into place: the link fails if
        // another node created the claim meanwhile (then it is read and compared above), and a
        // reader never sees a half-written claim.
        let tmp = dest.join(format!(".weir-node-{}.{}.tmp", id.node_id, id.instance));
        let bytes = serde_json::to_vec_pretty(&ours).expect("serialisable");
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io_err("creating", &tmp))?;
        f.write_all(&bytes).map_err(io_err("writing", &tmp))?;
        f.sync_all().map_err(io_err("fsync", &tmp))?;
        drop(f);
        let linked = std::fs::hard_link(&tmp, &path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => {
                File::open(dest)
                    .and_then(|d| d.sync_all())
                    .map_err(io_err("fsync directory", dest))?;
                tracing::info!(node_id = %id.node_id, claim = %path.display(), "claimed the node id in the output directory");
                return Ok(());
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            // A file system without hard links: exclusive create is the next best thing.
            Err(_) => match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    f.write_all(&bytes).map_err(io_err("writing", &path))?;
                    f.sync_all().map_err(io_err("fsync", &path))?;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io_err("creating", &path)(e)),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked_for_use_in_names() {
        for ok in ["a", "node-1", "ingest.eu_2", &"x".repeat(64)] {
            validate_node_id(ok).unwrap();
        }
        for (bad, why) in [
            ("", "empty"),
            ("a/b", "'/'"),
            ("a b", "' '"),
            (".hidden", "start"),
            ("-x", "start"),
            (&"x".repeat(65), "64"),
        ] {
            let e = validate_node_id(bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        validate_node_id(&host_name()).unwrap();
    }

    #[test]
    fn the_default_is_stable_per_data_directory_and_distinct_between_them() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        assert_eq!(default_node_id(&a), default_node_id(&a));
        assert_ne!(default_node_id(&a), default_node_id(&b));
        assert!(default_node_id(&a).starts_with(&format!("{}-", host_name())));
        validate_node_id(&default_node_id(&a)).unwrap();
    }

    #[test]
    fn the_identity_is_recorded_at_the_first_start_and_read_back() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("data");
        let peeked = peek(&dir, None).unwrap();
        assert_eq!(peeked.source, IdSource::Derived);
        assert!(!dir.exists(), "peek writes nothing");
        let first = resolve(&dir, None).unwrap();
        assert_eq!(first.node_id, peeked.node_id);
        assert_eq!(first.instance.len(), 32);
        let again = resolve(&dir, None).unwrap();
        assert_eq!(
            (again.node_id.as_str(), again.source),
            (first.node_id.as_str(), IdSource::Stored)
        );
        assert_eq!(again.instance, first.instance);
        // A configured id is used while configured; the instance stays, and without it the
        // recorded default comes back (not the id configured last).
        let named = resolve(&dir, Some("edge-1")).unwrap();
        assert_eq!(
            (named.node_id.as_str(), named.source),
            ("edge-1", IdSource::Configured)
        );
        assert_eq!(named.instance, first.instance);
        assert_eq!(peek(&dir, None).unwrap().node_id, first.node_id);
        assert_eq!(resolve(&dir, None).unwrap(), again);
        let e = resolve(&dir, Some("no/slash")).unwrap_err().to_string();
        assert!(e.contains("no/slash") && e.contains("'/'"), "{e}");
        std::fs::write(dir.join(IDENTITY_FILE), "{").unwrap();
        let e = resolve(&dir, None).unwrap_err().to_string();
        assert!(e.contains(IDENTITY_FILE) && e.contains("delete it"), "{e}");
    }

    #[test]
    fn a_claim_admits_its_own_instance_and_refuses_another() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("shared");
        let a = resolve(&d.path().join("a"), Some("n1")).unwrap();
        let b = resolve(&d.path().join("b"), Some("n1")).unwrap();
        let c = resolve(&d.path().join("c"), Some("n2")).unwrap();
        claim_dir(&out, &a).unwrap();
        claim_dir(&out, &a).unwrap();
        claim_dir(&out, &c).unwrap();
        let e = claim_dir(&out, &b).unwrap_err();
        assert!(matches!(e, IdentityError::Claimed(_)), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("\"n1\"") && msg.contains(&a.data_dir.display().to_string()),
            "{msg}"
        );
        assert!(
            msg.contains(&b.data_dir.display().to_string()) && msg.contains("node_id"),
            "{msg}"
        );
        // Nothing but the two claims is left behind.
        let mut names: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, [claim_file_name("n1"), claim_file_name("n2")]);
    }
}
