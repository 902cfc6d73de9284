//! The agent's YAML configuration (the seed's format, plus `destination` and
//! `age_recipients`). Unknown keys and bad values are errors that name the key and line.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::chunk::ChunkParams;

/// Default maximum chunk size; the CDC average is a quarter of it.
pub const DEFAULT_CHUNK_SIZE: u64 = 4 << 20;
pub const DEFAULT_BLOB_SIZE_LIMIT: u64 = 64 << 20;
pub const DEFAULT_INDEX_PREFIX: &str = "index/";
pub const DEFAULT_COMPRESSION_LEVEL: i32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("destination {url:?}: {message}")]
    Destination { url: String, message: String },
}

/// Where snapshots go: an S3-compatible bucket or a local directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    S3(S3Target),
    Local { root: PathBuf, prefix: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Target {
    #[serde(default)]
    pub endpoint: Option<String>,
    pub bucket: String,
    #[serde(default)]
    pub prefix: String,
    #[serde(default)]
    pub access_key_id: Option<String>,
    #[serde(default)]
    pub secret_access_key: Option<String>,
    #[serde(default)]
    pub region: Option<String>,
}

impl Destination {
    /// Parses `s3://bucket/prefix` or `file:///path`.
    pub fn from_url(url: &str) -> Result<Self, ConfigError> {
        let err = |message: &str| ConfigError::Destination {
            url: url.to_string(),
            message: message.to_string(),
        };
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(err("the bucket name is empty"));
            }
            Ok(Destination::S3(S3Target {
                bucket: bucket.to_string(),
                prefix: prefix.to_string(),
                ..S3Target::default()
            }))
        } else if let Some(path) = url.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(err("a file URL needs an absolute path: file:///dir"));
            }
            Ok(Destination::Local {
                root: PathBuf::from(path),
                prefix: String::new(),
            })
        } else if url.starts_with('/') {
            Ok(Destination::Local {
                root: PathBuf::from(url),
                prefix: String::new(),
            })
        } else {
            Err(err(
                "expected s3://bucket/prefix, file:///path or an absolute path",
            ))
        }
    }

    /// The `<bucket> <prefix>` pair of the restore-side commands: `bucket` is a bucket
    /// name (S3 settings from the environment or `--config`) or a URL.
    pub fn from_bucket_arg(
        bucket: &str,
        prefix: &str,
        s3_defaults: Option<&S3Target>,
    ) -> Result<Self, ConfigError> {
        let mut dest = if bucket.contains("://") || bucket.starts_with('/') {
            Destination::from_url(bucket)?
        } else if bucket.contains('/') {
            return Err(ConfigError::Destination {
                url: bucket.to_string(),
                message:
                    "not a bucket name: for a local directory give an absolute path or file:///path"
                        .into(),
            });
        } else {
            let mut target = s3_defaults.cloned().unwrap_or_default();
            target.bucket = bucket.to_string();
            target.prefix = String::new();
            Destination::S3(target)
        };
        dest.push_prefix(prefix);
        Ok(dest)
    }

    fn push_prefix(&mut self, more: &str) {
        let p = match self {
            Destination::S3(t) => &mut t.prefix,
            Destination::Local { prefix, .. } => prefix,
        };
        *p = join_prefix(p, more);
    }

    pub fn prefix(&self) -> &str {
        match self {
            Destination::S3(t) => &t.prefix,
            Destination::Local { prefix, .. } => prefix,
        }
    }
}

/// Joins object-key prefixes, dropping empty segments so no key ever has `//` or a
/// trailing-slash "directory marker".
pub fn join_prefix(a: &str, b: &str) -> String {
    a.split('/')
        .chain(b.split('/'))
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("/")
}

/// A size written as `10MB`, `4 MiB`, `1GB` or a plain byte count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl std::str::FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("{s:?} is not a size (examples: 4MiB, 10MB, 1048576)"))?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1000,
            "kib" => 1 << 10,
            "m" | "mb" => 1000 * 1000,
            "mib" => 1 << 20,
            "g" | "gb" => 1000 * 1000 * 1000,
            "gib" => 1 << 30,
            "t" | "tb" => 1000u64.pow(4),
            "tib" => 1 << 40,
            other => return Err(format!("unknown size unit {other:?} in {s:?}")),
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("size {s:?} is too large"))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d) {
            Ok(Raw::N(n)) => Ok(ByteSize(n)),
            Ok(Raw::S(s)) => s.parse().map_err(serde::de::Error::custom),
            Err(_) => Err(serde::de::Error::custom(
                "expected a size such as 4MiB, 10MB or 1048576",
            )),
        }
    }
}

