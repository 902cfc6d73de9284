//! The enrollment endpoint, over HTTPS with the server certificate:
//! - `GET /v1/ca` gives the CA certificate. An agent checks its SHA-256 against the
//!   fingerprint in its token before it sends the token anywhere.
//! - `POST /v1/enroll` takes `{token, csr, name}`, spends the token and returns the
//!   agent's id, its signed certificate, the CA and where the broker listens.
//!
//! A refused token gets one answer whatever the reason (unknown, used or expired),
//! so a guesser learns nothing; the controller's log says which.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use wire::id::AgentId;

use crate::db::Db;
use crate::pki::Ca;

/// What a client may send; a CSR is well under this.
const BODY_LIMIT: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("enrollment endpoint {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the server certificate: {0}")]
    Tls(String),
}

#[derive(Deserialize)]
pub struct Request {
    pub token: String,
    pub csr: String,
    #[serde(default)]
    pub name: String,
}

#[derive(Serialize, Deserialize)]
pub struct Granted {
    pub agent_id: String,
    pub certificate: String,
    pub ca: String,
    /// The broker's host, when it is not the controller's.
    pub broker_host: Option<String>,
    pub broker_port: u16,
}

pub struct Enroller {
    pub db: Mutex<Db>,
    pub ca: Arc<Ca>,
    pub cert_validity: Duration,
    pub broker_host: Option<String>,
    pub broker_port: u16,
}

pub fn router(state: Arc<Enroller>) -> Router {
    Router::new()
        .route("/v1/ca", get(ca))
        .route("/v1/enroll", post(enroll))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

async fn ca(State(s): State<Arc<Enroller>>) -> String {
    s.ca.cert_pem.clone()
}

fn refuse(status: StatusCode, message: &str) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

async fn enroll(State(s): State<Arc<Enroller>>, Json(req): Json<Request>) -> Response {
    tokio::task::spawn_blocking(move || grant(&s, &req))
        .await
        .unwrap_or_else(|_| refuse(StatusCode::INTERNAL_SERVER_ERROR, "internal error"))
}

/// A display name from the agent, for people: printable, at most 64 characters.
fn display_name(name: &str) -> String {
    crate::text::printable(name, 64)
}

fn grant(s: &Enroller, req: &Request) -> Response {
    let Ok(secret) = hex::decode(req.token.trim()) else {
        return refuse(
            StatusCode::FORBIDDEN,
            "the token is unknown, used or expired",
        );
    };
    let usable = match s.db.lock() {
        Ok(db) => db.token_usable(&secret),
        Err(_) => return refuse(StatusCode::INTERNAL_SERVER_ERROR, "internal error"),
    };
    if !matches!(usable, Ok(Ok(()))) {
        return refuse(
            StatusCode::FORBIDDEN,
            "the token is unknown, used or expired",
        );
    }
    let agent = AgentId(rand::random());
    let issued = match s.ca.sign_agent(&agent, &req.csr, s.cert_validity) {
        Ok(i) => i,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let name = display_name(&req.name);
    let spent = match s.db.lock() {
        Ok(mut db) => db.enroll(&secret, &agent, &name, &issued),
        Err(_) => return refuse(StatusCode::INTERNAL_SERVER_ERROR, "internal error"),
    };
    match spent {
        Ok(Ok(())) => {
            tracing::info!("enrolled agent {agent} ({name})");
            Json(Granted {
                agent_id: agent.to_string(),
                certificate: issued.pem,
                ca: s.ca.cert_pem.clone(),
                broker_host: s.broker_host.clone(),
                broker_port: s.broker_port,
            })
            .into_response()
        }
        Ok(Err(why)) => {
            tracing::warn!("enrollment refused: {why}");
            refuse(
                StatusCode::FORBIDDEN,
                "the token is unknown, used or expired",
            )
        }
        Err(e) => {
            tracing::error!("enrollment: {e}");
            refuse(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
        }
    }
}

/// A rustls server config from PEM files.
pub fn tls_config(cert_pem: &[u8], key_pem: &[u8]) -> Result<rustls::ServerConfig, EnrollError> {
    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| EnrollError::Tls(e.to_string()))?;
    let key =
        PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| EnrollError::Tls(e.to_string()))?;
    rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| EnrollError::Tls(e.to_string()))
}

/// Binds `addr` now (so a port in use is an error at start), then serves HTTPS until
/// `stop` fires.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, EnrollError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| EnrollError::Bind { addr, source })
}

pub async fn serve(
    listener: TcpListener,
    tls: rustls::ServerConfig,
    app: Router,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    loop {
        let tcp = tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    tracing::warn!("enrollment endpoint: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = crate::stopped(&mut stop) => return,
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            // A client that never finishes its handshake does not hold a task forever.
            let Ok(Ok(tls)) =
                tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
            else {
                return;
            };
            let svc = hyper_util::service::TowerToHyperService::new(app);
            let conn = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), svc)
                .into_owned();
            let _ = tokio::time::timeout(Duration::from_secs(60), conn).await;
        });
    }
}
