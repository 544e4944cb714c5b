//! The replica on S3-compatible object storage, through the `object_store` crate.
//!
//! Objects, under `<prefix>/<node_id>/`:
//! - `manifest`: the owner (`{"epoch": E, "instance": "…"}`), replaced only by a conditional
//!   write on the version read (`If-Match`), so that two processes taking over at once cannot
//!   both win;
//! - `log/<20-digit sequence number>`: one per entry, created only if absent (`If-None-Match:
//!   *`), never overwritten.
//!
//! Taking over raises the epoch in the manifest, then creates a *fence* object at the first free
//! sequence number. The previous owner's next append targets a number that now exists, so its
//! create fails; it reads the manifest and stops with [`ReplicaError::Fenced`]. Whatever it
//! appended before is below the fence, and the new owner reads it back. (The same scheme as
//! SlateDB's writer fencing: an epoch raised by compare-and-swap, and a log whose next name is
//! taken by the new writer.)

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::object_store::aws::{AmazonS3, AmazonS3Builder};
use ::object_store::path::Path;
use ::object_store::{
    ClientOptions, Error as OsError, ObjectStore, ObjectStoreExt, PutMode, PutOptions, RetryConfig,
    UpdateVersion,
};
use bytes::Bytes;
use futures_util::TryStreamExt;
use serde::{Deserialize, Serialize};
use weir_receiver::{lock, ConfigError};

use super::{Owner, Replica, ReplicaError, ReplicaFuture, TakenOver};

const FENCE: &[u8] = b"WEIRFENCE";
/// A fence object's size: the marker and the epoch.
const FENCE_LEN: u64 = FENCE.len() as u64 + 8;

/// `[engine.replication]` with `kind = "object_store"`. Credentials not given here come from the
/// usual environment variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
/// `AWS_SESSION_TOKEN`, `AWS_REGION`, `AWS_ENDPOINT`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ObjectStoreConfig {
    /// The bucket (must exist). Required.
    pub bucket: String,
    /// Key prefix; the node's objects go under `<prefix>/<node_id>/`. Default `weir`.
    pub prefix: String,
    /// The endpoint of an S3-compatible server (`http://127.0.0.1:9000`); default AWS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The region. Default `AWS_REGION`, else `us-east-1`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Access key id (default from the environment).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_key_id: Option<String>,
    /// Secret access key (default from the environment). Never printed (`check-config`).
    #[serde(skip_serializing)]
    pub secret_access_key: Option<String>,
    /// Allow plain-text HTTP to the endpoint. Default: true if the endpoint starts with
    /// `http://`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_http: Option<bool>,
    /// One request's timeout, ms (a slow replica holds acknowledgements until it answers or
    /// this passes; then the write is retried). Default 10000.
    pub request_timeout_ms: u64,
}

impl Default for ObjectStoreConfig {
    fn default() -> Self {
        ObjectStoreConfig {
            bucket: String::new(),
            prefix: "weir".into(),
            endpoint: None,
            region: None,
            access_key_id: None,
            secret_access_key: None,
            allow_http: None,
            request_timeout_ms: 10_000,
        }
    }
}

impl ObjectStoreConfig {
    /// Checks every field.
    ///
    /// # Errors
    /// The first problem, naming the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.bucket.is_empty() {
            return Err(ConfigError::new(
                "bucket",
                "is required: the bucket the node's blocks are replicated to",
            ));
        }
        if self.prefix.starts_with('/') || self.prefix.ends_with('/') {
            return Err(ConfigError::new(
                "prefix",
                format!("{:?}: no leading or trailing '/'", self.prefix),
            ));
        }
        if self.request_timeout_ms == 0 {
            return Err(ConfigError::new(
                "request_timeout_ms",
                "must be greater than 0",
            ));
        }
        if let Some(e) = &self.endpoint {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(ConfigError::new(
                    "endpoint",
                    format!("{e:?}: must start with http:// or https://"),
                ));
            }
        }
        Ok(())
    }
}

