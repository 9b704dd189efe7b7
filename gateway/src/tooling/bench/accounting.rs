//! Loss, duplicate and reorder accounting per subscriber per publisher.
//!
//! A subscriber keeps one [`SeqTracker`] per publisher; at the end of the run
//! each tracker is compared with how many messages that publisher sent on the
//! subscriber's channel (its sequences are `0..sent`, numbered per
//! publisher per channel). Pure bookkeeping: no I/O, no clock.

/// What one subscriber saw of one publisher's sequence.
#[derive(Debug, Clone, Default)]
pub struct SeqTracker {
    seen: Vec<u64>,
    distinct: u64,
    duplicates: u64,
    reordered: u64,
    /// Highest sequence seen plus one (0: none yet).
    next_expected: u64,
}

/// Totals over any number of trackers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Tally {
    /// Messages delivered (duplicates included).
    pub delivered: u64,
    /// Sent but never delivered (after the drain period).
    pub lost: u64,
    /// Delivered more than once (each extra copy counts).
    pub duplicated: u64,
    /// Delivered after a higher sequence of the same publisher.
    pub reordered: u64,
    /// Sequences at or beyond what the publisher reports having sent.
    pub unexpected: u64,
}

impl Tally {
    /// Adds `other` to `self`.
    pub fn add(&mut self, other: Tally) {
        self.delivered += other.delivered;
        self.lost += other.lost;
        self.duplicated += other.duplicated;
        self.reordered += other.reordered;
        self.unexpected += other.unexpected;
    }

    /// True when anything went wrong.
    pub fn has_errors(&self) -> bool {
        self.lost + self.duplicated + self.reordered + self.unexpected > 0
    }
}

impl SeqTracker {
    /// Records the delivery of `seq`.
    pub fn observe(&mut self, seq: u64) {
        let word = usize::try_from(seq / 64).unwrap_or(usize::MAX);
        if word >= self.seen.len() {
            // Sequences arrive roughly in order, so this grows a word at a time.
            self.seen.resize(word.saturating_add(1), 0);
        }
        let bit = 1u64 << (seq % 64);
        if self.seen[word] & bit != 0 {
            self.duplicates += 1;
            return;
        }
        self.seen[word] |= bit;
        self.distinct += 1;
        if seq + 1 < self.next_expected {
            self.reordered += 1;
        } else {
            self.next_expected = seq + 1;
        }
    }

    /// Distinct sequences seen.
    pub fn distinct(&self) -> u64 {
        self.distinct
    }

    /// The tally against a publisher that sent sequences `0..sent`.
    pub fn tally(&self, sent: u64) -> Tally {
        let in_range = (0..sent.min(self.next_expected)).filter(|s| self.has(*s)).count() as u64;
        Tally {
            delivered: self.distinct + self.duplicates,
            lost: sent - in_range,
            duplicated: self.duplicates,
            reordered: self.reordered,
            unexpected: self.distinct - in_range,
        }
    }

    fn has(&self, seq: u64) -> bool {
        let word = (seq / 64) as usize;
        self.seen.get(word).is_some_and(|w| w & (1u64 << (seq % 64)) != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(seqs: &[u64], sent: u64) -> Tally {
        let mut t = SeqTracker::default();
        for &s in seqs {
            t.observe(s);
        }
        t.tally(sent)
    }

    #[test]
    fn table_of_sequences() {
        // (delivered sequences, sent, delivered, lost, duplicated, reordered, unexpected)
        type Case = (&'static [u64], u64, u64, u64, u64, u64, u64);
        let cases: &[Case] = &[
            (&[], 0, 0, 0, 0, 0, 0),
            (&[], 3, 0, 3, 0, 0, 0),
            (&[0, 1, 2], 3, 3, 0, 0, 0, 0),
            (&[0, 2], 3, 2, 1, 0, 0, 0),
            (&[0, 1, 1, 2], 3, 4, 0, 1, 0, 0),
            (&[0, 2, 1], 3, 3, 0, 0, 1, 0),
            (&[2, 1, 0], 3, 3, 0, 0, 2, 0),
            (&[0, 1, 2, 2, 2], 3, 5, 0, 2, 0, 0),
            (&[0, 1, 2, 3], 3, 4, 0, 0, 0, 1),
            (&[1, 0, 0], 2, 3, 0, 1, 1, 0),
            (&[0, 130, 64], 200, 3, 197, 0, 1, 0),
        ];
        for &(seqs, sent, delivered, lost, duplicated, reordered, unexpected) in cases {
            assert_eq!(
                run(seqs, sent),
                Tally { delivered, lost, duplicated, reordered, unexpected },
                "sequences {seqs:?} of {sent}"
            );
        }
    }

    #[test]
    fn tally_adds_and_flags() {
        let mut t = Tally::default();
        assert!(!t.has_errors());
        t.add(run(&[0, 0], 1));
        t.add(run(&[0], 1));
        assert_eq!(t.delivered, 3);
        assert_eq!(t.duplicated, 1);
        assert!(t.has_errors());
    }
}
