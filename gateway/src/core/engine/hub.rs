//! The hub: node-local fan-out. It knows the sessions attached to this
//! node, their outboxes and who subscribed to what (the one filter trie,
//! and shared groups indexed by filter in a trie of their own, so a publish
//! visits only the groups whose filter matches its channel), and pushes a
//! sequenced message into every matching outbox with `try`-push semantics:
//! the channel's slow-consumer policy applies when an outbox is full, and
//! it never waits for a subscriber.
//!
//! It does not sequence, store, authorise or decide replays: an engine
//! hands it messages in each channel's serial order (holding that channel's
//! lock) and registers a subscription once it has computed what to replay,
//! so replay and live neither overlap nor leave a hole. Whatever engine
//! holds channel state (this node's memory or disk, or a shared log), the
//! fan-out stays here, in process.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use switchboard_proto::ErrorCode;
use switchboard_protocols::port::{CoreError, Delivery, Outbound, Outbox, SessionId, SlowPolicy};

use super::Caller;
use crate::core::channel::{self, TopicTrie};
use crate::core::str_set::StrSet;

fn not_connected() -> CoreError {
    CoreError::new(ErrorCode::NotConnected, "no such session")
}

#[derive(Debug)]
struct Session {
    caller: Caller,
    outbox: Arc<Outbox>,
    /// Filters the client subscribed to.
    filters: StrSet,
    /// Filters whose `$presence/<filter>` companion this session holds
    /// because it subscribed with `presence: true`. Kept apart from
    /// `filters` so that an explicit `$presence/...` subscription survives
    /// unsubscribing the base filter.
    companions: StrSet,
    /// Channels whose presence this session entered.
    presence: StrSet,
}

/// A subscription's target in the trie.
#[derive(Debug, Clone)]
struct Sub {
    outbox: Arc<Outbox>,
    /// Skip messages this session published itself (MQTT 5 no-local).
    no_local: bool,
}

/// An MQTT 5 shared subscription `$share/{group}/{filter}`: each message
/// goes to one member, round robin.
#[derive(Debug, Default)]
struct SharedGroup {
    members: Vec<(SessionId, Sub)>,
    next: usize,
}

/// A shared group, held by the trie and by its (group, filter) key.
type SharedRef = Arc<Mutex<SharedGroup>>;

/// Node-local fan-out (see the module docs).
#[derive(Debug, Default)]
pub struct Hub {
    trie: TopicTrie<SessionId, Sub>,
    shared: TopicTrie<u64, Arc<Mutex<SharedGroup>>>,
    /// (group, filter) → the group's key in `shared`, and the group.
    shared_keys: HashMap<(String, String), (u64, SharedRef)>,
    next_shared: u64,
    sessions: HashMap<SessionId, Session>,
}

/// The start of every engine's subscribe, which is the hub's alone: an
/// MQTT 5 shared subscription joins its group and is answered at once,
/// with no replay (MQTT 5 sends no retained messages to them; recovery
/// belongs to one member, not a group); any other needs the session
/// attached, and `None` says the engine goes on.
pub fn begin_subscribe(
    hub: &parking_lot::RwLock<Hub>,
    session: SessionId,
    req: &switchboard_proto::Subscribe,
    max_groups: usize,
) -> Result<Option<switchboard_protocols::port::SubscribeOutcome>, CoreError> {
    if let Some((group, inner)) = channel::parse_shared(&req.filter) {
        hub.write().subscribe_shared(session, &req.filter, (group, inner), req.no_local, max_groups)?;
        return Ok(Some(switchboard_protocols::port::SubscribeOutcome {
            subscribed: switchboard_proto::Subscribed { filter: req.filter.clone(), channels: Vec::new() },
            replay: Vec::new(),
        }));
    }
    if !hub.read().has_session(session) {
        return Err(not_connected());
    }
    Ok(None)
}

/// What a detached session leaves behind for the engine to finish.
#[derive(Debug)]
pub struct Detached {
    /// Who it was.
    pub caller: Caller,
    /// Channels whose presence it had entered.
    pub presence: StrSet,
}

