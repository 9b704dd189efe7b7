//! Which server-opened unidirectional stream carries which channel, and
//! what each stream still has to write: a state machine without I/O.
//!
//! Every channel gets a stream of its own, opened on its first delivery and
//! kept for the session's life, so one channel's lost packet or stalled
//! reader never holds another channel back (QUIC orders bytes per stream
//! only). A session that receives from more than `max_streams` channels
//! shares the existing streams among the rest: a channel past the bound
//! goes to stream `fnv1a(channel) % max_streams`, for good. A channel never
//! changes stream, so its frames stay in serial order.
//!
//! The session feeds frames in with [`ChannelStreams::queue`], asks for
//! [`Action`]s (open a stream, write a batch), and reports back with
//! [`ChannelStreams::opened`] and [`ChannelStreams::written`]. At most one
//! write per stream is in flight; whatever queues meanwhile goes out as the
//! next batch, in one write. [`ChannelStreams::queued_bytes`] counts every
//! byte accepted and not yet written, the number the session bounds.

use std::collections::HashMap;

use bytes::{Bytes, BytesMut};

use super::codec;

/// A stream's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Not opened yet.
    New,
    /// An open is in flight.
    Opening,
    /// Open, nothing in flight.
    Idle,
    /// A write is in flight.
    Writing,
}

/// One server-opened stream.
#[derive(Debug)]
struct Slot {
    state: State,
    /// Frames waiting for the next write.
    buf: BytesMut,
    /// Bytes of the write in flight.
    in_flight: usize,
}

/// What the session must do next.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Open stream `slot` (then report [`ChannelStreams::opened`]).
    Open(usize),
    /// Write these bytes on stream `slot` (then report
    /// [`ChannelStreams::written`]).
    Write(usize, Bytes),
}

/// Capacity a drained buffer may keep between batches: an idle session
/// must not pin a burst's memory.
const KEEP_CAPACITY: usize = 4 * 1024;

/// The streams of one session (see the module docs).
#[derive(Debug)]
pub struct ChannelStreams {
    max_streams: usize,
    /// Channels with a stream of their own (at most `max_streams`).
    own: HashMap<String, usize>,
    slots: Vec<Slot>,
    /// Queued plus in-flight bytes, over every stream.
    queued: usize,
}

/// FNV-1a, 32 bits: a stable spread of channel names over shared streams.
fn fnv1a(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193))
}

impl ChannelStreams {
    /// At most `max_streams` streams (at least one).
    pub fn new(max_streams: usize) -> Self {
        ChannelStreams { max_streams: max_streams.max(1), own: HashMap::new(), slots: Vec::new(), queued: 0 }
    }

    /// The stream `channel` uses, assigning one on first sight.
    pub fn slot_of(&mut self, channel: &str) -> usize {
        if let Some(&slot) = self.own.get(channel) {
            return slot;
        }
        if self.slots.len() < self.max_streams {
            let slot = self.slots.len();
            self.slots.push(Slot { state: State::New, buf: BytesMut::new(), in_flight: 0 });
            self.own.insert(channel.to_string(), slot);
            return slot;
        }
        fnv1a(channel) as usize % self.max_streams
    }

    /// Queues one frame body for `channel`'s stream.
    pub fn queue(&mut self, channel: &str, body: &[u8]) {
        let slot = self.slot_of(channel);
        let s = &mut self.slots[slot];
        let before = s.buf.len();
        codec::put_frame(&mut s.buf, body);
        self.queued += s.buf.len() - before;
    }

    /// Bytes accepted and not yet written, over every stream.
    pub fn queued_bytes(&self) -> usize {
        self.queued
    }

    /// Streams assigned so far (opened or opening).
    pub fn stream_count(&self) -> usize {
        self.slots.len()
    }

    /// Whether nothing is queued or in flight.
    pub fn is_idle(&self) -> bool {
        self.queued == 0 && self.slots.iter().all(|s| s.state != State::Opening)
    }

    /// Appends what can start now: opens for new streams with data, one
    /// batch write for each idle stream with data.
    pub fn actions(&mut self, out: &mut Vec<Action>) {
        for (i, s) in self.slots.iter_mut().enumerate() {
            if s.buf.is_empty() {
                continue;
            }
            match s.state {
                State::New => {
                    s.state = State::Opening;
                    out.push(Action::Open(i));
                }
                State::Idle => {
                    s.state = State::Writing;
                    s.in_flight = s.buf.len();
                    let batch = s.buf.split().freeze();
                    if s.buf.capacity() > KEEP_CAPACITY {
                        s.buf = BytesMut::new();
                    }
                    out.push(Action::Write(i, batch));
                }
                State::Opening | State::Writing => {}
            }
        }
    }

