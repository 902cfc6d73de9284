//! The protocol between a vaultik agent and its controller, used by both sides and
//! nothing else: versioned message types ([`message`]), their encoding ([`codec`]:
//! postcard behind a format version and a size limit), the MQTT topic layout
//! ([`topic`]), identities ([`id`]) and the bookkeeping that makes a command applied
//! twice take effect once ([`seen`]).
//!
//! Everything decoded here comes from the network and is hostile: decoding garbage
//! returns an error, never panics, and never allocates past [`codec::MAX_PAYLOAD`].

pub mod codec;
pub mod id;
pub mod message;
pub mod seen;
pub mod topic;

pub use codec::{DecodeError, FORMAT, MAX_PAYLOAD, decode, encode};
/// The bounded collections the messages are made of, for building them.
pub use heapless;
pub use id::{AgentId, CommandId, JobId};
pub use message::{Down, Up};
