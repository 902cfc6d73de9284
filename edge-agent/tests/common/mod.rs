//! Shared test support: a real S3 server (s3s-fs over HTTP on 127.0.0.1), an external one
//! (`rclone serve s3`), a byte-counting TCP proxy, trees with every metadata case, and a
//! stat-for-stat comparison of two trees.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub const AK: &str = "vaultik-test-ak";
pub const SK: &str = "vaultik-test-secret-key";
pub const BUCKET: &str = "bucket";

/// An in-process S3 server on its own runtime thread. `write_only_endpoint` serves the
/// same storage but allows only the calls a backup needs (PutObject and multipart);
/// `no_put_endpoint` allows everything but single-request PutObject, which is how a
/// backup uploads its manifest: a fault injected exactly at the commit point.
pub struct S3Server {
    pub endpoint: String,
    pub write_only_endpoint: String,
    pub no_put_endpoint: String,
    pub root: tempfile::TempDir,
    _rt: tokio::runtime::Runtime,
}

/// Which calls an endpoint allows.
#[derive(Clone, Copy)]
enum Access {
    WriteOnly,
    NoPutObject,
}

#[async_trait::async_trait]
impl s3s::access::S3Access for Access {
    async fn check(&self, cx: &mut s3s::access::S3AccessContext<'_>) -> s3s::S3Result<()> {
        const UPLOADS: [&str; 5] = [
            "PutObject",
            "CreateMultipartUpload",
            "UploadPart",
            "CompleteMultipartUpload",
            "AbortMultipartUpload",
        ];
        if cx.credentials().is_none() {
            return Err(s3s::s3_error!(AccessDenied, "anonymous"));
        }
        let op = cx.s3_op().name();
        let allowed = match self {
            Access::WriteOnly => UPLOADS.contains(&op),
            Access::NoPutObject => op != "PutObject",
        };
        if allowed {
            Ok(())
        } else {
            Err(s3s::s3_error!(
                AccessDenied,
                "not allowed for this test endpoint"
            ))
        }
    }
}

impl S3Server {
    pub fn start() -> Self {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join(BUCKET)).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let endpoint = serve(&rt, root.path(), None);
        let write_only_endpoint = serve(&rt, root.path(), Some(Access::WriteOnly));
        let no_put_endpoint = serve(&rt, root.path(), Some(Access::NoPutObject));
        S3Server {
            endpoint,
            write_only_endpoint,
            no_put_endpoint,
            root,
            _rt: rt,
        }
    }

    pub fn bucket_dir(&self) -> PathBuf {
        self.root.path().join(BUCKET)
    }
}

fn serve(rt: &tokio::runtime::Runtime, root: &Path, access: Option<Access>) -> String {
    let fs = s3s_fs::FileSystem::new(root).unwrap();
    let mut b = s3s::service::S3ServiceBuilder::new(fs);
    b.set_auth(s3s::auth::SimpleAuth::from_single(AK, SK));
    if let Some(access) = access {
        b.set_access(access);
    }
    let service = b.build();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move {
        let http =
            hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                continue;
            };
            let conn = http
                .serve_connection(hyper_util::rt::TokioIo::new(sock), service.clone())
                .into_owned();
            tokio::spawn(async move {
                let _ = conn.await;
            });
        }
    });
    format!("http://{addr}")
}

/// `rclone serve s3` on a free loopback port: an S3 server independent of ours.
pub struct Rclone {
    pub endpoint: String,
    pub root: tempfile::TempDir,
    child: Child,
}

impl Rclone {
    pub fn start() -> Self {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join(BUCKET)).unwrap();
        let port = free_port();
        let mut child = Command::new("rclone")
            .args(["serve", "s3", "--auth-key", &format!("{AK},{SK}")])
            .args(["--addr", &format!("127.0.0.1:{port}")])
            .arg(root.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("rclone is needed for this test: run ./scripts/test.sh, which installs it");
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Rclone {
                    endpoint: format!("http://127.0.0.1:{port}"),
                    root,
                    child,
                };
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("rclone serve s3 did not start listening on 127.0.0.1:{port}");
    }
}

impl Drop for Rclone {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A TCP proxy that counts the bytes flowing from the server to the client.
pub struct CountingProxy {
    pub endpoint: String,
    pub down: Arc<AtomicU64>,
    _rt: tokio::runtime::Runtime,
}

impl CountingProxy {
    pub fn start(upstream: &str) -> Self {
        Self::start_on(0, upstream)
    }

