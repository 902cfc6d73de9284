//! The fleet's certificate authority, made on first start in the data directory. It
//! signs the server certificate (broker and enrollment endpoint), the controller's
//! own client certificate (`controller`), and agents' certificates whose subject is a
//! random agent id chosen here: an agent's CSR contributes its public key and nothing
//! else. Revocation is a CRL the broker reloads.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams,
    CertificateSigningRequestParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevocationReason, RevokedCertParams,
    SerialNumber,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use time::OffsetDateTime;
use wire::id::{AgentId, CONTROLLER};

use crate::files;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Cert {
        what: &'static str,
        source: rcgen::Error,
    },
    #[error("the certificate signing request is not valid: {0}")]
    BadCsr(rcgen::Error),
}

fn cert_err(what: &'static str) -> impl FnOnce(rcgen::Error) -> PkiError {
    move |source| PkiError::Cert { what, source }
}

/// Paths of everything the PKI keeps in `<data>/pki`.
pub struct Layout {
    pub dir: PathBuf,
}

impl Layout {
    pub fn new(data: &Path) -> Self {
        Layout {
            dir: data.join("pki"),
        }
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("server.crt")
    }
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server.key")
    }
    pub fn client_cert(&self) -> PathBuf {
        self.dir.join("controller.crt")
    }
    pub fn client_key(&self) -> PathBuf {
        self.dir.join("controller.key")
    }
}

/// A signed certificate, with what the database records of it.
pub struct Issued {
    pub pem: String,
    pub serial: String,
    pub not_after: SystemTime,
}

pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub cert_pem: String,
    pub layout: Layout,
}

impl Ca {
    /// Loads the CA from `<data>/pki`, making it first if there is none.
    pub fn load_or_create(data: &Path) -> Result<Self, PkiError> {
        let layout = Layout::new(data);
        files::private_dir(&layout.dir).map_err(|source| PkiError::Io {
            path: layout.dir.clone(),
            source,
        })?;
        if !layout.ca_key().exists() {
            let key = KeyPair::generate().map_err(cert_err("making the CA key"))?;
            let mut params = CertificateParams::default();
            params.distinguished_name = name("vaultik fleet CA");
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            params.serial_number = Some(random_serial());
            params.not_before = OffsetDateTime::now_utc() - time::Duration::hours(1);
            params.not_after = OffsetDateTime::now_utc() + time::Duration::days(3650);
            let cert = params
                .self_signed(&key)
                .map_err(cert_err("signing the CA"))?;
            write(&layout.ca_cert(), cert.pem().as_bytes(), false)?;
            write(&layout.ca_key(), key.serialize_pem().as_bytes(), true)?;
        }
        let cert_pem = read(&layout.ca_cert())?;
        let key = KeyPair::from_pem(&read(&layout.ca_key())?).map_err(cert_err("the CA key"))?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(cert_err("the CA"))?;
        Ok(Ca {
            issuer,
            cert_pem,
            layout,
        })
    }

    /// The SHA-256 of the CA certificate (DER), which enrollment tokens carry so an
    /// agent can tell the real controller from an impostor before sending its token.
    pub fn fingerprint(&self) -> String {
        fingerprint_of_pem(&self.cert_pem).unwrap_or_default()
    }

    /// (Re)writes the server certificate for `names` (DNS names or IP addresses) and
    /// the controller's client certificate. Both are renewed at every start.
    pub fn write_service_certs(&self, names: &[String]) -> Result<(), PkiError> {
        let mut server =
            CertificateParams::new(names.to_vec()).map_err(cert_err("server names"))?;
        server.distinguished_name = name("vaultik controller");
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let (pem, key) = self.sign_new(server, Duration::from_secs(398 * 86400))?;
        write(&self.layout.server_cert(), pem.as_bytes(), false)?;
        write(&self.layout.server_key(), key.as_bytes(), true)?;
        let mut client = CertificateParams::default();
        client.distinguished_name = name(CONTROLLER);
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let (pem, key) = self.sign_new(client, Duration::from_secs(398 * 86400))?;
        write(&self.layout.client_cert(), pem.as_bytes(), false)?;
        write(&self.layout.client_key(), key.as_bytes(), true)
    }

