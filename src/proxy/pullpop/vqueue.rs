//! One client's view of one converted queue: virtual offsets handed out in order, the POP receipt
//! behind each, and the commit watermark that turns into ACKs.
//!
//! Offsets are unique, contiguous and increasing per (client, queue), because every client keys
//! its local cache by offset (reference `pull-to-pop.md` §1.6). The state is pure: the caller does
//! the acks and invisible-time changes it returns.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::remoting::extra_info::ExtraInfo;

/// What the sidecar must remember to settle one popped message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// The broker that served the pop; every ack and change goes back to it.
    pub broker: Arc<str>,
    /// The topic acks name: the pop retry topic for a message that came from it.
    pub ack_topic: Arc<str>,
    /// The handle, replaced by each renewal.
    pub handle: ExtraInfo,
    pub queue_offset: i64,
    /// With the broker, what a send-back (CONSUMER_SEND_MSG_BACK) names the message by.
    pub commit_log_offset: i64,
    pub reconsume_times: i32,
    /// Local clock: when the broker serves the message again unless renewed.
    pub visible_at_ms: i64,
    /// Local clock: the first pop, for the renewal limit.
    pub popped_at_ms: i64,
    pub state: ReceiptState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiptState {
    /// The client holds it; a commit past it acks it.
    Held,
    /// Sent back by the client: it will be served again, so no commit may ack it.
    Nacked,
}

/// The receipts a commit settles.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Settled {
    /// Held receipts still invisible: ack them.
    pub to_ack: Vec<Receipt>,
    /// Held receipts whose invisible time already ran out (the client was silent): the broker
    /// may have given them to another consumer, so acking them would be wrong. They are dropped.
    pub lapsed: usize,
    /// Sent-back receipts the commit passed: dropped, their retry stays.
    pub nacked: usize,
}

#[derive(Debug, Default)]
pub struct VirtualQueue {
    /// The next virtual offset to hand out.
    cursor: i64,
    /// Everything below this is settled.
    committed: i64,
    receipts: BTreeMap<i64, Receipt>,
    /// Raised by each pull: a pop that finishes for an older pull is not that client's to take.
    ticket: u64,
    /// The broker's backlog after the last pop, for a true maxOffset.
    pub backlog: i64,
}

impl VirtualQueue {
    pub fn cursor(&self) -> i64 {
        self.cursor
    }

    pub fn committed(&self) -> i64 {
        self.committed
    }

    pub fn held(&self) -> usize {
        self.receipts.len()
    }

    /// Starts a pull at `offset`: receipts the client no longer expects (it asks again from an
    /// earlier offset after a rebalance, a dropped cache or a seek) are returned for release.
    /// Returns the ticket the pull's pop must present.
    pub fn begin_pull(&mut self, offset: i64) -> (u64, Vec<Receipt>) {
        self.ticket += 1;
        let mut released = Vec::new();
        if offset != self.cursor {
            let dropped = self.receipts.split_off(&offset.max(0));
            released.extend(
                dropped
                    .into_values()
                    .filter(|receipt| receipt.state == ReceiptState::Held),
            );
            self.cursor = offset.max(0);
        }
        (self.ticket, released)
    }

    /// Records the receipts a pop brought for the pull holding `ticket`. They get offsets from
    /// the cursor on. `Err` gives them back when a newer pull took over meanwhile.
    pub fn hand_out(
        &mut self,
        ticket: u64,
        receipts: Vec<Receipt>,
        backlog: i64,
    ) -> Result<i64, Vec<Receipt>> {
        if ticket != self.ticket {
            return Err(receipts);
        }
        let first = self.cursor;
        for receipt in receipts {
            self.receipts.insert(self.cursor, receipt);
            self.cursor += 1;
        }
        self.backlog = backlog.max(0);
        Ok(first)
    }

    /// The client has consumed everything below `offset`.
    pub fn commit(&mut self, offset: i64, now_ms: i64) -> Settled {
        let mut settled = Settled::default();
        if offset <= self.committed {
            return settled;
        }
        self.committed = offset;
        let kept = self.receipts.split_off(&offset);
        let passed = std::mem::replace(&mut self.receipts, kept);
        for receipt in passed.into_values() {
            match receipt.state {
                ReceiptState::Nacked => settled.nacked += 1,
                ReceiptState::Held if receipt.visible_at_ms <= now_ms => settled.lapsed += 1,
                ReceiptState::Held => settled.to_ack.push(receipt),
            }
        }
        settled
    }