    /// A proxy on a given port (0 for any), e.g. one a client was already told about.
    pub fn start_on(port: u16, upstream: &str) -> Self {
        let up: SocketAddr = upstream.trim_start_matches("http://").parse().unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(("127.0.0.1", port)))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let down = Arc::new(AtomicU64::new(0));
        let counter = down.clone();
        rt.spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                let counter = counter.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(up).await else {
                        return;
                    };
                    let (mut cr, mut cw) = client.split();
                    let (mut sr, mut sw) = server.split();
                    let c2s = tokio::io::copy(&mut cr, &mut sw);
                    let s2c = async {
                        let n = tokio::io::copy(&mut sr, &mut cw).await.unwrap_or(0);
                        counter.fetch_add(n, Ordering::Relaxed);
                    };
                    let _ = tokio::join!(c2s, s2c);
                });
            }
        });
        CountingProxy {
            endpoint: format!("http://{addr}"),
            down,
            _rt: rt,
        }
    }
}

/// A key pair made with the real `vaultik keygen`.
pub struct Key {
    pub file: PathBuf,
    pub secret: String,
    pub public: String,
}

pub fn keygen(dir: &Path) -> Key {
    let file = dir.join("key.txt");
    let out = vaultik(&["keygen", "-o", file.to_str().unwrap()], &[]);
    assert!(out.status.success(), "keygen: {}", stderr(&out));
    Key::from_file(file)
}

impl Key {
    /// Reads a key file in `age-keygen`'s format.
    pub fn from_file(file: PathBuf) -> Key {
        let secret = std::fs::read_to_string(&file).unwrap();
        let public = secret
            .lines()
            .find_map(|l| l.strip_prefix("# public key: "))
            .unwrap()
            .to_string();
        Key {
            file,
            secret,
            public,
        }
    }
}