/// A duration written as `1h`, `15m`, `24h`, `7days`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interval(pub Duration);

impl<'de> Deserialize<'de> for Interval {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map(Interval)
            .map_err(|e| serde::de::Error::custom(format!("{s:?} is not a duration ({e})")))
    }
}

/// A `source_dirs` entry: a path, or `{ path: /mnt/usb, optional: true }` for a source
/// that may be absent (an unplugged disk) without failing the backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceDir {
    pub path: PathBuf,
    pub optional: bool,
}

impl<'de> Deserialize<'de> for SourceDir {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Full {
            path: PathBuf,
            #[serde(default)]
            optional: bool,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Path(PathBuf),
            Full(Full),
        }
        match Raw::deserialize(d) {
            Ok(Raw::Path(path)) => Ok(SourceDir {
                path,
                optional: false,
            }),
            Ok(Raw::Full(f)) => Ok(SourceDir {
                path: f.path,
                optional: f.optional,
            }),
            Err(_) => Err(serde::de::Error::custom(
                "expected a path, or a map with `path` and `optional`",
            )),
        }
    }
}

/// Checks a configured source path: absolute, and no `.` or `..` component (which
/// would be stored as such and refused at restore).
fn check_source(dir: &Path) -> Result<(), String> {
    if !dir.is_absolute() {
        return Err(format!("{} is not an absolute path", dir.display()));
    }
    let bytes = dir.as_os_str().as_encoded_bytes();
    if bytes.split(|b| *b == b'/').any(|c| c == b"." || c == b"..") {
        return Err(format!(
            "{} has a `.` or `..` component: write the path it means",
            dir.display()
        ));
    }
    Ok(())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    source_dirs: Vec<SourceDir>,
    #[serde(default)]
    exclude: Vec<String>,
    #[serde(default)]
    age_recipient: Option<String>,
    #[serde(default)]
    age_recipients: Vec<String>,
    #[serde(default)]
    s3: Option<S3Target>,
    #[serde(default)]
    destination: Option<String>,
    #[serde(default)]
    backup_interval: Option<Interval>,
    #[serde(default)]
    full_scan_interval: Option<Interval>,
    #[serde(default)]
    min_time_between_run: Option<Interval>,
    #[serde(default)]
    index_path: Option<PathBuf>,
    #[serde(default)]
    chunk_size: Option<ByteSize>,
    #[serde(default)]
    blob_size_limit: Option<ByteSize>,
    #[serde(default)]
    index_prefix: Option<String>,
    #[serde(default)]
    compression_level: Option<i32>,
    #[serde(default)]
    hostname: Option<String>,
    #[serde(default)]
    retry_for: Option<Interval>,
    #[serde(default)]
    state_dir: Option<PathBuf>,
    #[serde(default)]
    heartbeat_interval: Option<Interval>,
}

/// How often the daemon sends host metrics, unless the config says otherwise.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(30);

