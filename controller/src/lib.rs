//! vaultik-controller: the fleet's message plane, identity and storage.
//!
//! - `pki`: the CA, service certificates, agent certificates, the CRL.
//! - `db`: SQLite with migrations; tokens, agents, commands.
//! - `ingest`: what each agent message does to the database (pure database logic).
//! - `broker`: the supervised or external mosquitto and the ACL/CRL files it reads.
//! - `enroll`: the HTTPS enrollment endpoint.
//! - `link`: the MQTT client that ingests, acknowledges, commands and revokes.
//! - `text`: agent-sent text made safe to show.

pub mod broker;
pub mod db;
pub mod enroll;
pub mod files;
pub mod ingest;
pub mod link;
pub mod pki;
pub mod text;

/// Resolves once `stop` holds `true` (or its sender is gone).
pub async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
