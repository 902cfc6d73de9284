//! The MQTT topic layout, built and parsed only here: `vaultik/agents/<agent id>/<leaf>`.
//! A broker ACL grants an agent `vaultik/agents/<its certificate's id>/#` and nothing
//! else, so an agent's identity is its certificate, never a field in a message.

use crate::id::AgentId;

/// Every topic starts with this.
pub const ROOT: &str = "vaultik/agents";

/// What travels on a topic, and in which direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leaf {
    /// Agent → controller: [`crate::message::Up`] (hello, heartbeats, outbox events).
    Up,
    /// Agent → controller, retained: online, or offline as the last will.
    Status,
    /// Controller → agent: [`crate::message::Down`] (commands, acknowledgements).
    Down,
}

impl Leaf {
    pub const ALL: [Leaf; 3] = [Leaf::Up, Leaf::Status, Leaf::Down];

    pub fn as_str(self) -> &'static str {
        match self {
            Leaf::Up => "up",
            Leaf::Status => "status",
            Leaf::Down => "down",
        }
    }
}

/// The topic of one agent's leaf.
pub fn topic(agent: &AgentId, leaf: Leaf) -> String {
    format!("{ROOT}/{agent}/{}", leaf.as_str())
}

/// The agent's own subtree, as an ACL pattern or a subscription: `vaultik/agents/<id>/#`.
pub fn agent_filter(agent: &AgentId) -> String {
    format!("{ROOT}/{agent}/#")
}

/// What the controller subscribes to: one leaf of every agent.
pub fn all_agents(leaf: Leaf) -> String {
    format!("{ROOT}/+/{}", leaf.as_str())
}

/// Reads a topic back: the agent it belongs to and its leaf. Anything else is `None`.
pub fn parse(topic: &str) -> Option<(AgentId, Leaf)> {
    let rest = topic.strip_prefix(ROOT)?.strip_prefix('/')?;
    let (id, leaf) = rest.split_once('/')?;
    let agent = AgentId::parse(id)?;
    let leaf = Leaf::ALL.into_iter().find(|l| l.as_str() == leaf)?;
    Some((agent, leaf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_round_trip_and_nothing_else_parses() {
        let a = AgentId([7; 16]);
        for leaf in Leaf::ALL {
            assert_eq!(parse(&topic(&a, leaf)), Some((a, leaf)));
        }
        assert_eq!(
            agent_filter(&a),
            "vaultik/agents/07070707070707070707070707070707/#"
        );
        assert_eq!(all_agents(Leaf::Up), "vaultik/agents/+/up");
        for bad in [
            "vaultik/agents/controller/up",
            "vaultik/agents/07070707070707070707070707070707/up/x",
            "vaultik/agents/07070707070707070707070707070707",
            "vaultik/agents//up",
            "other/07070707070707070707070707070707/up",
            "vaultik/agentsX/07070707070707070707070707070707/up",
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }
}