/// A config backing `sources` up to `dir/repo` with the index in `dir/state`.
pub fn local_config(dir: &Path, sources: &[&Path], key: &Key, extra: &str) -> PathBuf {
    let srcs: Vec<String> = sources.iter().map(|s| s.display().to_string()).collect();
    let text = format!(
        "source_dirs: [{}]\nage_recipient: {}\ndestination: file://{}/repo\nindex_path: {}/state/index.sqlite\n{extra}",
        srcs.join(", "),
        key.public,
        dir.display(),
        dir.display()
    );
    let path = dir.join("c.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

/// The `<bucket>` argument for a [`local_config`] repository.
pub fn local_repo(dir: &Path) -> String {
    format!("file://{}/repo", dir.display())
}

/// `vaultik prune` of repository `repo` (prefix "") down to its newest snapshot, with
/// no safety margin.
pub fn prune_to_newest(repo: &str, env: &[(&str, &str)]) -> Output {
    let margin = ["--safety-margin", "0s", "--allow-short-margin"];
    let args = [&["prune", repo, "", "--keep-last", "1"][..], &margin].concat();
    vaultik(&args, env)
}

pub fn vaultik(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vaultik"));
    c.args(args).env_remove("VAULTIK_PRIVATE_KEY");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

/// `vaultik backup CONFIG --cron`, which must succeed.
pub fn backup_ok(cfg: &Path) {
    let out = vaultik(&["backup", cfg.to_str().unwrap(), "--cron"], &[]);
    assert!(out.status.success(), "backup: {}", stderr(&out));
}

/// `vaultik snapshots --json`, which must succeed.
/// The summary of the newest snapshot in the local repository under `dir`.
pub fn last_summary(dir: &Path, key: &Key) -> serde_json::Value {
    let env = [("VAULTIK_PRIVATE_KEY", key.secret.as_str())];
    let list = snapshot_list(&local_repo(dir), "", &env);
    list.last().unwrap()["summary"].clone()
}

pub fn snapshot_list(bucket: &str, prefix: &str, env: &[(&str, &str)]) -> Vec<serde_json::Value> {
    let out = vaultik(&["snapshots", bucket, prefix, "--json"], env);
    assert!(out.status.success(), "snapshots: {}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Output of a shell command, which must succeed (`stdin` is fed to it).
fn sh_output(sh: &str, stdin: &[u8]) -> Vec<u8> {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(sh)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let feed = std::thread::spawn(move || input.write_all(&data));
    let out = child.wait_with_output().unwrap();
    feed.join().unwrap().unwrap();
    assert!(
        out.status.success(),
        "{sh} failed (age and zstd come from ./scripts/test.sh)"
    );
    out.stdout
}

/// The piece list of a metadata object (manifest format 3), decrypted with stock tools.
pub fn piece_list(key: &Key, meta: &Path) -> serde_json::Value {
    let age = format!("age -d -i {}", key.file.display());
    let list = sh_output(&format!("{age} {} | zstd -q -d", meta.display()), b"");
    serde_json::from_slice(&list).unwrap()
}

/// The blob files of a repository directory that hold file content: every blob but
/// those the snapshots' piece lists name.
pub fn data_blobs(repo: &Path, key: &Key) -> Vec<PathBuf> {
    let mut metadata = std::collections::HashSet::new();
    for e in std::fs::read_dir(repo.join("index")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|e| e == "metadata") {
            for b in piece_list(key, &p)["blobs"].as_array().unwrap() {
                metadata.insert(b["id"].as_str().unwrap().to_string());
            }
        }
    }
    walk(&repo.join("blobs"))
        .into_iter()
        .filter(|(p, m)| {
            m.is_file() && !metadata.contains(p.file_name().unwrap().to_str().unwrap())
        })
        .map(|(p, _)| p)
        .collect()
}

/// Rebuilds a snapshot's metadata database into `db` with the stock `age` and `zstd`
/// tools, as docs/FORMAT.md describes: the metadata object is a list of pieces, each a
/// frame in a blob of the same repository (a directory: `meta` is `<repo>/index/…`); a
/// delta piece decompresses with `zstd --patch-from` its base.
pub fn decrypt_metadata(key: &Key, meta: &Path, db: &Path) {
    let age = format!("age -d -i {}", key.file.display());
    let list = piece_list(key, meta);
    let repo = meta.parent().unwrap().parent().unwrap();
    let blobs: Vec<Vec<u8>> = list["blobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            let id = b["id"].as_str().unwrap();
            let path = repo.join("blobs").join(&id[..2]).join(id);
            sh_output(&format!("{age} {}", path.display()), b"")
        })
        .collect();
    let mut chunk_key = [0u8; 32];
    hex::decode_to_slice(list["chunk_key"].as_str().unwrap(), &mut chunk_key).unwrap();
    let base_file = db.with_extension("base");
    let open = |p: &serde_json::Value, base: Option<Vec<u8>>| {
        let n = |k: &str| p[k].as_u64().unwrap() as usize;
        let frame = &blobs[n("blob")][n("offset")..n("offset") + n("clen")];
        let id = p["id"].as_str().unwrap();
        let keyed = |b: &[u8]| blake3::keyed_hash(&chunk_key, b).to_hex().to_string();
        let piece = match base {
            Some(base) => {
                std::fs::write(&base_file, base).unwrap();
                let patch = format!("zstd -q -d -c --patch-from={}", base_file.display());
                sh_output(&patch, frame)
            }
            None if n("clen") == n("ulen") && keyed(frame) == id => frame.to_vec(),
            None => sh_output("zstd -q -d -c", frame),
        };
        assert_eq!(keyed(&piece), id, "piece hash");
        piece
    };
    // Bases first, each after the one it is a delta against (a list names at most a
    // few deltas in a chain).
    let bases = list["bases"].as_array().cloned().unwrap_or_default();
    let mut opened: Vec<Option<Vec<u8>>> = vec![None; bases.len()];
    while opened.iter().any(Option::is_none) {
        for (n, b) in bases.iter().enumerate() {
            let under = b["base"].as_u64().map(|u| opened[u as usize].clone());
            if opened[n].is_none() && under.as_ref().is_none_or(Option::is_some) {
                opened[n] = Some(open(b, under.flatten()));
            }
        }
    }
    let mut out = Vec::new();
    for p in list["pieces"].as_array().unwrap() {
        let base = p["base"]
            .as_u64()
            .map(|b| opened[b as usize].clone().unwrap());
        out.extend_from_slice(&open(p, base));
    }
    let _ = std::fs::remove_file(&base_file);
    assert_eq!(out.len() as u64, list["size"].as_u64().unwrap());
    std::fs::write(db, out).unwrap();
}

/// Changes the agent's kept copy of its newest snapshot's metadata as a damaged disk
/// or an older agent could: unpacked with the stock `zstd`, `edit`ed, packed again.
pub fn edit_kept_copy(state: &Path, edit: impl FnOnce(&Path)) {
    let packed = state.join("index.sqlite-prev.zst");
    let db = state.join("edited.sqlite");
    let run = |args: &[&std::ffi::OsStr]| {
        let out = Command::new("zstd").args(args).output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    };
    run(&[
        "-q".as_ref(),
        "-d".as_ref(),
        "-f".as_ref(),
        packed.as_os_str(),
        "-o".as_ref(),
        db.as_os_str(),
    ]);
    edit(&db);
    run(&[
        "-q".as_ref(),
        "-f".as_ref(),
        db.as_os_str(),
        "-o".as_ref(),
        packed.as_os_str(),
    ]);
    std::fs::remove_file(&db).unwrap();
}

/// Runs `sql` with the stock `sqlite3` and returns its output.
pub fn sqlite(db: &Path, sql: &str) -> String {
    let out = Command::new("sqlite3")
        .arg(db)
        .arg(sql)
        .output()
        .expect("sqlite3 comes from ./scripts/test.sh");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn s3_config(
    dir: &Path,
    endpoint: &str,
    prefix: &str,
    sources: &[&Path],
    key: &Key,
    extra: &str,
) -> PathBuf {
    let srcs: Vec<String> = sources
        .iter()
        .map(|s| format!("  - {}", s.display()))
        .collect();
    let text = format!(
        "source_dirs:\n{}\nage_recipient: {}\ns3:\n  endpoint: {endpoint}\n  bucket: {BUCKET}\n  prefix: {prefix}\n  access_key_id: {AK}\n  secret_access_key: {SK}\n  region: us-east-1\nindex_path: {}\n{extra}",
        srcs.join("\n"),
        key.public,
        dir.join("state/index.sqlite").display()
    );
    let path = dir.join("vaultik.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Environment for the restore-side commands against an S3 endpoint.
pub fn s3_env<'a>(endpoint: &'a str, key: &'a Key) -> Vec<(&'a str, &'a str)> {
    vec![
        ("AWS_ACCESS_KEY_ID", AK),
        ("AWS_SECRET_ACCESS_KEY", SK),
        ("AWS_ENDPOINT_URL", endpoint),
        ("AWS_REGION", "us-east-1"),
        ("VAULTIK_PRIVATE_KEY", key.secret.as_str()),
    ]
}

fn set_mtime(p: &Path, secs: i64, nanos: u32) {
    let t = filetime::FileTime::from_unix_time(secs, nanos);
    filetime::set_symlink_file_times(p, t, t).unwrap();
}

/// Builds a tree with every case restore must reproduce. `big` adds a 3 GiB sparse file.
pub fn fidelity_tree(root: &Path, big: bool) {
    use std::os::unix::ffi::OsStrExt;
    let p = |s: &str| root.join(s);
    std::fs::create_dir_all(p("dir/empty")).unwrap();
    std::fs::create_dir_all(p("dir/sub")).unwrap();
    std::fs::write(p("dir/hello.txt"), b"hello, world\n").unwrap();
    std::fs::write(p("zero-bytes"), b"").unwrap();
    std::fs::write(p("dir/sub/random.bin"), pseudo_random(3 << 20, 1)).unwrap();
    // Same content twice: stored once.
    std::fs::write(p("dir/sub/copy.bin"), pseudo_random(3 << 20, 1)).unwrap();
    // Names that are not UTF-8 or contain a newline.
    let odd = root.join(std::ffi::OsStr::from_bytes(b"odd-\xff\xfe-name"));
    std::fs::write(&odd, b"latin-1 name").unwrap();
    std::fs::write(p("new\nline"), b"newline in the name").unwrap();
    // Long component and deep nesting.
    let long = "L".repeat(255);
    std::fs::write(root.join(&long), b"long name").unwrap();
    let mut deep = p("deep");
    for i in 0..40 {
        deep.push(format!("level-{i:02}-{}", "d".repeat(40)));
    }
    std::fs::create_dir_all(&deep).unwrap();
    std::fs::write(deep.join("bottom.txt"), b"deep file").unwrap();
    // Links: symlinks (one dangling, one to a dir), hard links.
    std::os::unix::fs::symlink("hello.txt", p("dir/link")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/target", p("dangling")).unwrap();
    std::os::unix::fs::symlink("sub", p("dir/dirlink")).unwrap();
    std::fs::write(p("hard-a"), b"shared inode").unwrap();
    std::fs::hard_link(p("hard-a"), p("dir/hard-b")).unwrap();
    std::fs::hard_link(p("hard-a"), p("hard-c")).unwrap();
    // Modes, owners, xattrs.
    std::fs::write(p("script.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(p("script.sh"), std::fs::Permissions::from_mode(0o750)).unwrap();
    std::fs::write(p("secret"), b"mode 600").unwrap();
    std::fs::set_permissions(p("secret"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(p("dir/sub"), std::fs::Permissions::from_mode(0o2755)).unwrap();
    std::fs::write(p("owned"), b"owned by someone else").unwrap();
    std::os::unix::fs::lchown(p("owned"), Some(1234), Some(5678)).unwrap();
    xattr::set(p("dir/hello.txt"), "user.vaultik", b"xattr value\x00\x01").unwrap();
    xattr::set(p("dir/sub"), "user.on-a-dir", b"yes").unwrap();
    // Sparse: a hole, data, a hole.
    if big {
        let f = std::fs::File::create(p("sparse-3g")).unwrap();
        f.set_len(3 << 30).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(b"data in the middle of a hole", 1 << 30)
            .unwrap();
    }
    // Nanosecond mtimes everywhere, directories last.
    let mut all: Vec<PathBuf> = walk(root).into_iter().map(|(p, _)| p).collect();
    all.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for (i, path) in all.iter().enumerate() {
        set_mtime(path, 1_600_000_000 + i as i64, 123_456_789 + i as u32);
    }
}

pub fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(n);
    v
}

/// Every entry below `root` (excluding it), with lstat data.
pub fn walk(root: &Path) -> Vec<(PathBuf, std::fs::Metadata)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            if m.is_dir() {
                stack.push(e.path());
            }
            out.push((e.path(), m));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// A description of one entry, everything restore promises to keep.
#[derive(Debug, PartialEq, Eq)]
pub struct Desc {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime_ns: i64,
    content: Option<[u8; 32]>,
    link: Option<Vec<u8>>,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Index of the first path sharing this inode (hard links).
    inode_group: Option<PathBuf>,
}

pub fn describe(root: &Path) -> BTreeMap<PathBuf, Desc> {
    let mut first_of_inode: BTreeMap<(u64, u64), PathBuf> = BTreeMap::new();
    let mut out = BTreeMap::new();
    for (path, m) in walk(root) {
        let rel = path.strip_prefix(root).unwrap().to_path_buf();
        let ft = m.file_type();
        let kind = if ft.is_dir() {
            "dir"
        } else if ft.is_symlink() {
            "symlink"
        } else {
            "file"
        };
        let content = ft.is_file().then(|| {
            let mut h = blake3::Hasher::new();
            h.update_reader(std::fs::File::open(&path).unwrap())
                .unwrap();
            *h.finalize().as_bytes()
        });
        let link = ft.is_symlink().then(|| {
            std::fs::read_link(&path)
                .unwrap()
                .as_os_str()
                .as_bytes()
                .to_vec()
        });
        let xattrs = if ft.is_symlink() {
            BTreeMap::new()
        } else {
            xattr::list(&path)
                .unwrap()
                .map(|n| {
                    let v = xattr::get(&path, &n).unwrap().unwrap_or_default();
                    (n.as_bytes().to_vec(), v)
                })
                .collect()
        };
        let inode_group = (ft.is_file() && m.nlink() > 1).then(|| {
            first_of_inode
                .entry((m.dev(), m.ino()))
                .or_insert(rel.clone())
                .clone()
        });
        out.insert(
            rel,
            Desc {
                kind,
                mode: m.mode(),
                uid: m.uid(),
                gid: m.gid(),
                mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
                content,
                link,
                xattrs,
                inode_group,
            },
        );
    }
    out
}

/// Asserts two trees are equal entry for entry, naming the first difference.
pub fn assert_same_tree(expected: &Path, actual: &Path) {
    let (a, b) = (describe(expected), describe(actual));
    let ka: Vec<_> = a.keys().collect();
    let kb: Vec<_> = b.keys().collect();
    assert_eq!(ka, kb, "restored tree has different entries");
    for (k, da) in &a {
        assert_eq!(Some(da), b.get(k), "entry {k:?} differs");
    }
}

/// The restored copy of an absolute source directory inside a restore target.
pub fn restored(target: &Path, source: &Path) -> PathBuf {
    target.join(source.strip_prefix("/").unwrap())
}

/// Writes a file, making its directory first.
pub fn write_file(path: &Path, data: &[u8]) {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(data).unwrap();
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// Rebuilds a snapshot's metadata with stock tools, runs `sql` on it, and writes it
/// back with a matching manifest, as an attacker with the public key could: as a
/// manifest-format-2 snapshot (the whole database in the metadata object), which
/// readers still accept.
pub fn tamper_metadata(repo: &Path, key: &Key, sql: &str) {
    let idx = repo.join("index");
    let meta = std::fs::read_dir(&idx)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "metadata"))
        .unwrap();
    let db = meta.with_extension("tamper.sqlite");
    let _ = std::fs::remove_file(&db);
    decrypt_metadata(key, &meta, &db);
    let sh = format!(
        "sqlite3 {db} \"{sql}\" && zstd -q -c {db} | age -r {r} -o {m}.new && mv {m}.new {m}",
        m = meta.display(),
        db = db.display(),
        r = key.public,
    );
    assert!(
        Command::new("sh")
            .arg("-c")
            .arg(&sh)
            .status()
            .unwrap()
            .success(),
        "{sh}"
    );
    std::fs::remove_file(&db).unwrap();
    let sealed = std::fs::read(&meta).unwrap();
    rewrite_manifest(&meta.with_extension("snapshot"), key, |m| {
        m["format"] = 2.into();
        m["metadata_size"] = sealed.len().into();
        m["metadata_hash"] = hex::encode(blake3::hash(&sealed).as_bytes()).into();
    });
}

/// Writes `list` as the piece list of the metadata object `meta` with the stock `zstd`
/// and `age`, and points its manifest at it, as anyone who can write to the bucket could.
pub fn rewrite_piece_list(meta: &Path, key: &Key, list: &serde_json::Value) {
    let sh = format!("zstd -q -c | age -r {} -o {}", key.public, meta.display());
    sh_output(&sh, &serde_json::to_vec(list).unwrap());
    let sealed = std::fs::read(meta).unwrap();
    rewrite_manifest(&meta.with_extension("snapshot"), key, |m| {
        m["metadata_size"] = sealed.len().into();
        m["metadata_hash"] = hex::encode(blake3::hash(&sealed).as_bytes()).into();
    });
}

/// Decrypts a manifest with the stock `age`, lets `edit` change its JSON, and encrypts
/// it again to the public key, as anyone who can write to the bucket could.
pub fn rewrite_manifest(manifest: &Path, key: &Key, edit: impl FnOnce(&mut serde_json::Value)) {
    let out = Command::new("age")
        .args(["-d", "-i"])
        .arg(&key.file)
        .arg(manifest)
        .output()
        .unwrap();
    let mut m: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    edit(&mut m);
    let mut child = Command::new("age")
        .args(["-r", &key.public, "-o"])
        .arg(manifest)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&serde_json::to_vec(&m).unwrap())
        .unwrap();
    assert!(child.wait().unwrap().success());
}

/// A path as stored in metadata (relative to `/`), as an SQL BLOB literal.
pub fn stored(p: &Path) -> String {
    let b = p.as_os_str().as_bytes();
    format!("X'{}'", hex::encode(b.strip_prefix(b"/").unwrap_or(b)))
}

/// Creates a directory in passing: `dir.join("x").tap_mkdir()`.
pub trait TapMkdir {
    fn tap_mkdir(self) -> Self;
}
impl TapMkdir for std::path::PathBuf {
    fn tap_mkdir(self) -> Self {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}

/// `vaultik restore BUCKET PREFIX latest TARGET -q`.
/// Restores the newest snapshot of the local repository under `dir` into `dir/name`
/// and checks it is `src`, exactly.
pub fn restore_latest_matches(dir: &Path, key: &Key, src: &Path, name: &str) {
    let env = [("VAULTIK_PRIVATE_KEY", key.secret.as_str())];
    let target = dir.join(name);
    let out = restore_latest(&local_repo(dir), "", &target, &env);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_same_tree(src, &restored(&target, src));
}

pub fn restore_latest(bucket: &str, prefix: &str, target: &Path, env: &[(&str, &str)]) -> Output {
    vaultik(
        &[
            "restore",
            bucket,
            prefix,
            "latest",
            target.to_str().unwrap(),
            "-q",
        ],
        env,
    )
}