/// A validated agent configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub source_dirs: Vec<SourceDir>,
    pub exclude: Vec<String>,
    pub recipients: Vec<String>,
    pub destination: Destination,
    pub backup_interval: Option<Duration>,
    pub full_scan_interval: Option<Duration>,
    pub min_time_between_run: Option<Duration>,
    pub index_path: PathBuf,
    pub chunk: ChunkParams,
    pub blob_size_limit: u64,
    pub index_prefix: String,
    pub compression_level: i32,
    pub hostname: Option<String>,
    /// How long each storage request is retried through transient failures.
    pub retry_for: Duration,
    /// The daemon's state: its fleet identity (`link/`) and outbox. Default: the
    /// directory of `index_path`.
    pub state_dir: PathBuf,
    /// How often the daemon reports host metrics to the controller.
    pub heartbeat_interval: Duration,
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let raw: RawConfig = serde_path_to_error::deserialize(
            serde_norway::Deserializer::from_str(text),
        )
        .map_err(|e| {
            let path = e.path().to_string();
            let mut msg = e.into_inner().to_string();
            if !msg.contains(" line ")
                && let Some(line) = line_of_key(text, &path)
            {
                msg = format!("{msg} at line {line}");
            }
            if path == "." || path == "?" || msg.contains(&path) {
                invalid(msg)
            } else {
                invalid(format!("{path}: {msg}"))
            }
        })?;

        if raw.source_dirs.is_empty() {
            return Err(invalid(
                "source_dirs: at least one directory is needed".into(),
            ));
        }
        let mut recipients = raw.age_recipients;
        recipients.extend(raw.age_recipient);
        if recipients.is_empty() {
            return Err(invalid(
                "age_recipient: missing (an age public key, age1…; see `vaultik keygen`)".into(),
            ));
        }
        for r in &recipients {
            crate::crypt::Recipients::parse(std::slice::from_ref(r)).map_err(|e| {
                let line = text.lines().position(|l| l.contains(r.trim()));
                invalid(match line {
                    Some(i) => format!("{e} at line {}", i + 1),
                    None => e.to_string(),
                })
            })?;
        }
        let destination = match (raw.destination, raw.s3) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "destination and s3: give one of them, not both".into(),
                ));
            }
            (Some(url), None) => {
                Destination::from_url(&url).map_err(|e| invalid(format!("destination: {e}")))?
            }
            (None, Some(s3)) => {
                if s3.bucket.is_empty() {
                    return Err(invalid("s3.bucket: empty".into()));
                }
                Destination::S3(S3Target {
                    prefix: join_prefix(&s3.prefix, ""),
                    ..s3
                })
            }
            (None, None) => {
                return Err(invalid(
                    "no destination: add an s3: block or destination: file:///path".into(),
                ));
            }
        };
        let chunk_size = raw.chunk_size.map_or(DEFAULT_CHUNK_SIZE, |b| b.0);
        let chunk =
            ChunkParams::from_max(chunk_size).map_err(|e| invalid(format!("chunk_size: {e}")))?;
        let blob_size_limit = raw.blob_size_limit.map_or(DEFAULT_BLOB_SIZE_LIMIT, |b| b.0);
        if blob_size_limit < chunk_size {
            return Err(invalid(format!(
                "blob_size_limit: {blob_size_limit} bytes is smaller than chunk_size ({chunk_size})"
            )));
        }
        let compression_level = raw.compression_level.unwrap_or(DEFAULT_COMPRESSION_LEVEL);
        if !(1..=19).contains(&compression_level) {
            return Err(invalid(format!(
                "compression_level: {compression_level} is outside 1..=19"
            )));
        }
        let index_path = raw
            .index_path
            .unwrap_or_else(|| PathBuf::from("/var/lib/vaultik/index.sqlite"));
        let state_dir = raw.state_dir.unwrap_or_else(|| {
            index_path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
        });
        let heartbeat_interval = raw.heartbeat_interval.map_or(DEFAULT_HEARTBEAT, |i| i.0);
        if heartbeat_interval.is_zero() {
            return Err(invalid("heartbeat_interval: must be more than zero".into()));
        }
        let source_dirs = raw.source_dirs;
        for dir in &source_dirs {
            check_source(&dir.path).map_err(|e| invalid(format!("source_dirs: {e}")))?;
        }
        crate::scan::Excludes::new(&raw.exclude).map_err(|e| invalid(format!("exclude: {e}")))?;
        Ok(Config {
            source_dirs,
            exclude: raw.exclude,
            recipients,
            destination,
            backup_interval: raw.backup_interval.map(|i| i.0),
            full_scan_interval: raw.full_scan_interval.map(|i| i.0),
            min_time_between_run: raw.min_time_between_run.map(|i| i.0),
            index_path,
            chunk,
            blob_size_limit,
            index_prefix: raw
                .index_prefix
                .map_or_else(|| DEFAULT_INDEX_PREFIX.to_string(), |p| join_prefix(&p, "")),
            compression_level,
            hostname: raw.hostname,
            retry_for: raw
                .retry_for
                .map_or(crate::store::retry::DEFAULT_RETRY_FOR, |i| i.0),
            state_dir,
            heartbeat_interval,
        })
    }
}

impl Config {
    /// This config under a policy from the controller: its sources, excludes and full
    /// scan interval replace the config's where given. Keys, credentials and the
    /// destination stay the config's: a policy cannot carry them.
    pub fn under_policy(
        &self,
        sources: &[&str],
        exclude: &[&str],
        full_scan: Option<Duration>,
    ) -> Result<Config, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: PathBuf::from("policy"),
            message,
        };
        let mut out = self.clone();
        if !sources.is_empty() {
            out.source_dirs = sources
                .iter()
                .map(|p| {
                    let path = PathBuf::from(p);
                    check_source(&path).map_err(|e| invalid(format!("source_dirs: {e}")))?;
                    Ok(SourceDir {
                        path,
                        optional: false,
                    })
                })
                .collect::<Result<_, ConfigError>>()?;
        }
        if !exclude.is_empty() {
            out.exclude = exclude.iter().map(|s| s.to_string()).collect();
            crate::scan::Excludes::new(&out.exclude)
                .map_err(|e| invalid(format!("exclude: {e}")))?;
        }
        if let Some(f) = full_scan.filter(|f| !f.is_zero()) {
            out.full_scan_interval = Some(f);
        }
        Ok(out)
    }
}

