//! Admission of new connections: a total cap and a per-peer-address cap, so that one peer holding
//! thousands of idle sockets cannot lock every other client out.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{limit} connections are open, the most allowed")]
    Total { limit: usize },
    #[error("peer {peer} already holds {limit} connections, the most one address may")]
    PerPeer { peer: IpAddr, limit: usize },
}

#[derive(Debug)]
struct Counts {
    total: usize,
    by_peer: HashMap<IpAddr, usize>,
}

#[derive(Debug)]
pub struct ConnectionGate {
    max_total: usize,
    max_per_peer: usize,
    counts: Mutex<Counts>,
}

/// An admitted connection; dropping it frees its places.
#[derive(Debug)]
pub struct Admission {
    gate: Arc<ConnectionGate>,
    peer: IpAddr,
}

impl ConnectionGate {
    pub fn new(max_total: usize, max_per_peer: usize) -> Arc<Self> {
        Arc::new(Self {
            max_total,
            max_per_peer,
            counts: Mutex::new(Counts {
                total: 0,
                by_peer: HashMap::new(),
            }),
        })
    }

    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<Admission, Refusal> {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        if counts.total >= self.max_total {
            return Err(Refusal::Total {
                limit: self.max_total,
            });
        }
        let held = counts.by_peer.entry(peer).or_insert(0);
        if *held >= self.max_per_peer {
            return Err(Refusal::PerPeer {
                peer,
                limit: self.max_per_peer,
            });
        }
        *held += 1;
        counts.total += 1;
        Ok(Admission {
            gate: self.clone(),
            peer,
        })
    }

    pub fn open(&self) -> usize {
        self.counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .total
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut counts = self
            .gate
            .counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        counts.total = counts.total.saturating_sub(1);
        if let Some(held) = counts.by_peer.get_mut(&self.peer) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                counts.by_peer.remove(&self.peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_peer_at_its_cap_leaves_room_for_others_and_places_come_back() {
        let gate = ConnectionGate::new(4, 2);
        let greedy: IpAddr = [127, 0, 0, 2].into();
        let other: IpAddr = [127, 0, 0, 3].into();
        let first = gate.admit(greedy).expect("first");
        let _second = gate.admit(greedy).expect("second");
        assert_eq!(
            gate.admit(greedy).err(),
            Some(Refusal::PerPeer {
                peer: greedy,
                limit: 2
            })
        );
        let _third = gate.admit(other).expect("another peer is served");
        drop(first);
        let _again = gate.admit(greedy).expect("a freed place is reused");
        let _fourth = gate.admit(other).expect("fourth");
        assert_eq!(
            gate.admit([127, 0, 0, 4].into()).err(),
            Some(Refusal::Total { limit: 4 })
        );
        assert_eq!(gate.open(), 4);
    }
}