    /// Stream `slot` is open.
    pub fn opened(&mut self, slot: usize) {
        if let Some(s) = self.slots.get_mut(slot)
            && s.state == State::Opening
        {
            s.state = State::Idle;
        }
    }

    /// The write in flight on `slot` completed.
    pub fn written(&mut self, slot: usize) {
        if let Some(s) = self.slots.get_mut(slot)
            && s.state == State::Writing
        {
            self.queued -= s.in_flight;
            s.in_flight = 0;
            s.state = State::Idle;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(cs: &mut ChannelStreams) -> Vec<Action> {
        let mut out = Vec::new();
        cs.actions(&mut out);
        out
    }

    #[test]
    fn each_channel_gets_its_own_stream_in_order_of_first_sight() {
        let mut cs = ChannelStreams::new(8);
        cs.queue("a", b"1");
        cs.queue("b", b"1");
        cs.queue("a", b"2");
        assert_eq!((cs.slot_of("a"), cs.slot_of("b")), (0, 1));
        assert_eq!(drain(&mut cs), vec![Action::Open(0), Action::Open(1)]);
        // Nothing more until the opens complete.
        assert!(drain(&mut cs).is_empty());
        cs.opened(1);
        assert_eq!(drain(&mut cs), vec![Action::Write(1, Bytes::from_static(b"\x011"))]);
        cs.opened(0);
        // Both of a's frames go out in one write, in order.
        assert_eq!(drain(&mut cs), vec![Action::Write(0, Bytes::from_static(b"\x011\x012"))]);
        assert_eq!(cs.queued_bytes(), 6);
    }

    #[test]
    fn one_write_in_flight_per_stream_and_the_rest_batches() {
        let mut cs = ChannelStreams::new(8);
        cs.queue("a", b"x");
        drain(&mut cs);
        cs.opened(0);
        assert_eq!(drain(&mut cs).len(), 1);
        cs.queue("a", b"y");
        cs.queue("a", b"z");
        assert!(drain(&mut cs).is_empty(), "a write is in flight");
        assert_eq!(cs.queued_bytes(), 6);
        cs.written(0);
        assert_eq!(cs.queued_bytes(), 4);
        assert_eq!(drain(&mut cs), vec![Action::Write(0, Bytes::from_static(b"\x01y\x01z"))]);
        cs.written(0);
        assert_eq!(cs.queued_bytes(), 0);
        assert!(cs.is_idle());
    }

    #[test]
    fn a_stalled_stream_does_not_hold_others() {
        let mut cs = ChannelStreams::new(8);
        cs.queue("slow", b"1");
        cs.queue("fast", b"1");
        drain(&mut cs);
        cs.opened(0);
        cs.opened(1);
        assert_eq!(drain(&mut cs).len(), 2);
        // "slow" never completes; "fast" keeps going.
        for _ in 0..3 {
            cs.written(1);
            cs.queue("fast", b"n");
            cs.queue("slow", b"n");
            assert_eq!(drain(&mut cs), vec![Action::Write(1, Bytes::from_static(b"\x01n"))]);
        }
        assert_eq!(cs.queued_bytes(), 2 + 3 * 2 + 2);
    }

    #[test]
    fn past_the_bound_channels_share_streams_for_good() {
        let mut cs = ChannelStreams::new(2);
        assert_eq!((cs.slot_of("a"), cs.slot_of("b")), (0, 1));
        let shared: Vec<usize> = (0..20).map(|i| cs.slot_of(&format!("c{i}"))).collect();
        assert!(shared.iter().all(|&s| s < 2));
        assert!(shared.contains(&0) && shared.contains(&1), "spread over both: {shared:?}");
        let again: Vec<usize> = (0..20).map(|i| cs.slot_of(&format!("c{i}"))).collect();
        assert_eq!(shared, again, "stable");
        assert_eq!(cs.stream_count(), 2);
        assert_eq!(ChannelStreams::new(0).slot_of("x"), 0, "at least one stream");
    }

    #[test]
    fn reports_for_unknown_or_wrong_state_slots_are_ignored() {
        let mut cs = ChannelStreams::new(2);
        cs.opened(5);
        cs.written(5);
        cs.queue("a", b"1");
        cs.written(0);
        assert_eq!(cs.queued_bytes(), 2, "not in flight: nothing to account");
    }
}
