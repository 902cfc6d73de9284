//! The only module that talks to object storage. Wraps `object_store` (S3 or a local
//! directory) behind a blocking API for the pipeline threads, lays out object keys, and
//! streams uploads into multipart uploads with bounded memory.

use std::io::{self, Write};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::{Arc, Once};
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as Key;
use object_store::{
    ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, WriteMultipart,
};
use tokio::runtime::Handle;
use tokio::sync::mpsc;

use crate::config::{Destination, join_prefix};
use crate::pack::BlobId;
use crate::snapshot::SnapshotId;

pub mod fault;
pub mod retry;

/// Multipart part size: S3's minimum, so an upload holds little memory.
pub const PART_SIZE: usize = 5 << 20;
/// Parts uploaded concurrently per object.
pub const PARTS_IN_FLIGHT: usize = 2;
/// Size of the buffers handed from a pipeline thread to the uploader task.
const HANDOFF: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("destination {dest}: {message}")]
    Open { dest: String, message: String },
    #[error("object {key} not found")]
    NotFound { key: String },
    /// A request failed; `summary` says why in one line, cause first.
    #[error("{summary}")]
    Op {
        op: &'static str,
        key: String,
        summary: String,
        cause: Box<object_store::Error>,
    },
    #[error("upload of {key} stopped before it finished")]
    Interrupted { key: String },
    #[error("object {key} already exists: vaultik never overwrites an object")]
    Exists { key: String },
    #[error("sweeping staging files in {dir}: {source}")]
    Sweep {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl StoreError {
    fn op(op: &'static str, key: &Key, place: &fault::Place, source: object_store::Error) -> Self {
        match source {
            object_store::Error::NotFound { .. } => StoreError::NotFound {
                key: key.to_string(),
            },
            object_store::Error::AlreadyExists { .. } => StoreError::Exists {
                key: key.to_string(),
            },
            cause => StoreError::Op {
                op,
                key: key.to_string(),
                summary: fault::summarize(&cause, place, op, key.as_ref()),
                cause: Box::new(cause),
            },
        }
    }

    /// What `--verbose` adds: the request and the whole error chain.
    pub fn detail(&self) -> Option<String> {
        match self {
            StoreError::Op { op, key, cause, .. } => {
                Some(format!("{op} {key}: {}", fault::detail(cause)))
            }
            _ => None,
        }
    }
}

/// How a repository is opened.
#[derive(Debug, Clone)]
pub struct OpenOptions<'a> {
    /// Where manifests and metadata live below the prefix.
    pub index_prefix: &'a str,
    /// Make a missing local directory (backup side); restore-side commands want an
    /// error instead.
    pub create: bool,
    /// How long each request is retried through transient failures.
    pub retry_for: Duration,
}

/// What an upload produced: the object's size and BLAKE3 of its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Uploaded {
    pub size: u64,
    pub hash: [u8; 32],
}

/// One listed object.
#[derive(Debug, Clone)]
pub struct Listed {
    pub key: String,
    pub size: u64,
    /// Last modification (upload) time, nanoseconds since the epoch.
    pub modified_ns: i64,
}

/// What a listed key names, if it is exactly the key vaultik would write for that id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Object {
    Blob(BlobId),
    Manifest(SnapshotId),
    Metadata(SnapshotId),
    /// A clock probe of prune (`Repo::server_now`), left behind if prune was killed.
    Clock([u8; 16]),
}

/// A repository: an object store, a key prefix, and the layout of keys below it.
#[derive(Clone)]
pub struct Repo {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    index_prefix: String,
    rt: Handle,
    /// Set once the server is seen answering ranged GETs with 200 (rclone 1.75 does):
    /// readers then stream whole objects forward instead.
    no_ranges: Arc<std::sync::atomic::AtomicBool>,
    /// The directory of a `file://` destination, for sweeping staging files.
    local_root: Option<PathBuf>,
    /// What error messages name.
    place: Arc<fault::Place>,
}

fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Another component may have installed ring already; either way ring is in use.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