impl Hub {
    /// Registers a session.
    pub fn attach(&mut self, caller: &Caller, outbox: Arc<Outbox>) {
        let session = Session {
            caller: caller.clone(),
            outbox,
            filters: StrSet::new(),
            companions: StrSet::new(),
            presence: StrSet::new(),
        };
        self.sessions.insert(caller.session, session);
    }

    /// Removes a session and every subscription it held.
    pub fn detach(&mut self, session: SessionId) -> Option<Detached> {
        let s = self.sessions.remove(&session)?;
        for f in &s.filters {
            match channel::parse_shared(f) {
                Some((group, inner)) => self.leave_group(group, inner, session),
                None => {
                    self.trie.remove(f, session);
                }
            }
        }
        for f in &s.companions {
            self.trie.remove(&channel::presence_channel(f), session);
        }
        Some(Detached { caller: s.caller, presence: s.presence })
    }

    /// Whether `session` is attached.
    pub fn has_session(&self, session: SessionId) -> bool {
        self.sessions.contains_key(&session)
    }

    /// Subscribes to a (validated) filter, with its `$presence/` companion
    /// when given. A repeated subscribe to the same filter replaces its
    /// options (MQTT semantics), so no companion drops an earlier one.
    pub fn subscribe(
        &mut self,
        session: SessionId,
        filter: &str,
        companion: Option<&str>,
        no_local: bool,
    ) -> Result<(), CoreError> {
        let s = self.sessions.get_mut(&session).ok_or_else(not_connected)?;
        let sub = Sub { outbox: s.outbox.clone(), no_local };
        self.trie.insert(filter, session, sub.clone());
        s.filters.insert(filter.to_string());
        match companion {
            Some(c) => {
                self.trie.insert(c, session, sub);
                s.companions.insert(filter.to_string());
            }
            None => {
                if s.companions.remove(filter) {
                    let c = channel::presence_channel(filter);
                    if !s.filters.contains(&c) {
                        self.trie.remove(&c, session);
                    }
                }
            }
        }
        Ok(())
    }

    /// Joins the shared group `$share/{group}/{inner}` (`filter` whole),
    /// creating it unless the node already holds `max_groups`.
    pub fn subscribe_shared(
        &mut self,
        session: SessionId,
        filter: &str,
        (group, inner): (&str, &str),
        no_local: bool,
        max_groups: usize,
    ) -> Result<(), CoreError> {
        let is_new = !self.shared_keys.contains_key(&(group.to_string(), inner.to_string()));
        if is_new && self.shared_keys.len() >= max_groups {
            return Err(CoreError::new(
                ErrorCode::TooManySubscriptions,
                format!("the node holds its maximum of {max_groups} shared subscription groups"),
            ));
        }
        let s = self.sessions.get_mut(&session).ok_or_else(not_connected)?;
        let sub = Sub { outbox: s.outbox.clone(), no_local };
        s.filters.insert(filter.to_string());
        self.join_group(group, inner, session, sub);
        Ok(())
    }

    /// Unsubscribes a filter and its presence companion (an explicit
    /// `$presence/...` subscription of the same session stays).
    pub fn unsubscribe(&mut self, session: SessionId, filter: &str) -> Result<(), CoreError> {
        let s = self.sessions.get_mut(&session).ok_or_else(not_connected)?;
        if !s.filters.remove(filter) {
            return Err(CoreError::new(ErrorCode::NotSubscribed, format!("not subscribed to {filter:?}")));
        }
        if let Some((group, inner)) = channel::parse_shared(filter) {
            self.leave_group(group, inner, session);
            return Ok(());
        }
        // The trie holds one entry per (filter, session): keep it while the
        // same filter is still held as someone's presence companion.
        let held_as_companion =
            filter.strip_prefix(channel::PRESENCE_PREFIX).is_some_and(|base| s.companions.contains(base));
        let dropped_companion = s.companions.remove(filter);
        let companion_subscribed = s.filters.contains(&channel::presence_channel(filter));
        if !held_as_companion {
            self.trie.remove(filter, session);
        }
        if dropped_companion && !companion_subscribed {
            self.trie.remove(&channel::presence_channel(filter), session);
        }
        Ok(())
    }

