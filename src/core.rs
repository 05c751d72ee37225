//! The shared state the parts of the server meet in: the user directory, the
//! handles of the commit thread and the event loops, counters.
//!
//! The routing path (a SEND naming a user) reads the directory, a lock-free
//! `papaya` map from address to [`User`], and the user's `attached` mailbox
//! (an `ArcSwap`): no lock is taken between a sender's event loop and the
//! recipient's.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::mailbox::Mailbox;
use crate::net::{Notice, WorkerHandle};
use crate::store::{Commit, Store, StoreError, UserRecord};
use crate::wire::ErrorCode;

/// Bits of a SEQ below the boot counter: each boot owns `boot << 40 ..`.
pub const SEQ_BOOT_SHIFT: u32 = 40;

/// Milliseconds since the Unix epoch, the server clock.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// SHA-256 of a token: the only form in which tokens are stored.
pub fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Names one connection across threads. The generation makes a reference to a
/// closed connection stale even after its slab slot is reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnRef {
    /// Index of the event loop that owns the connection.
    pub worker: usize,
    /// Slab slot in that loop.
    pub token: usize,
    /// Unique per connection for the life of the process.
    pub generation: u64,
}

/// A stored item written to the user and not yet ACKed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Inflight {
    /// Where the item sits in the inbox (the key needs it).
    pub priority: u8,
    /// An ACK for it is at the commit thread: repeated ACKs are not resent.
    pub acking: bool,
}

/// One user, shared by everything that delivers to or from them.
pub struct User {
    /// The address, shared with every item and status that names it.
    pub address: Arc<str>,
    /// Display name from the admin API.
    pub name: Mutex<String>,
    /// When the user was created, ms.
    pub created_ms: u64,
    /// Next SEQ to hand out; starts at `boot << 40 | 1`.
    next_seq: AtomicU64,
    /// Stored items in the inbox (for `max_queue` and the admin API).
    pub queued: AtomicU64,
    /// The mailbox of the connection the user is logged in on, if any.
    pub attached: ArcSwapOption<Mailbox>,
    /// Items written to a connection of this user and not yet ACKed, this
    /// boot, by SEQ. Survives reconnects: an item found here when it is
    /// written again carries REDELIVERY. Taken by the user's own session and
    /// by the commit thread, never by anyone else.
    pub inflight: Mutex<HashMap<u64, Inflight>>,
    /// Set when the user is deleted; sessions and sends stop seeing it.
    pub deleted: AtomicBool,
}

impl User {
    /// A user with nothing queued.
    pub fn new(address: &str, name: String, boot: u64) -> User {
        User {
            address: address.into(),
            name: Mutex::new(name),
            created_ms: now_ms(),
            next_seq: AtomicU64::new((boot << SEQ_BOOT_SHIFT) | 1),
            queued: AtomicU64::new(0),
            attached: ArcSwapOption::empty(),
            inflight: Mutex::new(HashMap::new()),
            deleted: AtomicBool::new(false),
        }
    }

    /// Hands out the next SEQ of this user.
    pub fn next_seq(&self) -> u64 {
        self.next_seq.fetch_add(1, Ordering::Relaxed)
    }

