//! age encryption to public keys (backup side) and decryption with the private key
//! (restore side), plus a seekable reader over a remote object so that restore decrypts
//! only the 64 KiB STREAM pieces it needs.

use std::io::{self, Read, Seek, SeekFrom, Write};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use age::secrecy::ExposeSecret;
use bytes::Bytes;
use object_store::path::Path as Key;

use crate::store::Repo;

/// age STREAM plaintext piece size and its ciphertext size (piece + Poly1305 tag).
pub const STREAM_CHUNK: u64 = 64 * 1024;
pub const STREAM_CHUNK_ENCRYPTED: u64 = STREAM_CHUNK + 16;

/// Environment variable holding the age identity (the text of a key file).
pub const PRIVATE_KEY_ENV: &str = "VAULTIK_PRIVATE_KEY";
/// Alternative: a path to a key file.
pub const PRIVATE_KEY_FILE_ENV: &str = "VAULTIK_PRIVATE_KEY_FILE";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("age recipient {value:?} is not an age public key (age1…): {message}")]
    Recipient { value: String, message: String },
    #[error(
        "no private key: set {PRIVATE_KEY_ENV} to the contents of your key file (or {PRIVATE_KEY_FILE_ENV} to its path)"
    )]
    MissingIdentity,
    #[error("{source_name} holds no usable age secret key (AGE-SECRET-KEY-1…)")]
    BadIdentity { source_name: String },
    #[error("{what}: the private key does not match any recipient of this repository")]
    WrongKey { what: String },
    #[error("{what}: cannot decrypt: {message}")]
    Decrypt { what: String, message: String },
    #[error("encrypting {what}: {message}")]
    Encrypt { what: String, message: String },
}

/// The public keys a backup is encrypted to.
#[derive(Clone)]
pub struct Recipients(Vec<age::x25519::Recipient>);