impl Repo {
    /// Opens a destination.
    pub fn open(dest: &Destination, opts: &OpenOptions, rt: Handle) -> Result<Self, StoreError> {
        install_crypto_provider();
        let create = opts.create;
        let store: Arc<dyn ObjectStore> = match dest {
            Destination::Local { root, .. } => {
                let open_err = |message: String| StoreError::Open {
                    dest: root.display().to_string(),
                    message,
                };
                if create {
                    std::fs::create_dir_all(root).map_err(|e| open_err(e.to_string()))?;
                } else if !root.is_dir() {
                    return Err(open_err("no such directory".into()));
                }
                Arc::new(
                    LocalFileSystem::new_with_prefix(root).map_err(|e| open_err(e.to_string()))?,
                )
            }
            Destination::S3(t) => {
                let mut b = AmazonS3Builder::from_env().with_bucket_name(&t.bucket);
                let endpoint = endpoint(t);
                if let Some(ep) = &endpoint {
                    b = b.with_endpoint(ep).with_virtual_hosted_style_request(false);
                }
                let region = t
                    .region
                    .clone()
                    .or_else(|| std::env::var("AWS_REGION").ok());
                b = b.with_region(region.unwrap_or_else(|| "us-east-1".into()));
                if let Some(k) = &t.access_key_id {
                    b = b.with_access_key_id(k);
                }
                if let Some(s) = &t.secret_access_key {
                    b = b.with_secret_access_key(s);
                }
                let http = endpoint
                    .as_deref()
                    .is_some_and(|e| e.starts_with("http://"));
                b = b
                    .with_client_options(
                        ClientOptions::new()
                            .with_allow_http(http)
                            .with_connect_timeout(Duration::from_secs(10))
                            .with_timeout(Duration::from_secs(300)),
                    )
                    .with_retry(retry::config(opts.retry_for));
                Arc::new(b.build().map_err(|e| StoreError::Open {
                    dest: format!("s3://{}", t.bucket),
                    message: e.to_string(),
                })?)
            }
        };
        Ok(Repo {
            store,
            prefix: join_prefix(dest.prefix(), ""),
            index_prefix: join_prefix(opts.index_prefix, ""),
            rt,
            no_ranges: Arc::default(),
            local_root: match dest {
                Destination::Local { root, prefix } => Some(root.join(prefix)),
                Destination::S3(_) => None,
            },
            place: Arc::new(place(dest)),
        })
    }

    fn fail(&self, op: &'static str, key: &Key, e: object_store::Error) -> StoreError {
        StoreError::op(op, key, &self.place, e)
    }

    fn key(&self, rest: &str) -> Key {
        Key::from(join_prefix(&self.prefix, rest))
    }

    pub fn blob_key(&self, id: &BlobId) -> Key {
        let hex = id.to_hex();
        self.key(&format!("blobs/{}/{hex}", &hex[..2]))
    }

    pub fn blobs_dir(&self) -> Key {
        self.key("blobs")
    }

    pub fn index_dir(&self) -> Key {
        self.key(&self.index_prefix)
    }

    /// The small encrypted manifest; its presence is what makes a snapshot exist.
    pub fn manifest_key(&self, id: &SnapshotId) -> Key {
        self.key(&join_prefix(&self.index_prefix, &format!("{id}.snapshot")))
    }

    /// The encrypted, compressed SQLite metadata database of a snapshot.
    pub fn metadata_key(&self, id: &SnapshotId) -> Key {
        self.key(&join_prefix(&self.index_prefix, &format!("{id}.metadata")))
    }

    /// A clock probe: `<index>/<random>.clock`.
    pub fn clock_key(&self, id: &[u8; 16]) -> Key {
        let name = format!("{}.clock", hex::encode(id));
        self.key(&join_prefix(&self.index_prefix, &name))
    }

    /// Classifies a listed key. Anything that is not the canonical key of an id (other
    /// case, other directory, extra suffix) is `None`: an alias must never make prune
    /// read or delete the object it resembles.
    pub fn object(&self, key: &str) -> Option<Object> {
        let name = key.rsplit('/').next()?;
        let obj = if let Some(id) = name.strip_suffix(".snapshot") {
            Object::Manifest(SnapshotId::parse(id)?)
        } else if let Some(id) = name.strip_suffix(".metadata") {
            Object::Metadata(SnapshotId::parse(id)?)
        } else if let Some(id) = name.strip_suffix(".clock") {
            let mut b = [0u8; 16];
            hex::decode_to_slice(id, &mut b).ok()?;
            Object::Clock(b)
        } else {
            Object::Blob(BlobId::parse(name)?)
        };
        (self.key_of(obj).as_ref() == key).then_some(obj)
    }

