//! Identities. An agent id is random, 16 bytes, written as 32 lowercase hex digits; it
//! is what the agent's certificate names and what its topics are built from, so it is
//! validated wherever it is read. A display name is separate and never an identity.
//! `controller` is reserved: it can never parse as an agent id.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The name the controller's own certificate carries; never an agent's.
pub const CONTROLLER: &str = "controller";

macro_rules! random_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub struct $name(pub [u8; 16]);

        impl $name {
            /// Parses exactly 32 lowercase hex digits.
            pub fn parse(s: &str) -> Option<Self> {
                let b = s.as_bytes();
                if b.len() != 32 || !b.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
                    return None;
                }
                let mut out = [0u8; 16];
                for (i, pair) in b.chunks_exact(2).enumerate() {
                    out[i] = (hex_val(pair[0]) << 4) | hex_val(pair[1]);
                }
                Some($name(out))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                for b in self.0 {
                    write!(f, "{b:02x}")?;
                }
                Ok(())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({self})", stringify!($name))
            }
        }
    };
}

random_id!(
    /// An agent: the subject of its certificate and the middle of its topics.
    AgentId
);
random_id!(
    /// A command from the controller; the agent applies each id at most once.
    CommandId
);
random_id!(
    /// One run of a job (a backup, a verify) on an agent.
    JobId
);

fn hex_val(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        _ => c - b'a' + 10,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_32_lowercase_hex_digits() {
        let s = "00112233445566778899aabbccddeeff";
        let id = AgentId::parse(s).unwrap_or_else(|| panic!("{s} parses"));
        assert_eq!(id.to_string(), s);
        assert_eq!(AgentId::parse(&s.to_uppercase()), None);
        assert_eq!(AgentId::parse(&s[1..]), None);
        assert_eq!(AgentId::parse(CONTROLLER), None);
        assert_eq!(AgentId::parse("+/#00112233445566778899aabbccdd"), None);
        assert_eq!(AgentId::parse(&format!("{s}0")), None);
    }
}