/// The S3 client `c` describes (validated first): its endpoint, region and keys, with those not
/// given taken from the environment; few quick retries inside the client (whoever calls it
/// retries on its own and counts and logs each failure, which a long silent client retry would
/// hide) and `request_timeout_ms` per request. Connects nowhere: the first request does. The
/// replica and the `parquet` output of `receiver-node` build their clients here.
///
/// # Errors
/// The first invalid field ([`ObjectStoreConfig::validate`]), or a configuration the S3 client
/// refuses.
pub fn build_s3(c: &ObjectStoreConfig) -> Result<AmazonS3, ConfigError> {
    c.validate()?;
    let mut b = AmazonS3Builder::from_env().with_bucket_name(&c.bucket);
    if let Some(e) = &c.endpoint {
        b = b.with_endpoint(e);
    }
    let allow_http = c.allow_http.unwrap_or_else(|| {
        c.endpoint
            .as_deref()
            .is_some_and(|e| e.starts_with("http://"))
    });
    let region = c
        .region
        .clone()
        .or_else(|| std::env::var("AWS_REGION").ok())
        .unwrap_or_else(|| "us-east-1".into());
    b = b.with_region(region);
    if let Some(k) = &c.access_key_id {
        b = b.with_access_key_id(k);
    }
    if let Some(k) = &c.secret_access_key {
        b = b.with_secret_access_key(k);
    }
    b = b
        .with_retry(RetryConfig {
            max_retries: 2,
            retry_timeout: Duration::from_millis(c.request_timeout_ms),
            ..RetryConfig::default()
        })
        .with_client_options(
            ClientOptions::new()
                .with_timeout(Duration::from_millis(c.request_timeout_ms))
                .with_connect_timeout(Duration::from_millis(c.request_timeout_ms.min(5_000))),
        )
        // After the client options, which would reset it.
        .with_allow_http(allow_http);
    b.build()
        .map_err(|e| ConfigError::new("endpoint", e.to_string()))
}

/// An object-store error as a sentence for logs: the client's message, and where credentials
/// are looked for when the client found none (it then asked the cloud instance metadata
/// service, which off a cloud instance fails in a way that does not say what is missing).
pub fn explain(e: &OsError) -> String {
    let e = e.to_string();
    if e.contains("169.254.169.254") {
        format!(
            "{e} (no credentials were found: set access_key_id and secret_access_key, or \
             AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY; without them the client asked the \
             instance metadata service at 169.254.169.254)"
        )
    } else {
        e
    }
}

/// A node's replica in an object store.
#[derive(Debug)]
pub struct ObjectStoreReplica {
    store: Arc<dyn ObjectStore>,
    root: Path,
    describe: String,
    epoch: AtomicU64,
    next: Mutex<u64>,
}

fn unavailable(what: &str) -> impl FnOnce(OsError) -> ReplicaError + '_ {
    move |e| ReplicaError::Unavailable(format!("{what}: {}", explain(&e)))
}

impl ObjectStoreReplica {
    /// The replica of `node_id` in `store` under `prefix` (any `object_store` implementation;
    /// it must support `PutMode::Create` and `PutMode::Update`).
    pub fn new(store: Arc<dyn ObjectStore>, prefix: &str, node_id: &str) -> Self {
        let root = if prefix.is_empty() {
            Path::from(node_id)
        } else {
            Path::from(format!("{prefix}/{node_id}"))
        };
        ObjectStoreReplica {
            describe: format!("{store} {root}"),
            store,
            root,
            epoch: AtomicU64::new(0),
            next: Mutex::new(0),
        }
    }

    /// The replica `config` describes.
    ///
    /// # Errors
    /// A configuration the S3 client refuses.
    pub fn from_config(c: &ObjectStoreConfig, node_id: &str) -> Result<Self, ConfigError> {
        let s3 = build_s3(c)?;
        Ok(Self::new(Arc::new(s3), &c.prefix, node_id))
    }

    fn manifest(&self) -> Path {
        self.root.clone().join("manifest")
    }

    fn log(&self) -> Path {
        self.root.clone().join("log")
    }

    fn entry(&self, seq: u64) -> Path {
        self.log().join(format!("{seq:020}").as_str())
    }

    async fn read_owner(&self) -> Result<Option<(Owner, UpdateVersion)>, ReplicaError> {
        match self.store.get(&self.manifest()).await {
            Ok(r) => {
                let version = UpdateVersion {
                    e_tag: r.meta.e_tag.clone(),
                    version: r.meta.version.clone(),
                };
                let bytes = r
                    .bytes()
                    .await
                    .map_err(unavailable("reading the manifest"))?;
                let owner: Owner = serde_json::from_slice(&bytes).map_err(|e| {
                    ReplicaError::Damaged(format!("manifest {}: {e}", self.manifest()))
                })?;
                Ok(Some((owner, version)))
            }
            Err(OsError::NotFound { .. }) => Ok(None),
            Err(e) => Err(unavailable("reading the manifest")(e)),
        }
    }

    /// The sequence numbers of the log's objects, in order, each with true if it is a fence.
    async fn list_all(&self) -> Result<Vec<(u64, bool)>, ReplicaError> {
        let metas: Vec<_> = self
            .store
            .list(Some(&self.log()))
            .try_collect()
            .await
            .map_err(unavailable("listing the log"))?;
        let mut seqs: Vec<(u64, bool)> = metas
            .iter()
            .filter_map(|m| {
                let seq = m.location.filename()?.parse().ok()?;
                Some((seq, m.size == FENCE_LEN))
            })
            .collect();
        seqs.sort_unstable();
        Ok(seqs)
    }

    /// The sequence numbers of the log's objects, in order.
    async fn list(&self) -> Result<Vec<u64>, ReplicaError> {
        Ok(self.list_all().await?.into_iter().map(|(s, _)| s).collect())
    }