    /// The canonical key of an object.
    pub fn key_of(&self, obj: Object) -> Key {
        match obj {
            Object::Blob(id) => self.blob_key(&id),
            Object::Manifest(id) => self.manifest_key(&id),
            Object::Metadata(id) => self.metadata_key(&id),
            Object::Clock(id) => self.clock_key(&id),
        }
    }

    /// Starts a streaming upload. Write to it, then call [`Upload::finish`]; dropping it
    /// aborts the multipart upload.
    pub fn upload(&self, key: Key) -> Upload {
        let (tx, mut rx) = mpsc::channel::<Bytes>(1);
        let store = self.store.clone();
        let task_key = key.clone();
        let place = self.place.clone();
        let task = self.rt.spawn(async move {
            let up = store
                .put_multipart(&task_key)
                .await
                .map_err(|e| StoreError::op("start upload", &task_key, &place, e))?;
            let mut w = WriteMultipart::new_with_chunk_size(up, PART_SIZE);
            let mut finished = false;
            while let Some(b) = rx.recv().await {
                if b.is_empty() {
                    // An empty buffer is the writer's "finish" signal.
                    finished = true;
                    break;
                }
                if let Err(e) = w.wait_for_capacity(PARTS_IN_FLIGHT).await {
                    let _ = w.abort().await;
                    return Err(StoreError::op("upload", &task_key, &place, e));
                }
                w.put(b);
            }
            if !finished {
                let _ = w.abort().await;
                return Err(StoreError::Interrupted {
                    key: task_key.to_string(),
                });
            }
            w.finish()
                .await
                .map_err(|e| StoreError::op("finish upload", &task_key, &place, e))?;
            Ok(())
        });
        Upload {
            key,
            tx: Some(tx),
            buf: Vec::with_capacity(HANDOFF),
            hasher: blake3::Hasher::new(),
            size: 0,
            task: Some(task),
            rt: self.rt.clone(),
        }
    }

    /// Writes a small object in one request, only if no object has that name
    /// (`If-None-Match: *`; a local directory links the new file into place). Servers
    /// that ignore the condition (rclone 1.75) overwrite; see docs/FORMAT.md.
    ///
    /// A create that was retried after the server committed it but failed to answer
    /// finds its own object: equal bytes count as success, anything else as `Exists`.
    pub fn put_new(&self, key: &Key, data: Vec<u8>) -> Result<(), StoreError> {
        let opts = PutOptions::from(PutMode::Create);
        let data = Bytes::from(data);
        let put = self
            .rt
            .block_on(self.store.put_opts(key, data.clone().into(), opts))
            .map(|_| ())
            .map_err(|e| self.fail("put", key, e));
        match put {
            Err(StoreError::Exists { .. }) if self.get(key).is_ok_and(|b| b == data) => Ok(()),
            other => other,
        }
    }

    /// The storage server's clock, in nanoseconds since the epoch: the modification
    /// time it gives a fresh probe object (`<index>/<random>.clock`), deleted at once.
    /// Prune compares it with blob times, which come from the same clock.
    pub fn server_now(&self) -> Result<i64, StoreError> {
        let key = self.clock_key(&rand::random());
        self.put_new(&key, b"clock".to_vec())?;
        // Listings carry the times prune compares (HEAD's are whole seconds).
        let listed = self.list(&self.index_dir());
        let deleted = self.delete(&key);
        let time = listed?
            .into_iter()
            .find(|o| o.key == key.as_ref())
            .map(|o| o.modified_ns)
            .ok_or_else(|| StoreError::NotFound {
                key: key.to_string(),
            })?;
        deleted?;
        Ok(time)
    }