    /// The held receipt of a message, by the broker and commit-log offset a send-back names, with
    /// its virtual offset.
    pub fn find_held(&self, broker: &str, commit_log_offset: i64) -> Option<(i64, &Receipt)> {
        self.receipts
            .iter()
            .find(|(_, receipt)| {
                receipt.state == ReceiptState::Held
                    && receipt.commit_log_offset == commit_log_offset
                    && &*receipt.broker == broker
            })
            .map(|(offset, receipt)| (*offset, receipt))
    }

    /// Held receipts that become visible before `horizon_ms`, as (virtual offset, receipt).
    pub fn due(&self, horizon_ms: i64) -> impl Iterator<Item = (i64, &Receipt)> {
        self.receipts.iter().filter_map(move |(offset, receipt)| {
            (receipt.state == ReceiptState::Held && receipt.visible_at_ms < horizon_ms)
                .then_some((*offset, receipt))
        })
    }

    /// The receipt at `offset`, if it still holds `pop_time` (no commit or rewind replaced it).
    pub fn receipt_mut(&mut self, offset: i64, pop_time: i64) -> Option<&mut Receipt> {
        self.receipts
            .get_mut(&offset)
            .filter(|receipt| receipt.handle.pop_time == pop_time)
    }

    /// Everything still held, for release when the client goes away.
    pub fn drain(&mut self) -> Vec<Receipt> {
        std::mem::take(&mut self.receipts)
            .into_values()
            .filter(|receipt| receipt.state == ReceiptState::Held)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receipt(offset: i64, visible_at_ms: i64) -> Receipt {
        Receipt {
            broker: Arc::from("b"),
            ack_topic: "T".into(),
            handle: ExtraInfo {
                pop_time: 1,
                ..ExtraInfo::default()
            },
            queue_offset: offset,
            commit_log_offset: offset * 100,
            reconsume_times: 0,
            visible_at_ms,
            popped_at_ms: 0,
            state: ReceiptState::Held,
        }
    }

    #[test]
    fn offsets_are_contiguous_from_the_pull_offset() {
        let mut queue = VirtualQueue::default();
        let (ticket, released) = queue.begin_pull(0);
        assert!(released.is_empty());
        let first = queue
            .hand_out(ticket, vec![receipt(7, 100), receipt(9, 100)], 5)
            .expect("current ticket");
        assert_eq!((first, queue.cursor(), queue.backlog), (0, 2, 5));
        let (ticket, _) = queue.begin_pull(2);
        let first = queue
            .hand_out(ticket, vec![receipt(3, 100)], 0)
            .expect("current ticket");
        assert_eq!((first, queue.cursor()), (2, 3));
    }

    #[test]
    fn a_commit_acks_held_receipts_below_it_and_skips_nacked_and_lapsed_ones() {
        let mut queue = VirtualQueue::default();
        let (ticket, _) = queue.begin_pull(0);
        queue
            .hand_out(
                ticket,
                vec![
                    receipt(1, 100),
                    receipt(2, 100),
                    receipt(3, 10),
                    receipt(4, 100),
                ],
                0,
            )
            .expect("current");
        let (offset, _) = queue.find_held("b", 200).expect("held");
        queue.receipt_mut(offset, 1).expect("same pop").state = ReceiptState::Nacked;
        let settled = queue.commit(3, 50);
        assert_eq!(settled.to_ack.len(), 1);
        assert_eq!(settled.to_ack[0].queue_offset, 1);
        assert_eq!((settled.nacked, settled.lapsed), (1, 1));
        assert_eq!(queue.held(), 1);
        assert_eq!(
            queue.commit(2, 50),
            Settled::default(),
            "commits only move forward"
        );
        assert_eq!(queue.committed(), 3);
    }

    #[test]
    fn a_rewind_releases_what_the_client_dropped() {
        let mut queue = VirtualQueue::default();
        let (ticket, _) = queue.begin_pull(0);
        queue
            .hand_out(
                ticket,
                vec![receipt(1, 100), receipt(2, 100), receipt(3, 100)],
                0,
            )
            .expect("current");
        let (_, released) = queue.begin_pull(1);
        assert_eq!(
            released.iter().map(|r| r.queue_offset).collect::<Vec<_>>(),
            vec![2, 3]
        );
        assert_eq!((queue.cursor(), queue.held()), (1, 1));
    }

    #[test]
    fn a_pop_for_a_superseded_pull_is_given_back() {
        let mut queue = VirtualQueue::default();
        let (old, _) = queue.begin_pull(0);
        let (new, _) = queue.begin_pull(0);
        assert!(queue.hand_out(old, vec![receipt(1, 100)], 0).is_err());
        assert_eq!(queue.hand_out(new, vec![receipt(2, 100)], 0), Ok(0));
    }
}