    /// The inflight map; a poisoned lock (a panic elsewhere) is still usable
    /// because every update to it is a single insert or remove.
    pub fn inflight(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Inflight>> {
        self.inflight.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The connected session's mailbox, if the user is online.
    pub fn mailbox(&self) -> Option<Arc<Mailbox>> {
        self.attached.load_full().filter(|mb| mb.closed().is_none())
    }
}

/// One member of a group.
#[derive(Clone)]
pub struct Member {
    /// The member.
    pub user: Arc<User>,
    /// May send to the group.
    pub send: bool,
    /// Receives the group's messages.
    pub recv: bool,
}

/// A group: an immutable snapshot, replaced as a whole when the admin API
/// changes it, so a SEND sees one consistent membership ("the members at the
/// time of sending") without a lock.
pub struct Group {
    /// The group's name.
    pub name: Arc<str>,
    /// The members, in address order.
    pub members: Vec<Member>,
}

impl Group {
    /// The membership of `address`, if any.
    pub fn member(&self, address: &str) -> Option<&Member> {
        self.members
            .binary_search_by(|m| (*m.user.address).cmp(address))
            .ok()
            .map(|i| &self.members[i])
    }
}

/// A membership as the admin API gives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberSpec {
    pub address: String,
    pub send: bool,
    pub recv: bool,
}

/// Why a group change was refused.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    #[error("invalid group name")]
    InvalidName,
    #[error("unknown user {0:?}")]
    UnknownUser(String),
    #[error("more than {0} members")]
    TooLarge(usize),
    #[error("no such group")]
    NotFound,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Counters exported by the metrics endpoint.
#[derive(Default)]
pub struct Metrics {
    /// Open protocol connections.
    pub connections: AtomicU64,
    /// Frames and bytes read from clients.
    pub frames_in: AtomicU64,
    pub bytes_in: AtomicU64,
    /// Frames and bytes written to clients.
    pub frames_out: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Messages accepted (stored or handed to a live recipient).
    pub accepted: AtomicU64,
    /// Messages ACKed by their recipient.
    pub delivered: AtomicU64,
    /// Items expired by the sweeper.
    pub expired: AtomicU64,
    /// SENDs answered from the duplicate-detection record.
    pub deduplicated: AtomicU64,
    /// Synced batches written and requests in them.
    pub commits: AtomicU64,
    pub committed_requests: AtomicU64,
    /// Latency of synced batch writes, microseconds.
    pub commit_latency: Mutex<Option<hdrhistogram::Histogram<u64>>>,
    /// From a message's TIME to its MSG being written, microseconds.
    pub delivery_latency: Mutex<Option<hdrhistogram::Histogram<u64>>>,
    /// Files uploaded.
    pub files_stored: AtomicU64,
}

impl Metrics {
    /// Records one synced batch of `requests` requests.
    pub fn record_commit(&self, took: std::time::Duration, requests: u64) {
        self.commits.fetch_add(1, Ordering::Relaxed);
        self.committed_requests
            .fetch_add(requests, Ordering::Relaxed);
        record(&self.commit_latency, &[took.as_micros() as u64]);
    }

    /// Records end-to-end delivery latencies, microseconds.
    pub fn record_deliveries(&self, micros: &[u64]) {
        if !micros.is_empty() {
            record(&self.delivery_latency, micros);
        }
    }
}

fn record(h: &Mutex<Option<hdrhistogram::Histogram<u64>>>, values: &[u64]) {
    let mut h = h.lock().unwrap_or_else(|e| e.into_inner());
    let h = h.get_or_insert_with(|| {
        // 1 µs .. 1 h, 3 significant digits.
        hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 3)
            .expect("static histogram bounds are valid")
    });
    for &v in values {
        h.saturating_record(v.max(1));
    }
}

/// Where the server is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Starting,
    Ready,
    ShuttingDown,
}

/// Everything shared between the server's threads.
pub struct Core {
    /// Validated configuration.
    pub config: Config,
    /// The database.
    pub store: Store,
    /// address → user; every stored user is here.
    pub users: papaya::HashMap<Arc<str>, Arc<User>>,
    /// name → group; every stored group is here.
    pub groups: papaya::HashMap<Arc<str>, Arc<Group>>,
    /// Serializes admin changes to groups (read-modify-write of a snapshot).
    group_admin: Mutex<()>,
    /// Next key of a shared group message record; starts at `boot << 40`.
    next_msgno: AtomicU64,
    /// Queue of the commit thread.
    pub commit: Commit,
    /// The event loops, set once they exist.
    pub workers: OnceLock<Vec<WorkerHandle>>,
    /// This boot's number (see [`SEQ_BOOT_SHIFT`]).
    pub boot: u64,
    /// Counters.
    pub metrics: Metrics,
    /// Starting, ready, shutting down.
    phase: Mutex<Phase>,
}