/// 1-based line of the last key of a dotted path such as `s3.bucket`, for errors the
/// YAML parser reports without a position.
fn line_of_key(text: &str, path: &str) -> Option<usize> {
    let key = path
        .rsplit('.')
        .find(|k| !k.is_empty() && !k.starts_with('['))?;
    text.lines()
        .position(|l| {
            let l = l.trim_start().trim_start_matches("- ");
            l.strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with(':'))
        })
        .map(|i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = "source_dirs:\n  - /etc\n  - /home/user/data\nexclude:\n  - '*.log'\n  - '*.tmp'\nage_recipient: age1dt9fd0f6ces2mkxh02yfuz7w7xauncwptqdtdkxseczm5f2ff5lscn5a5x\ns3:\n  endpoint: https://s3.example.com\n  bucket: vaultik-data\n  prefix: host1/\n  access_key_id: AK\n  secret_access_key: SK\n  region: us-east-1\nbackup_interval: 1h\nfull_scan_interval: 24h\nmin_time_between_run: 15m\nindex_path: /var/lib/vaultik/index.sqlite\nchunk_size: 10MB\nblob_size_limit: 10GB\nindex_prefix: index/\n";

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.yaml"))
    }

    #[test]
    fn seed_config_parses() {
        let c = parse(SEED).unwrap();
        assert_eq!(c.source_dirs.len(), 2);
        assert_eq!(c.chunk.max, 10_000_000);
        assert_eq!(c.blob_size_limit, 10_000_000_000);
        assert_eq!(c.backup_interval, Some(Duration::from_secs(3600)));
        assert_eq!(c.index_prefix, "index");
        match c.destination {
            Destination::S3(t) => {
                assert_eq!(t.bucket, "vaultik-data");
                assert_eq!(t.prefix, "host1");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let text = SEED.replace("index_prefix: index/", "index_prefx: index/");
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains("index_prefx"), "{e}");
        assert!(e.contains("line 21"), "{e}");
    }

    #[test]
    fn bad_size_is_named() {
        let text = SEED.replace("chunk_size: 10MB", "chunk_size: ten");
        let e = parse(&text).unwrap_err().to_string();
        assert!(
            e.contains("chunk_size") && e.contains("ten") && e.contains("line 19"),
            "{e}"
        );
    }

    #[test]
    fn destination_urls() {
        assert_eq!(
            Destination::from_url("file:///mnt/usb").unwrap(),
            Destination::Local {
                root: "/mnt/usb".into(),
                prefix: String::new()
            }
        );
        let d = Destination::from_bucket_arg("s3://b/x/", "/host1/", None).unwrap();
        assert_eq!(d.prefix(), "x/host1");
        assert!(Destination::from_url("ftp://x").is_err());
        let bare = Destination::from_bucket_arg("/mnt/usb/backups", "", None).unwrap();
        assert_eq!(
            bare,
            Destination::Local {
                root: "/mnt/usb/backups".into(),
                prefix: String::new()
            }
        );
        let e = Destination::from_bucket_arg("usb/backups", "", None).unwrap_err();
        assert!(e.to_string().contains("file:///path"), "{e}");
        assert!(Destination::from_url("file://relative").is_err());
    }

    #[test]
    fn source_dirs_are_checked_and_may_be_optional() {
        let c = parse(&SEED.replace(
            "  - /home/user/data",
            "  - { path: /mnt/usb, optional: true }",
        ))
        .unwrap();
        assert_eq!(
            c.source_dirs[1],
            SourceDir {
                path: "/mnt/usb".into(),
                optional: true
            }
        );
        let e = parse(&SEED.replace("/home/user/data", "/home/../etc"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/home/../etc") && e.contains("`..`"), "{e}");
        let e = parse(&SEED.replace("/home/user/data", "home"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not an absolute path"), "{e}");
    }

    #[test]
    fn sizes() {
        assert_eq!("4MiB".parse::<ByteSize>().unwrap().0, 4 << 20);
        assert_eq!("10 MB".parse::<ByteSize>().unwrap().0, 10_000_000);
        assert!("4XB".parse::<ByteSize>().is_err());
        assert!("99999999999TB".parse::<ByteSize>().is_err());
    }
}