    fn sign_new(
        &self,
        mut params: CertificateParams,
        valid: Duration,
    ) -> Result<(String, String), PkiError> {
        let key = KeyPair::generate().map_err(cert_err("making a key"))?;
        validity(&mut params, SystemTime::now(), valid);
        params.serial_number = Some(random_serial());
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(cert_err("signing a certificate"))?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Signs an agent certificate for `agent` over the public key of `csr_pem`. The
    /// CSR's subject and extensions are ignored: the identity is ours to give.
    pub fn sign_agent(
        &self,
        agent: &AgentId,
        csr_pem: &str,
        valid: Duration,
    ) -> Result<Issued, PkiError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(PkiError::BadCsr)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(&agent.to_string());
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = SystemTime::now();
        validity(&mut params, now, valid);
        let serial = random_serial();
        params.serial_number = Some(serial.clone());
        let signed = CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        }
        .signed_by(&self.issuer)
        .map_err(cert_err("signing an agent certificate"))?;
        Ok(Issued {
            pem: signed.pem(),
            serial: hex::encode(serial.to_bytes()),
            not_after: now + valid,
        })
    }

    /// A short-lived certificate in an agent's name with a key made here: the
    /// controller connects with it to take over, and so end, that agent's live broker
    /// session after a revocation. Returns (certificate, key) PEM.
    pub fn session_breaker(&self, agent: &AgentId) -> Result<(String, String), PkiError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = name(&agent.to_string());
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign_new(params, Duration::from_secs(300))
    }

    /// A CRL revoking `serials` (hex), valid for a year; rewritten at every start and
    /// every revocation.
    pub fn crl_pem(&self, serials: &[String], number: u64) -> Result<String, PkiError> {
        let now = OffsetDateTime::now_utc();
        let revoked_certs = serials
            .iter()
            .filter_map(|s| hex::decode(s).ok())
            .map(|bytes| RevokedCertParams {
                serial_number: SerialNumber::from_slice(&bytes),
                revocation_time: now,
                reason_code: Some(RevocationReason::PrivilegeWithdrawn),
                invalidity_date: None,
            })
            .collect();
        let params = CertificateRevocationListParams {
            this_update: now - time::Duration::hours(1),
            next_update: now + time::Duration::days(365),
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        params
            .signed_by(&self.issuer)
            .and_then(|crl| crl.pem())
            .map_err(cert_err("signing the CRL"))
    }
}

fn name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

/// Backdated an hour, so that a clock slightly behind ours still accepts it.
fn validity(params: &mut CertificateParams, now: SystemTime, valid: Duration) {
    let now = OffsetDateTime::from(now);
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + valid;
}

/// 16 random bytes, positive as DER integers must be.
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

fn first_cert(pem: &str) -> Option<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes()).next()?.ok()
}

/// The subject common name of the first certificate in `pem`.
pub fn subject_cn(pem: &str) -> Option<String> {
    let der = first_cert(pem)?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

/// SHA-256 of the first certificate in `pem`, as lowercase hex.
pub fn fingerprint_of_pem(pem: &str) -> Option<String> {
    let der = first_cert(pem)?;
    Some(hex::encode(ring::digest::digest(
        &ring::digest::SHA256,
        der.as_ref(),
    )))
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn write(path: &Path, bytes: &[u8], private: bool) -> Result<(), PkiError> {
    files::write_atomic(path, bytes, if private { 0o600 } else { 0o644 }).map_err(|source| {
        PkiError::Io {
            path: path.to_path_buf(),
            source,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_certificates_carry_our_id_not_the_requested_subject() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path()).unwrap();
        let again = Ca::load_or_create(dir.path()).unwrap();
        assert_eq!(ca.fingerprint(), again.fingerprint(), "the CA is kept");
        assert_eq!(ca.fingerprint().len(), 64);

        let key = KeyPair::generate().unwrap();
        let mut req = CertificateParams::default();
        req.distinguished_name = name(CONTROLLER);
        let csr = req.serialize_request(&key).unwrap().pem().unwrap();
        let agent = AgentId([0xab; 16]);
        let issued = ca
            .sign_agent(&agent, &csr, Duration::from_secs(3600))
            .unwrap();
        assert_eq!(
            subject_cn(&issued.pem).as_deref(),
            Some(&*agent.to_string())
        );
        assert_eq!(issued.serial.len(), 32);

        assert!(matches!(
            ca.sign_agent(&agent, "not a csr", Duration::from_secs(1)),
            Err(PkiError::BadCsr(_))
        ));
        let crl = ca.crl_pem(&[issued.serial], 1).unwrap();
        assert!(crl.starts_with("-----BEGIN X509 CRL-----"));
    }
}