    /// Removes staging files (`name#N`) that a killed upload left in a `file://`
    /// destination, if they were last written before `cutoff_ns`. They are invisible to
    /// listings, so nothing else would ever remove them. Returns how many went.
    pub fn sweep_staging(&self, cutoff_ns: i64) -> Result<u64, StoreError> {
        let Some(root) = &self.local_root else {
            return Ok(0);
        };
        let mut removed = 0;
        let mut dirs = vec![root.clone()];
        while let Some(dir) = dirs.pop() {
            let sweep_err = |source| StoreError::Sweep {
                dir: dir.clone(),
                source,
            };
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(sweep_err(e)),
            };
            for entry in entries {
                let entry = entry.map_err(sweep_err)?;
                let meta = entry.metadata().map_err(sweep_err)?;
                if meta.is_dir() {
                    dirs.push(entry.path());
                    continue;
                }
                let written = meta
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
                if is_staging_name(&entry.file_name().to_string_lossy()) && written < cutoff_ns {
                    std::fs::remove_file(entry.path()).map_err(sweep_err)?;
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    pub fn get(&self, key: &Key) -> Result<Bytes, StoreError> {
        self.rt
            .block_on(async { self.store.get(key).await?.bytes().await })
            .map_err(|e| self.fail("get", key, e))
    }

    /// Reads `range` of an object whose size is `len`.
    pub fn get_range(&self, key: &Key, range: Range<u64>, len: u64) -> Result<Bytes, StoreError> {
        if range.start == 0 && range.end >= len {
            // Some servers answer a whole-object range with 200 rather than 206.
            return self.get(key);
        }
        self.rt
            .block_on(self.store.get_range(key, range))
            .map_err(|e| {
                if e.to_string().contains("non-partial response") {
                    self.no_ranges
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                }
                self.fail("get range of", key, e)
            })
    }

    /// Whether ranged reads work against this server (see `no_ranges`).
    pub fn ranges_work(&self) -> bool {
        !self.no_ranges.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Opens a whole-object GET to be read forward in pieces.
    pub fn stream(&self, key: &Key) -> Result<ObjectStream, StoreError> {
        let s = self
            .rt
            .block_on(self.store.get(key))
            .map_err(|e| self.fail("get", key, e))?
            .into_stream();
        Ok(ObjectStream {
            inner: s,
            rt: self.rt.clone(),
            key: key.clone(),
            place: self.place.clone(),
        })
    }

    /// Opens a whole object for reading forward, hashing as it goes.
    pub fn reader(&self, key: &Key) -> Result<ObjectReader, StoreError> {
        Ok(ObjectReader {
            stream: self.stream(key)?,
            piece: Bytes::new(),
            hasher: blake3::Hasher::new(),
            count: 0,
        })
    }

    pub fn size(&self, key: &Key) -> Result<u64, StoreError> {
        self.rt
            .block_on(self.store.head(key))
            .map(|m| m.size)
            .map_err(|e| self.fail("stat", key, e))
    }

    /// Lists every object under `dir`. A failed listing is an error, never "empty".
    pub fn list(&self, dir: &Key) -> Result<Vec<Listed>, StoreError> {
        self.rt
            .block_on(self.store.list(Some(dir)).try_collect::<Vec<_>>())
            .map(|v| {
                v.into_iter()
                    .map(|m| Listed {
                        key: m.location.to_string(),
                        size: m.size,
                        modified_ns: m.last_modified.timestamp_nanos_opt().unwrap_or(0),
                    })
                    .collect()
            })
            .map_err(|e| self.fail("list", dir, e))
    }

    pub fn delete(&self, key: &Key) -> Result<(), StoreError> {
        self.rt
            .block_on(self.store.delete(key))
            .map_err(|e| self.fail("delete", key, e))
    }
}

/// object_store's local staging files are named `<object>#<digits>`.
fn is_staging_name(name: &str) -> bool {
    name.rsplit_once('#')
        .is_some_and(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// A whole object, read forward piece by piece.
pub struct ObjectStream {
    inner: futures::stream::BoxStream<'static, object_store::Result<Bytes>>,
    rt: Handle,
    key: Key,
    place: Arc<fault::Place>,
}

impl ObjectStream {
    /// The next piece, or `None` at the end.
    pub fn next_piece(&mut self) -> Result<Option<Bytes>, StoreError> {
        use futures::StreamExt;
        self.rt
            .block_on(self.inner.next())
            .transpose()
            .map_err(|e| StoreError::op("get", &self.key, &self.place, e))
    }
}

/// A whole object as a blocking `Read`, hashing (BLAKE3) and counting what passes.
pub struct ObjectReader {
    stream: ObjectStream,
    piece: Bytes,
    hasher: blake3::Hasher,
    count: u64,
}

impl ObjectReader {
    /// Bytes read so far and BLAKE3 of them.
    pub fn digest(&self) -> (u64, [u8; 32]) {
        (self.count, *self.hasher.finalize().as_bytes())
    }
}

impl io::Read for ObjectReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.piece.is_empty() {
            match self.stream.next_piece().map_err(io::Error::other)? {
                Some(p) => self.piece = p,
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.piece.len());
        let head = self.piece.split_to(n);
        out[..n].copy_from_slice(&head);
        self.hasher.update(&head);
        self.count += n as u64;
        Ok(n)
    }
}

/// A streaming upload: a blocking `Write` that hands buffers to an async multipart task.
/// Memory held: one hand-off buffer plus [`PARTS_IN_FLIGHT`] parts.
pub struct Upload {
    key: Key,
    tx: Option<mpsc::Sender<Bytes>>,
    buf: Vec<u8>,
    hasher: blake3::Hasher,
    size: u64,
    task: Option<tokio::task::JoinHandle<Result<(), StoreError>>>,
    rt: Handle,
}

impl Upload {
    fn send(&mut self, b: Bytes) -> Result<(), StoreError> {
        let sent = self.tx.as_ref().map(|tx| tx.blocking_send(b));
        match sent {
            Some(Ok(())) => Ok(()),
            // The task ended early: surface its error rather than a closed channel.
            _ => Err(self.join_err()),
        }
    }

    fn join_err(&mut self) -> StoreError {
        self.tx = None;
        match self.task.take().map(|t| self.rt.block_on(t)) {
            Some(Ok(Err(e))) => e,
            _ => StoreError::Interrupted {
                key: self.key.to_string(),
            },
        }
    }

    /// Completes the multipart upload; only then does the object exist.
    pub fn finish(mut self) -> Result<Uploaded, StoreError> {
        let rest = std::mem::take(&mut self.buf);
        if !rest.is_empty() {
            self.send(rest.into())?;
        }
        self.send(Bytes::new())?;
        self.tx = None;
        match self.task.take().map(|t| self.rt.block_on(t)) {
            Some(Ok(Ok(()))) => Ok(Uploaded {
                size: self.size,
                hash: *self.hasher.finalize().as_bytes(),
            }),
            Some(Ok(Err(e))) => Err(e),
            _ => Err(StoreError::Interrupted {
                key: self.key.to_string(),
            }),
        }
    }
}

impl Write for Upload {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.hasher.update(data);
        self.size += data.len() as u64;
        self.buf.extend_from_slice(data);
        if self.buf.len() >= HANDOFF {
            let full = std::mem::replace(&mut self.buf, Vec::with_capacity(HANDOFF));
            self.send(full.into()).map_err(io::Error::other)?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        // Closing the channel without the finish signal makes the task abort the upload.
        self.tx = None;
    }
}

/// The S3 endpoint: the config's, else `AWS_ENDPOINT_URL`, else AWS itself (`None`).
fn endpoint(t: &crate::config::S3Target) -> Option<String> {
    t.endpoint
        .clone()
        .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok())
}

/// Where requests go, as error messages name it.
fn place(dest: &Destination) -> fault::Place {
    match dest {
        Destination::S3(t) => fault::Place {
            endpoint: endpoint(t).map_or_else(
                || format!("s3://{}", t.bucket),
                |e| fault::without_userinfo(&e),
            ),
            bucket: Some(t.bucket.clone()),
        },
        Destination::Local { root, .. } => fault::Place {
            endpoint: root.display().to_string(),
            bucket: None,
        },
    }
}

/// A local destination root, for callers that print where things went.
pub fn describe(dest: &Destination) -> String {
    match dest {
        Destination::Local { root, prefix } => {
            let mut p = PathBuf::from(root);
            if !prefix.is_empty() {
                p.push(prefix);
            }
            format!("file://{}", p.display())
        }
        Destination::S3(t) => format!("s3://{}/{}", t.bucket, t.prefix),
    }
}