impl Recipients {
    pub fn parse(list: &[String]) -> Result<Self, KeyError> {
        list.iter()
            .map(|s| {
                age::x25519::Recipient::from_str(s.trim()).map_err(|e| KeyError::Recipient {
                    value: s.clone(),
                    message: e.to_string(),
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Recipients)
    }

    /// Wraps `out` in an age writer. Returns the writer; the caller must `finish()` it.
    pub fn encrypt<W: Write>(
        &self,
        out: W,
        what: &str,
    ) -> Result<age::stream::StreamWriter<W>, KeyError> {
        let err = |message: String| KeyError::Encrypt {
            what: what.to_string(),
            message,
        };
        let enc = age::Encryptor::with_recipients(self.0.iter().map(|r| r as &dyn age::Recipient))
            .map_err(|e| err(e.to_string()))?;
        enc.wrap_output(out).map_err(|e| err(e.to_string()))
    }
}

/// The private keys a restore decrypts with.
#[derive(Clone)]
pub struct Identities(Arc<Vec<age::x25519::Identity>>);

impl Identities {
    /// Reads `VAULTIK_PRIVATE_KEY` (key file text) or `VAULTIK_PRIVATE_KEY_FILE`.
    pub fn from_env() -> Result<Self, KeyError> {
        if let Ok(text) = std::env::var(PRIVATE_KEY_ENV) {
            return Self::parse(&text, PRIVATE_KEY_ENV);
        }
        if let Ok(path) = std::env::var(PRIVATE_KEY_FILE_ENV) {
            let text = std::fs::read_to_string(&path).map_err(|_| KeyError::BadIdentity {
                source_name: format!("{PRIVATE_KEY_FILE_ENV}={path} (unreadable)"),
            })?;
            return Self::parse(&text, &path);
        }
        Err(KeyError::MissingIdentity)
    }

    /// Accepts the text of an `age-keygen` key file: comments and blank lines are ignored.
    pub fn parse(text: &str, source_name: &str) -> Result<Self, KeyError> {
        let mut ids = Vec::new();
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let id = age::x25519::Identity::from_str(line).map_err(|_| KeyError::BadIdentity {
                source_name: source_name.to_string(),
            })?;
            ids.push(id);
        }
        if ids.is_empty() {
            return Err(KeyError::BadIdentity {
                source_name: source_name.to_string(),
            });
        }
        Ok(Identities(Arc::new(ids)))
    }

    pub fn decrypt<R: Read>(
        &self,
        input: R,
        what: &str,
    ) -> Result<age::stream::StreamReader<R>, KeyError> {
        let dec = age::Decryptor::new(input).map_err(|e| decrypt_error(e, what))?;
        dec.decrypt(self.0.iter().map(|i| i as &dyn age::Identity))
            .map_err(|e| decrypt_error(e, what))
    }
}

fn decrypt_error(e: age::DecryptError, what: &str) -> KeyError {
    match e {
        age::DecryptError::NoMatchingKeys => KeyError::WrongKey {
            what: what.to_string(),
        },
        other => KeyError::Decrypt {
            what: what.to_string(),
            message: other.to_string(),
        },
    }
}

/// A new X25519 key pair as (key file text, public key).
pub fn keygen() -> (String, String) {
    let id = age::x25519::Identity::generate();
    let public = id.to_public().to_string();
    let created = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
    let text = format!(
        "# created: {created}\n# public key: {public}\n{}\n",
        id.to_string().expose_secret()
    );
    (text, public)
}

/// Ciphertext offset of the STREAM piece that holds plaintext byte `pos`.
pub fn cipher_offset(payload_start: u64, pos: u64) -> u64 {
    payload_start + (pos / STREAM_CHUNK) * STREAM_CHUNK_ENCRYPTED
}

/// Ciphertext end needed to decrypt plaintext up to (excluding) `end`.
pub fn cipher_end(payload_start: u64, end: u64, cipher_len: u64) -> u64 {
    (payload_start + end.div_ceil(STREAM_CHUNK) * STREAM_CHUNK_ENCRYPTED).min(cipher_len)
}

/// `Read + Seek` over a remote object, fetching ranges on demand. The owner sets how far
/// ahead a miss may fetch (`fetch_until`) so each span of a restore is one request.
pub struct RemoteReader {
    repo: Repo,
    key: Key,
    len: u64,
    pos: u64,
    buf: Bytes,
    buf_start: u64,
    fetch_until: Arc<AtomicU64>,
    /// Used instead of ranged GETs when the server does not honour them; `buf` then
    /// holds the stream's current piece.
    stream: Option<crate::store::ObjectStream>,
}

impl RemoteReader {
    pub fn new(repo: Repo, key: Key, len: u64) -> (Self, Arc<AtomicU64>) {
        let hint = Arc::new(AtomicU64::new(0));
        (
            RemoteReader {
                repo,
                key,
                len,
                pos: 0,
                buf: Bytes::new(),
                buf_start: 0,
                fetch_until: hint.clone(),
                stream: None,
            },
            hint,
        )
    }
}

impl RemoteReader {
    /// Advances (or restarts) the whole-object stream until `buf` covers `pos`.
    fn stream_to_pos(&mut self) -> io::Result<()> {
        let end_of_buf = self.buf_start + self.buf.len() as u64;
        if self.stream.is_none() || self.pos < self.buf_start {
            self.stream = Some(self.repo.stream(&self.key).map_err(io::Error::other)?);
            self.buf = Bytes::new();
            self.buf_start = 0;
        } else {
            self.buf_start = end_of_buf;
            self.buf = Bytes::new();
        }
        let Some(stream) = self.stream.as_mut() else {
            return Ok(());
        };
        loop {
            if self.pos < self.buf_start + self.buf.len() as u64 {
                return Ok(());
            }
            self.buf_start += self.buf.len() as u64;
            match stream.next_piece().map_err(io::Error::other)? {
                Some(piece) => self.buf = piece,
                None => {
                    self.buf = Bytes::new();
                    return Ok(());
                }
            }
        }
    }
}

impl Read for RemoteReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.len || out.is_empty() {
            return Ok(0);
        }
        let in_buf =
            self.pos >= self.buf_start && self.pos < self.buf_start + self.buf.len() as u64;
        if !in_buf {
            if self.repo.ranges_work() {
                let hint = self.fetch_until.load(Ordering::Relaxed);
                let end = hint
                    .max(self.pos + out.len() as u64)
                    .max(self.pos + 4096)
                    .min(self.len);
                match self.repo.get_range(&self.key, self.pos..end, self.len) {
                    Ok(b) => {
                        self.buf = b;
                        self.buf_start = self.pos;
                    }
                    // The server just turned out to ignore ranges.
                    Err(_) if !self.repo.ranges_work() => self.stream_to_pos()?,
                    Err(e) => return Err(io::Error::other(e)),
                }
            } else {
                self.stream_to_pos()?;
            }
            let covered =
                self.pos >= self.buf_start && self.pos < self.buf_start + self.buf.len() as u64;
            if !covered {
                return Ok(0);
            }
        }
        let at = (self.pos - self.buf_start) as usize;
        let n = out.len().min(self.buf.len() - at);
        out[..n].copy_from_slice(&self.buf[at..at + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for RemoteReader {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = target
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before start"))?;
        Ok(self.pos)
    }
}

/// Counts bytes as they pass, so the backup side learns where an age payload starts.
pub struct Counted<W> {
    pub inner: W,
    pub count: Arc<AtomicU64>,
}

impl<W: Write> Write for Counted<W> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(b)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keygen_roundtrip_and_wrong_key() {
        let (text, public) = keygen();
        let r = Recipients::parse(&[public]).unwrap();
        let mut w = r.encrypt(Vec::new(), "t").unwrap();
        let data = vec![7u8; 200_000];
        w.write_all(&data).unwrap();
        let ct = w.finish().unwrap();
        let ids = Identities::parse(&text, "k").unwrap();
        let mut out = Vec::new();
        ids.decrypt(&ct[..], "t")
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, data);

        let (other, _) = keygen();
        let e = Identities::parse(&other, "k")
            .unwrap()
            .decrypt(&ct[..], "blob x")
            .err()
            .unwrap();
        assert!(matches!(e, KeyError::WrongKey { .. }), "{e}");
        assert!(Identities::parse("# only a comment\n", "k").is_err());
        assert!(Identities::parse("AGE-SECRET-KEY-1NOPE", "k").is_err());
        assert!(Recipients::parse(&["age1bogus".into()]).is_err());
    }

    #[test]
    fn cipher_offsets() {
        assert_eq!(cipher_offset(100, 0), 100);
        assert_eq!(
            cipher_offset(100, STREAM_CHUNK),
            100 + STREAM_CHUNK_ENCRYPTED
        );
        assert_eq!(cipher_end(100, 1, 1 << 20), 100 + STREAM_CHUNK_ENCRYPTED);
        assert_eq!(
            cipher_end(100, STREAM_CHUNK + 1, 1 << 20),
            100 + 2 * STREAM_CHUNK_ENCRYPTED
        );
        assert_eq!(cipher_end(100, 1, 150), 150);
    }
}
