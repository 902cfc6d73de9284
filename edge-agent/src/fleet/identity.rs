//! The agent's fleet identity, in `<state>/link/`: its private key (made here, never
//! sent), the certificate the controller signed for it, the fleet CA, and where the
//! controller and broker are. Every file is mode 0600 and replaced atomically.
//!
//! Enrollment checks the controller before trusting it: the token carries the SHA-256
//! of the fleet CA, the CA is fetched and compared, and only then is the token sent, to
//! a server that must present a certificate from that CA.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, KeyPair};
use serde::{Deserialize, Serialize};
use wire::id::AgentId;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "this agent is not enrolled ({path} is missing): run `vaultik enroll --controller URL --token TOKEN` first"
    )]
    NotEnrolled { path: PathBuf },
    #[error("{path} is damaged: {reason}")]
    Damaged { path: PathBuf, reason: String },
    #[error("already enrolled as agent {0}; remove the link directory to enroll again")]
    AlreadyEnrolled(AgentId),
    #[error(
        "the token is malformed: expected SECRET.FINGERPRINT as `vaultik-controller token create` prints it"
    )]
    BadToken,
    #[error("the controller URL {0:?} must start with https://")]
    BadUrl(String),
    #[error(
        "the controller at {url} presents a CA that does not match the token's fingerprint: refusing to send the token"
    )]
    WrongCa { url: String },
    #[error("the controller refused the enrollment: {0}")]
    Refused(String),
    #[error("cannot reach the controller at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("making the key or CSR: {0}")]
    Key(String),
}

/// Where the controller and broker are, and who this agent is.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Link {
    pub agent_id: String,
    pub controller: String,
    pub broker_host: String,
    pub broker_port: u16,
}

/// Everything the daemon needs to connect.
#[derive(Clone)]
pub struct Identity {
    pub agent: AgentId,
    pub link: Link,
    pub key_pem: String,
    pub cert_pem: String,
    pub ca_pem: String,
    dir: PathBuf,
}

fn files(state: &Path) -> (PathBuf, [PathBuf; 4]) {
    let dir = state.join("link");
    let names = ["link.json", "agent.key", "agent.crt", "ca.crt"].map(|n| dir.join(n));
    (dir, names)
}

fn read(path: &Path) -> Result<String, IdentityError> {
    std::fs::read_to_string(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            IdentityError::NotEnrolled {
                path: path.to_path_buf(),
            }
        } else {
            IdentityError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    })
}

fn write(path: &Path, text: &str) -> Result<(), IdentityError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("new");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

impl Identity {
    pub fn load(state: &Path) -> Result<Self, IdentityError> {
        let (dir, [link, key, cert, ca]) = files(state);
        let text = read(&link)?;
        let damaged = |reason: String| IdentityError::Damaged {
            path: link.clone(),
            reason,
        };
        let parsed: Link = serde_json::from_str(&text).map_err(|e| damaged(e.to_string()))?;
        let agent = AgentId::parse(&parsed.agent_id)
            .ok_or_else(|| damaged(format!("{:?} is not an agent id", parsed.agent_id)))?;
        Ok(Identity {
            agent,
            link: parsed,
            key_pem: read(&key)?,
            cert_pem: read(&cert)?,
            ca_pem: read(&ca)?,
            dir,
        })
    }

    fn save(&self) -> Result<(), IdentityError> {
        let (_, [link, key, cert, ca]) = files(self.dir.parent().unwrap_or(Path::new("/")));
        crate::fleet::private_dir(&self.dir).map_err(|source| IdentityError::Io {
            path: self.dir.clone(),
            source,
        })?;
        write(&key, &self.key_pem)?;
        write(&cert, &self.cert_pem)?;
        write(&ca, &self.ca_pem)?;
        let json = serde_json::to_string_pretty(&self.link).unwrap_or_default();
        write(&link, &json)
    }

    /// The certificate's validity, for renewal.
    pub fn validity(&self) -> Option<(SystemTime, SystemTime)> {
        validity(&self.cert_pem)
    }

    /// Whether two thirds of the certificate's life have passed.
    pub fn renewal_due(&self, now: SystemTime) -> bool {
        let Some((from, to)) = self.validity() else {
            return true;
        };
        let life = to.duration_since(from).unwrap_or_default();
        now >= from + life * 2 / 3
    }