/// Why a user could not be created.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("invalid address")]
    InvalidAddress,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Core {
    /// Assembles the core around an open store; users are loaded from it.
    pub fn new(
        config: Config,
        store: Store,
        commit: Commit,
        boot: u64,
    ) -> Result<Core, StoreError> {
        let users = papaya::HashMap::new();
        let counts = store.count_inbox()?;
        {
            let pinned = users.pin();
            for rec in store.load_users()? {
                let mut user = User::new(&rec.address, rec.name, boot);
                user.created_ms = rec.created_ms;
                user.queued.store(
                    counts.get(&rec.address).copied().unwrap_or(0),
                    Ordering::Relaxed,
                );
                pinned.insert(user.address.clone(), Arc::new(user));
            }
        }
        let groups = papaya::HashMap::new();
        {
            let (pinned, users) = (groups.pin(), users.pin());
            for (name, members) in store.load_groups()? {
                let mut members: Vec<Member> = members
                    .into_iter()
                    .filter_map(|(address, perms)| {
                        Some(Member {
                            user: users.get(address.as_str())?.clone(),
                            send: perms & crate::store::keys::PERM_SEND != 0,
                            recv: perms & crate::store::keys::PERM_RECV != 0,
                        })
                    })
                    .collect();
                // Keys are length-prefixed, so key order is not address
                // order; `Group::member` needs address order.
                members.sort_by(|a, b| a.user.address.cmp(&b.user.address));
                let name: Arc<str> = name.into();
                pinned.insert(name.clone(), Arc::new(Group { name, members }));
            }
        }
        Ok(Core {
            config,
            store,
            users,
            groups,
            group_admin: Mutex::new(()),
            next_msgno: AtomicU64::new(boot << SEQ_BOOT_SHIFT),
            commit,
            workers: OnceLock::new(),
            boot,
            metrics: Metrics::default(),
            phase: Mutex::new(Phase::Starting),
        })
    }

    /// The user with this address, if it exists.
    pub fn user(&self, address: &str) -> Option<Arc<User>> {
        self.users
            .pin()
            .get(address)
            .filter(|u| !u.deleted.load(Ordering::Acquire))
            .cloned()
    }

    /// Creates a user, or gives an existing one a fresh token. Returns whether
    /// the user is new, and the token (shown once, stored only as a hash).
    pub fn create_user(
        &self,
        address: &str,
        name: Option<&str>,
        token_ttl_secs: Option<u64>,
    ) -> Result<(bool, String), UserError> {
        if !crate::wire::is_valid_address(address) {
            return Err(UserError::InvalidAddress);
        }
        let existing = self.user(address);
        let token = new_token();
        let now = now_ms();
        let expires = token_ttl_secs
            .map(|s| now.saturating_add(s.saturating_mul(1000)))
            .unwrap_or(0);
        let name = match (&existing, name) {
            (_, Some(n)) => n.to_owned(),
            (Some(u), None) => u.name.lock().map(|n| n.clone()).unwrap_or_default(),
            (None, None) => String::new(),
        };
        let record = UserRecord {
            address: address.to_owned(),
            name: name.clone(),
            created_ms: existing.as_ref().map_or(now, |u| u.created_ms),
        };
        self.store.put_user(&record, &hash_token(&token), expires)?;
        match existing {
            Some(user) => {
                if let Ok(mut n) = user.name.lock() {
                    *n = name;
                }
                Ok((false, token))
            }
            None => {
                let user = Arc::new(User::new(address, name, self.boot));
                self.users.pin().insert(user.address.clone(), user);
                Ok((true, token))
            }
        }
    }

    /// A fresh token for an existing user; `None` if there is no such user.
    pub fn add_token(
        &self,
        address: &str,
        token_ttl_secs: Option<u64>,
    ) -> Result<Option<String>, StoreError> {
        if self.user(address).is_none() {
            return Ok(None);
        }
        let token = new_token();
        let expires = token_ttl_secs
            .map(|s| now_ms().saturating_add(s.saturating_mul(1000)))
            .unwrap_or(0);
        self.store
            .put_token(address, &hash_token(&token), expires)?;
        Ok(Some(token))
    }

    /// Revokes every token of a user and closes its session; `false` if
    /// there is no such user.
    pub fn revoke_tokens(&self, address: &str) -> Result<bool, StoreError> {
        let Some(user) = self.user(address) else {
            return Ok(false);
        };
        self.store.revoke_tokens(address, false)?;
        self.close_session(&user, ErrorCode::AUTH_FAILED);
        Ok(true)
    }

    /// Deletes a user: tokens revoked, session closed with ERROR
    /// AUTH_FAILED, memberships removed, queued items deleted (their senders
    /// get STATUS DELETED). `false` if there is no such user.
    pub fn delete_user(&self, address: &str) -> Result<bool, StoreError> {
        let Some(user) = self.user(address) else {
            return Ok(false);
        };
        user.deleted.store(true, Ordering::Release);
        self.store.revoke_tokens(address, true)?;
        self.close_session(&user, ErrorCode::AUTH_FAILED);
        let groups: Vec<Arc<str>> = self
            .groups
            .pin()
            .iter()
            .filter(|(_, g)| g.member(address).is_some())
            .map(|(name, _)| name.clone())
            .collect();
        for name in groups {
            match self.change_members(&name, Vec::new(), &[address.to_owned()]) {
                Ok(_) | Err(GroupError::NotFound) => {}
                Err(GroupError::Store(e)) => return Err(e),
                Err(e) => tracing::warn!(group = %name, error = %e, "membership not removed"),
            }
        }
        let (done, wait) = crossbeam::channel::bounded(1);
        if self
            .commit
            .submit(crate::store::Request::Purge { user, done })
        {
            let _ = wait.recv();
        }
        self.users.pin().remove(address);
        Ok(true)
    }

    fn close_session(&self, user: &User, code: ErrorCode) {
        if let Some(mb) = user.attached.load_full() {
            mb.close(code);
            self.wake(&mb);
        }
    }

    /// The user a token authenticates, if it is known and unexpired.
    pub fn authenticate(&self, token: &str, now: u64) -> Result<Option<Arc<User>>, StoreError> {
        let Some((address, expires)) = self.store.lookup_token(&hash_token(token))? else {
            return Ok(None);
        };
        if expires != 0 && expires <= now {
            return Ok(None);
        }
        Ok(self.user(&address))
    }

    /// The group with this name, if it exists.
    pub fn group(&self, name: &str) -> Option<Arc<Group>> {
        self.groups.pin().get(name).cloned()
    }

    /// A new key for a shared group message record.
    pub fn next_msgno(&self) -> u64 {
        self.next_msgno.fetch_add(1, Ordering::Relaxed)
    }

    /// Creates or replaces a group. Returns whether it is new.
    pub fn put_group(&self, name: &str, members: Vec<MemberSpec>) -> Result<bool, GroupError> {
        if !crate::wire::is_valid_address(name) {
            return Err(GroupError::InvalidName);
        }
        let _admin = self.group_admin.lock().unwrap_or_else(|e| e.into_inner());
        let created = self.group(name).is_none();
        self.store_group(name, members)?;
        Ok(created)
    }

    /// Adds (or updates) and removes members of an existing group.
    pub fn change_members(
        &self,
        name: &str,
        add: Vec<MemberSpec>,
        remove: &[String],
    ) -> Result<Arc<Group>, GroupError> {
        let _admin = self.group_admin.lock().unwrap_or_else(|e| e.into_inner());
        let group = self.group(name).ok_or(GroupError::NotFound)?;
        let mut members: Vec<MemberSpec> = group
            .members
            .iter()
            .filter(|m| !remove.iter().any(|r| *r == *m.user.address))
            .filter(|m| !add.iter().any(|a| *a.address == *m.user.address))
            .map(|m| MemberSpec {
                address: m.user.address.to_string(),
                send: m.send,
                recv: m.recv,
            })
            .collect();
        members.extend(add);
        self.store_group(name, members)
    }

    /// Deletes a group; `false` if there was none. Accepted items stay
    /// deliverable: they hold their own copy of what they need.
    pub fn delete_group(&self, name: &str) -> Result<bool, GroupError> {
        let _admin = self.group_admin.lock().unwrap_or_else(|e| e.into_inner());
        if self.group(name).is_none() {
            return Ok(false);
        }
        self.store.delete_group(name)?;
        self.groups.pin().remove(name);
        Ok(true)
    }

    /// Validates, writes and publishes a membership (caller holds `group_admin`).
    fn store_group(&self, name: &str, specs: Vec<MemberSpec>) -> Result<Arc<Group>, GroupError> {
        let mut members: Vec<Member> = Vec::with_capacity(specs.len());
        for spec in specs {
            let user = self
                .user(&spec.address)
                .ok_or_else(|| GroupError::UnknownUser(spec.address.clone()))?;
            members.push(Member {
                user,
                send: spec.send,
                recv: spec.recv,
            });
        }
        members.sort_by(|a, b| a.user.address.cmp(&b.user.address));
        // A member named twice: the last mention wins.
        members.reverse();
        members.dedup_by(|a, b| a.user.address == b.user.address);
        members.reverse();
        if members.len() > self.config.max_group_size {
            return Err(GroupError::TooLarge(self.config.max_group_size));
        }
        let records: Vec<(String, u8)> = members
            .iter()
            .map(|m| {
                let perms = if m.send {
                    crate::store::keys::PERM_SEND
                } else {
                    0
                } | if m.recv {
                    crate::store::keys::PERM_RECV
                } else {
                    0
                };
                (m.user.address.to_string(), perms)
            })
            .collect();
        self.store.put_group(name, &records, now_ms())?;
        let name: Arc<str> = name.into();
        let group = Arc::new(Group {
            name: name.clone(),
            members,
        });
        self.groups.pin().insert(name, group.clone());
        Ok(group)
    }

    /// Posts a notice to an event loop.
    pub fn post(&self, worker: usize, notice: Notice) {
        if let Some(w) = self.workers.get().and_then(|ws| ws.get(worker)) {
            w.post(notice);
        }
    }

    /// Wakes the owner of a mailbox (once per burst).
    pub fn wake(&self, mailbox: &Mailbox) {
        if mailbox.claim_wake() {
            self.post(mailbox.owner.worker, Notice::Mailbox(mailbox.owner));
        }
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves to a new phase.
    pub fn set_phase(&self, phase: Phase) {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner()) = phase;
    }
}

/// A fresh random token: 256 bits, hex.
pub fn new_token() -> String {
    let bytes: [u8; 32] = rand::random();
    hex::encode(bytes)
}
