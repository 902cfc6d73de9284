//! Applying a command twice has the effect of once: the agent remembers the ids of the
//! last commands it applied (a broker may deliver a message again after a reconnect,
//! and the controller resends what it has no acknowledgement for).

use heapless::Deque;

use crate::id::CommandId;

/// The last `N` command ids, oldest forgotten first.
#[derive(Debug, Clone, Default)]
pub struct Seen<const N: usize> {
    ids: Deque<CommandId, N>,
}

impl<const N: usize> Seen<N> {
    pub fn new() -> Self {
        Seen { ids: Deque::new() }
    }

    /// Rebuilds the memory from persisted ids, oldest first.
    pub fn from_ids(ids: impl IntoIterator<Item = CommandId>) -> Self {
        let mut s = Self::new();
        for id in ids {
            s.first_time(id);
        }
        s
    }

    /// True the first time an id is seen (apply it); false for a repeat (ignore it).
    pub fn first_time(&mut self, id: CommandId) -> bool {
        if self.ids.iter().any(|s| *s == id) {
            return false;
        }
        if self.ids.is_full() {
            self.ids.pop_front();
        }
        // Cannot fail: there is room now (unless N is 0, and then nothing is kept).
        let _ = self.ids.push_back(id);
        true
    }

    /// The remembered ids, oldest first, to persist.
    pub fn ids(&self) -> impl Iterator<Item = &CommandId> {
        self.ids.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeat_is_ignored_and_memory_is_bounded() {
        let mut s: Seen<2> = Seen::new();
        let (a, b, c) = (CommandId([1; 16]), CommandId([2; 16]), CommandId([3; 16]));
        assert!(s.first_time(a));
        assert!(!s.first_time(a));
        assert!(s.first_time(b));
        assert!(s.first_time(c));
        assert_eq!(s.ids().copied().collect::<Vec<_>>(), [b, c]);
        let again: Seen<2> = Seen::from_ids(s.ids().copied());
        assert_eq!(again.ids().count(), 2);
    }
}