    /// A CSR for the agent's own key, for a renewal over the link.
    pub fn csr(&self) -> Result<String, IdentityError> {
        let key =
            KeyPair::from_pem(&self.key_pem).map_err(|e| IdentityError::Key(e.to_string()))?;
        csr(&key)
    }

    /// Replaces the certificate with a renewed one, if it is for this agent's key and
    /// id; a bad one is refused and the current one kept.
    pub fn install_certificate(&mut self, pem: &str) -> Result<(), IdentityError> {
        let damaged = |reason: &str| IdentityError::Damaged {
            path: self.dir.join("agent.crt"),
            reason: format!("the renewed certificate {reason}"),
        };
        check_certificate(pem, &self.key_pem, &self.agent).map_err(|r| damaged(&r))?;
        self.cert_pem = pem.to_string();
        write(&self.dir.join("agent.crt"), pem)
    }
}

fn csr(key: &KeyPair) -> Result<String, IdentityError> {
    let params = CertificateParams::default();
    params
        .serialize_request(key)
        .and_then(|r| r.pem())
        .map_err(|e| IdentityError::Key(e.to_string()))
}

/// Reads the first certificate of `pem` and applies `f` to it.
fn with_cert<T>(
    pem: &str,
    f: impl FnOnce(&x509_parser::certificate::X509Certificate<'_>) -> T,
) -> Option<T> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    Some(f(&cert))
}

fn validity(cert_pem: &str) -> Option<(SystemTime, SystemTime)> {
    with_cert(cert_pem, |c| {
        let v = c.validity();
        let t =
            |s: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(s).unwrap_or(0));
        (t(v.not_before.timestamp()), t(v.not_after.timestamp()))
    })
}

/// The certificate must parse, name `agent`, and carry the public key of `key_pem`.
fn check_certificate(pem: &str, key_pem: &str, agent: &AgentId) -> Result<(), String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let cert = CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| e.to_string())?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| e.to_string())?;
    let provider = rustls::crypto::ring::default_provider();
    let signer = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| e.to_string())?;
    rustls::sign::CertifiedKey::new(vec![cert], signer)
        .keys_match()
        .map_err(|_| "is not for this agent's key".to_string())?;
    let named = with_cert(pem, |c| {
        let mut names = c.subject().iter_common_name();
        let first = names
            .next()
            .and_then(|n| n.as_str().ok().map(str::to_owned));
        first == Some(agent.to_string()) && names.next().is_none()
    });
    if named != Some(true) {
        return Err(format!("does not name agent {agent}"));
    }
    Ok(())
}

/// A token as printed by the controller: the secret and the CA's fingerprint.
fn parse_token(token: &str) -> Result<(String, String), IdentityError> {
    let (secret, fp) = token
        .trim()
        .split_once('.')
        .ok_or(IdentityError::BadToken)?;
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    if !hex(secret, 32) || !hex(fp, 64) {
        return Err(IdentityError::BadToken);
    }
    Ok((secret.to_string(), fp.to_ascii_lowercase()))
}

#[derive(Deserialize)]
struct Granted {
    agent_id: String,
    certificate: String,
    ca: String,
    broker_host: Option<String>,
    broker_port: u16,
}

/// Enrolls this host: makes a key, proves the controller holds the CA the token names,
/// sends the CSR with the token, and saves what comes back in `<state>/link/`.
pub async fn enroll(
    state: &Path,
    controller: &str,
    token: &str,
    name: &str,
) -> Result<Identity, IdentityError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    if let Ok(existing) = Identity::load(state) {
        return Err(IdentityError::AlreadyEnrolled(existing.agent));
    }
    let (secret, fingerprint) = parse_token(token)?;
    let base = controller.trim_end_matches('/');
    let host = base
        .strip_prefix("https://")
        .ok_or_else(|| IdentityError::BadUrl(controller.to_string()))?;
    let host = host.split('/').next().unwrap_or(host);
    let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let ca_pem = fetch_ca(base, &fingerprint).await?;
    let key = KeyPair::generate().map_err(|e| IdentityError::Key(e.to_string()))?;
    let request = serde_json::json!({ "token": secret, "csr": csr(&key)?, "name": name });
    let granted: Granted = post_enroll(base, &ca_pem, &request).await?;
    let agent = AgentId::parse(&granted.agent_id).ok_or_else(|| {
        IdentityError::Refused(format!(
            "the controller sent a bad agent id {:?}",
            granted.agent_id
        ))
    })?;
    if fingerprint_of(&granted.ca).as_deref() != Some(fingerprint.as_str()) {
        return Err(IdentityError::WrongCa { url: base.into() });
    }
    check_certificate(&granted.certificate, &key.serialize_pem(), &agent)
        .map_err(|r| IdentityError::Refused(format!("the certificate sent back {r}")))?;
    let identity = Identity {
        agent,
        link: Link {
            agent_id: agent.to_string(),
            controller: base.to_string(),
            broker_host: granted.broker_host.unwrap_or(host),
            broker_port: granted.broker_port,
        },
        key_pem: key.serialize_pem(),
        cert_pem: granted.certificate,
        ca_pem: granted.ca,
        dir: files(state).0,
    };
    identity.save()?;
    Ok(identity)
}