    async fn fenced(&self) -> ReplicaError {
        let ours = self.epoch.load(Relaxed);
        let theirs = match self.read_owner().await {
            Ok(Some((o, _))) => o.epoch,
            Ok(None) | Err(_) => ours + 1,
        };
        ReplicaError::Fenced {
            node_id: self.root.filename().unwrap_or_default().to_string(),
            new_epoch: theirs,
            our_epoch: ours,
        }
    }
}

impl Replica for ObjectStoreReplica {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn owner(&self) -> ReplicaFuture<'_, Option<Owner>> {
        Box::pin(async move { Ok(self.read_owner().await?.map(|(o, _)| o)) })
    }

    fn take_over<'a>(
        &'a self,
        instance: &'a str,
        before: &'a (dyn Fn(u64) -> std::io::Result<()> + Send + Sync),
    ) -> ReplicaFuture<'a, TakenOver> {
        Box::pin(async move {
            // Raise the epoch; a concurrent take-over makes one of the two writes fail.
            let epoch = loop {
                let current = self.read_owner().await?;
                let epoch = current.as_ref().map_or(0, |(o, _)| o.epoch) + 1;
                before(epoch).map_err(|e| {
                    ReplicaError::Unavailable(format!("recording epoch {epoch} locally: {e}"))
                })?;
                let body = serde_json::to_vec(&Owner {
                    epoch,
                    instance: instance.to_string(),
                })
                .expect("serialisable");
                let mode = match current {
                    Some((_, v)) => PutMode::Update(v),
                    None => PutMode::Create,
                };
                match self
                    .store
                    .put_opts(&self.manifest(), body.into(), PutOptions::from(mode))
                    .await
                {
                    Ok(_) => break epoch,
                    Err(OsError::AlreadyExists { .. } | OsError::Precondition { .. }) => continue,
                    Err(e) => return Err(unavailable("writing the manifest")(e)),
                }
            };
            self.epoch.store(epoch, Relaxed);
            // Fence: take the first free name, so that the previous owner's next append fails.
            let fence = loop {
                let n = self.list().await?.last().map_or(0, |l| l + 1);
                let mut body = FENCE.to_vec();
                body.extend_from_slice(&epoch.to_le_bytes());
                match self
                    .store
                    .put_opts(&self.entry(n), body.into(), PutMode::Create.into())
                    .await
                {
                    Ok(_) => break n,
                    Err(OsError::AlreadyExists { .. }) => continue,
                    Err(e) => return Err(unavailable("writing the fence")(e)),
                }
            };
            *lock(&self.next) = fence + 1;
            let mut entries = Vec::new();
            for seq in self.list().await?.into_iter().filter(|s| *s < fence) {
                match self.store.get(&self.entry(seq)).await {
                    Ok(r) => entries.push(r.bytes().await.map_err(unavailable("reading the log"))?),
                    // Trimmed by the previous owner while we listed.
                    Err(OsError::NotFound { .. }) => {}
                    Err(e) => return Err(unavailable("reading the log")(e)),
                }
            }
            Ok(TakenOver { epoch, entries })
        })
    }

    fn append(&self, entry: Bytes) -> ReplicaFuture<'_, u64> {
        Box::pin(async move {
            let seq = *lock(&self.next);
            let path = self.entry(seq);
            match self
                .store
                .put_opts(&path, entry.clone().into(), PutMode::Create.into())
                .await
            {
                Ok(_) => {}
                Err(OsError::AlreadyExists { .. }) => {
                    // Ours after all (an earlier attempt whose answer was lost), or a fence.
                    let there = self
                        .store
                        .get(&path)
                        .await
                        .map_err(unavailable("reading back an entry"))?
                        .bytes()
                        .await
                        .map_err(unavailable("reading back an entry"))?;
                    if there != entry {
                        return Err(self.fenced().await);
                    }
                }
                Err(e) => return Err(unavailable("writing an entry")(e)),
            }
            *lock(&self.next) = seq + 1;
            Ok(seq)
        })
    }

    fn trim(&self, before: u64) -> ReplicaFuture<'_, u64> {
        Box::pin(async move {
            let mut n = 0;
            // Fences stay: a process fenced at take-over k writes next at exactly the number of
            // fence k, however long it was paused; were that name free again, its write would
            // succeed unseen. (Fences are 17 bytes, one per take-over; entries are never that
            // small.)
            let all = self.list_all().await?;
            for (seq, _) in all.into_iter().filter(|(s, fence)| *s < before && !fence) {
                match self.store.delete(&self.entry(seq)).await {
                    Ok(()) | Err(OsError::NotFound { .. }) => n += 1,
                    Err(e) => return Err(unavailable("deleting an entry")(e)),
                }
            }
            Ok(n)
        })
    }
}