    /// Records that the session entered (or left) a channel's presence, so
    /// its members leave when it detaches.
    pub fn note_presence(&mut self, session: SessionId, channel: &str, entered: bool) {
        if let Some(s) = self.sessions.get_mut(&session) {
            if entered {
                s.presence.insert(channel.to_string());
            } else {
                s.presence.remove(channel);
            }
        }
    }

    /// Every filter some local session needs messages of, once each
    /// (presence companions and shared groups' filters included): what the
    /// node asks a shared log for.
    pub fn interest(&self) -> Vec<String> {
        let mut out = self.trie.filters();
        let shared: std::collections::BTreeSet<&str> = self.shared_keys.keys().map(|(_, f)| f.as_str()).collect();
        out.extend(shared.into_iter().map(str::to_string));
        out
    }

    /// (filter, session) subscriptions, shared groups not included.
    pub fn subscriptions(&self) -> usize {
        self.trie.len()
    }

    /// Shared groups now (each (group, filter) once).
    pub fn shared_groups(&self) -> usize {
        debug_assert_eq!(self.shared_keys.len(), self.shared.len());
        self.shared_keys.len()
    }

    fn join_group(&mut self, group: &str, filter: &str, session: SessionId, sub: Sub) {
        let key = (group.to_string(), filter.to_string());
        let g = match self.shared_keys.get(&key) {
            Some((_, g)) => g.clone(),
            None => {
                self.next_shared += 1;
                let id = self.next_shared;
                let g = Arc::new(Mutex::new(SharedGroup::default()));
                self.shared.insert(filter, id, g.clone());
                self.shared_keys.insert(key, (id, g.clone()));
                g
            }
        };
        let mut g = g.lock();
        match g.members.iter_mut().find(|(sid, _)| *sid == session) {
            Some(m) => m.1 = sub,
            None => g.members.push((session, sub)),
        }
    }

    fn leave_group(&mut self, group: &str, filter: &str, session: SessionId) {
        let key = (group.to_string(), filter.to_string());
        let Some((id, g)) = self.shared_keys.get(&key) else { return };
        let id = *id;
        let mut g = g.lock();
        g.members.retain(|(sid, _)| *sid != session);
        let empty = g.members.is_empty();
        if !empty {
            g.next %= g.members.len();
        }
        drop(g);
        if empty {
            self.shared.remove(filter, id);
            self.shared_keys.remove(&key);
        }
    }

    /// Pushes a delivery to every matching subscriber, once per session,
    /// and to one member of every matching shared group. `from` is the
    /// publishing session (0 for none), skipped where it asked for no-local.
    pub fn fanout(&self, delivery: &Arc<Delivery>, policy: SlowPolicy, from: SessionId) {
        let channel = delivery.channel();
        let mut targets: Vec<(SessionId, &Sub)> = Vec::new();
        self.trie.for_each_match(channel, |sid, sub| {
            if !(sub.no_local && *sid == from) {
                targets.push((*sid, sub));
            }
        });
        if targets.len() > 1 {
            // A session subscribed through several matching filters gets
            // the message once.
            targets.sort_unstable_by_key(|(sid, _)| *sid);
            targets.dedup_by_key(|(sid, _)| *sid);
        }
        for (_, sub) in targets {
            sub.outbox.push(Outbound::Message(delivery.clone()), policy);
        }
        self.shared.for_each_match(channel, |_, group| {
            // Round robin over members that can take it: not closed, and not
            // the publisher when it asked for no-local.
            let mut g = group.lock();
            let n = g.members.len();
            for step in 0..n {
                let i = (g.next + step) % n;
                let (sid, sub) = &g.members[i];
                if (sub.no_local && *sid == from) || sub.outbox.closed().is_some() {
                    continue;
                }
                sub.outbox.push(Outbound::Message(delivery.clone()), policy);
                g.next = (i + 1) % n;
                break;
            }
        });
    }
}