fn fingerprint_of(pem: &str) -> Option<String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).ok()?;
    Some(hex::encode(ring::digest::digest(
        &ring::digest::SHA256,
        der.as_ref(),
    )))
}

fn unreachable(url: &str) -> impl Fn(reqwest::Error) -> IdentityError + '_ {
    move |e| IdentityError::Unreachable {
        url: url.to_string(),
        reason: causes(&e),
    }
}

/// An error and its causes on one line, each said once.
fn causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !out.contains(&text) {
            out = format!("{out}: {text}");
        }
        next = cause.source();
    }
    out
}

/// The CA, fetched without trusting anyone yet, and accepted only if its hash is the
/// one in the token. Nothing secret is sent on this connection.
async fn fetch_ca(base: &str, fingerprint: &str) -> Result<String, IdentityError> {
    let client = reqwest::Client::builder()
        .tls_danger_accept_invalid_certs(true)
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(unreachable(base))?;
    let pem = client
        .get(format!("{base}/v1/ca"))
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .map_err(unreachable(base))?
        .text()
        .await
        .map_err(unreachable(base))?;
    if fingerprint_of(&pem).as_deref() != Some(fingerprint) {
        return Err(IdentityError::WrongCa { url: base.into() });
    }
    Ok(pem)
}

async fn post_enroll(
    base: &str,
    ca_pem: &str,
    request: &serde_json::Value,
) -> Result<Granted, IdentityError> {
    let ca = reqwest::Certificate::from_pem(ca_pem.as_bytes()).map_err(unreachable(base))?;
    let client = reqwest::Client::builder()
        .tls_certs_only([ca])
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(unreachable(base))?;
    let resp = client
        .post(format!("{base}/v1/enroll"))
        .header("content-type", "application/json")
        .body(request.to_string())
        .send()
        .await
        .map_err(unreachable(base))?;
    let status = resp.status();
    let body = resp.text().await.map_err(unreachable(base))?;
    if !status.is_success() {
        let why = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("error")?.as_str().map(str::to_owned))
            .unwrap_or_else(|| format!("HTTP {status}"));
        return Err(IdentityError::Refused(why));
    }
    serde_json::from_str(&body)
        .map_err(|e| IdentityError::Refused(format!("unreadable answer: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_must_carry_a_secret_and_a_fingerprint() {
        let fp = "ab".repeat(32);
        let secret = "01".repeat(16);
        assert_eq!(
            parse_token(&format!(" {secret}.{fp}\n")).unwrap(),
            (secret.clone(), fp.clone())
        );
        for bad in [
            secret.clone(),
            format!("{secret}.{}", &fp[2..]),
            format!("{secret}x.{fp}"),
            String::new(),
            format!("{secret}.{fp}.x"),
        ] {
            assert!(
                matches!(parse_token(&bad), Err(IdentityError::BadToken)),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_certificate_for_another_key_or_name_is_refused() {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::default();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let agent = AgentId([3; 16]);
        let key = KeyPair::generate().unwrap();
        let sign = |cn: &str, k: &KeyPair| {
            let mut p = CertificateParams::default();
            p.distinguished_name.push(rcgen::DnType::CommonName, cn);
            p.signed_by(k, &issuer).unwrap().pem()
        };
        let good = sign(&agent.to_string(), &key);
        assert!(check_certificate(&good, &key.serialize_pem(), &agent).is_ok());
        let other_key = KeyPair::generate().unwrap();
        let wrong_key = sign(&agent.to_string(), &other_key);
        assert!(check_certificate(&wrong_key, &key.serialize_pem(), &agent).is_err());
        let wrong_name = sign("controller", &key);
        assert!(check_certificate(&wrong_name, &key.serialize_pem(), &agent).is_err());
        assert!(validity(&good).is_some());
    }
}
