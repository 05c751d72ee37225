//! The directory: every user and group the server knows, in memory, and
//! the per-user delivery state shared by the threads that deliver to them.
//!
//! The routing path (a SEND naming a user) reads a lock-free `papaya` map from
//! address to [`User`], and the user's `attached` mailbox (an `ArcSwap`): no
//! lock is taken between a sender's event loop and the recipient's. Groups
//! are immutable snapshots, replaced whole by the admin API.
//!
//! The directory is pure memory: loading it from the store and writing
//! changes back is the caller's business (`server` at start-up, `admin`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwapOption;
use foldhash::{HashMap, HashMapExt};
use sha2::{Digest, Sha256};

use crate::clock::now_ms;
use crate::mailbox::Mailbox;
use crate::store::keys::{PERM_RECV, PERM_SEND};
use crate::store::{Item, Store, StoreError};

/// Bits of a SEQ below the boot counter: each boot owns `boot << 40 ..`.
pub const SEQ_BOOT_SHIFT: u32 = 40;

/// How far past a removed user's last SEQ a user created again under the
/// same address (in the same boot) starts: room for the SEQs the commit
/// thread may still hand out to requests for the removed one that were
/// queued before it went (the commit queue holds far fewer). An inbox key
/// is written at most once (the store settles items with SingleDelete,
/// which needs that). A boot's 2^40 SEQs per address thus allow about a
/// million re-creations of one address per boot.
const RETIRED_SEQ_GAP: u64 = 1 << 20;

/// SHA-256 of a token: the only form in which tokens are stored.
pub fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// One item an ACK settles.
#[derive(Clone, Debug)]
pub struct Acked {
    pub seq: u64,
    /// Where the item sits in the inbox (the key needs it).
    pub priority: u8,
    /// The item as its session wrote it ([`Inflight::item`]): the commit
    /// thread settles from it rather than look the item up again, where it
    /// can prove it is still what the store has (`commit::settle::known`),
    /// and a held share's bitmap says whether it is still held.
    pub item: Option<Arc<Item>>,
}

/// A stored item written to the user and not yet ACKed.
#[derive(Clone, Debug)]
pub struct Inflight {
    /// Where the item sits in the inbox (the key needs it).
    pub priority: u8,
    /// The client ACKed it, and the ACK is at the commit thread or kept
    /// for a retry (`User::unsent_acks`): repeated ACKs are not resent, and
    /// a new connection does not write the item again.
    pub acking: bool,
    /// When its MSG was written, `clock::mono_us` (0: not timed): for the
    /// ACK stage histogram.
    pub written_us: u64,
    /// The item as last written, for its ACK (see `Item::settle_hint`).
    pub item: Option<Arc<Item>>,
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
    /// Settlements of this user's items other than by an ACK (expiry,
    /// deletion), and settlements whose write failed, counted by the commit
    /// syncer's completions, in order with its pushes: after one, an item
    /// handed to the mailbox before it may be gone from the store, so its
    /// ACK reads it back (`Item::settle_hint`).
    pub other_settles: AtomicU64,
    /// READs of this user at the commit thread (`commit::ReadTicket`).
    pub reads_queued: AtomicUsize,
    /// Set when the user is deleted; sessions and sends stop seeing it.
    pub deleted: AtomicBool,
    /// Shares of group sends held in memory only, by (priority, SEQ): the
    /// user was online when the send was written, so no REF was stored
    /// for them; the send's `held` bitmap (`store::record::encode_refs`)
    /// records them, and the store writes their REFs at the next start
    /// (`Store::store_held_shares`). Inserted by the commit syncer before
    /// the item is pushed, so an inbox scan sees them as if stored; removed
    /// when settled. See `commit::send` for the rules.
    shares: Mutex<BTreeMap<(u8, u64), Arc<Item>>>,
    /// `shares.len()`, read without the lock.
    held: AtomicUsize,
    /// The highest SEQ of this user whose item is visible everywhere an
    /// inbox scan looks: its batch is written and synced and, if held, it is
    /// in `shares`. The commit syncer raises it for each item, in SEQ order,
    /// before offering the item to the mailbox; a scan takes only items
    /// up to it (see [`merge_scan`]); after a store reopen, to everything
    /// (`commit::resync`). SeqCst, raised and read: the scan that misses a
    /// raise must be sure that the push after it sees its mailbox.
    pub visible: AtomicU64,
    /// ACKs the commit queue refused (it was full), each of an in-flight
    /// entry marked `acking`: offered again by whichever session of the
    /// user runs next, so that they outlive the connection that got them
    /// (the marks do: a new connection's ACKs of those items are not sent
    /// again). Bounded by the window, like the marks.
    unsent_acks: Mutex<Vec<Acked>>,
    /// `unsent_acks` is not empty; read without the lock.
    has_unsent_acks: AtomicBool,
    /// When ACKs whose write failed may be offered again, ms
    /// ([`User::ack_failed`]); 0: at once.
    ack_retry_at: AtomicU64,
    /// What the user's real-time group sends may still reach
    /// ([`User::realtime_reach`]): the user's, not a connection's, so a
    /// reconnect does not refill it.
    reach: Mutex<Reach>,
}

/// Group members one user's real-time group sends may reach per second,
/// and at once. Each is a look-up in an event loop (and, if online, an
/// item), which a SEND of a few bytes costs its sender nothing to ask for:
/// without a bound, a member of a large group could hold a loop for
/// seconds with one read's worth of sends. Past it, OVERLOADED.
pub const REALTIME_REACH_PER_SEC: i64 = 1_000_000;

/// A budget of real-time group reach: a token bucket holding at most
/// [`REALTIME_REACH_PER_SEC`], refilled at that rate. A group larger than
/// the whole budget may be sent to when the budget is full, and leaves it
/// in debt, so the rate holds for any group size.
#[derive(Debug)]
pub struct Reach {
    tokens: i64,
    /// When it was last refilled, ms.
    at: u64,
}

impl Default for Reach {
    fn default() -> Reach {
        Reach {
            tokens: REALTIME_REACH_PER_SEC,
            at: 0,
        }
    }
}

impl Reach {
    /// Takes `n` at `now` (ms) if there is that much (or the whole budget,
    /// for more); whether it could. A clock stepped back refills nothing
    /// for that call, and counts on from the new time.
    pub fn take(&mut self, n: u64, now: u64) -> bool {
        const PER_MS: i64 = REALTIME_REACH_PER_SEC / 1000;
        // Capped so that the cast cannot wrap (the arithmetic saturates).
        let elapsed = now.saturating_sub(self.at).min(1 << 40) as i64;
        self.at = now;
        self.tokens = self
            .tokens
            .saturating_add(elapsed.saturating_mul(PER_MS))
            .min(REALTIME_REACH_PER_SEC);
        let n = i64::try_from(n).unwrap_or(i64::MAX);
        if self.tokens < n.min(REALTIME_REACH_PER_SEC) {
            return false;
        }
        self.tokens = self.tokens.saturating_sub(n);
        true
    }
}

/// How long an ACK whose write failed waits before it is offered again, ms:
/// a store that failed a write refuses the next ones until it is reopened
/// (tried once a second), so an earlier retry would fail again.
pub const ACK_RETRY_MS: u64 = 1000;

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
            other_settles: AtomicU64::new(0),
            reads_queued: AtomicUsize::new(0),
            deleted: AtomicBool::new(false),
            shares: Mutex::new(BTreeMap::new()),
            held: AtomicUsize::new(0),
            // Everything stored before this boot.
            visible: AtomicU64::new(boot << SEQ_BOOT_SHIFT),
            unsent_acks: Mutex::new(Vec::new()),
            has_unsent_acks: AtomicBool::new(false),
            ack_retry_at: AtomicU64::new(0),
            reach: Mutex::new(Reach::default()),
        }
    }

    /// Takes the ACKs the commit queue refused, to offer them again.
    pub fn take_unsent_acks(&self) -> Vec<Acked> {
        if !self.has_unsent_acks() {
            return Vec::new();
        }
        let mut unsent = self.unsent_acks.lock().unwrap_or_else(|e| e.into_inner());
        self.has_unsent_acks.store(false, Ordering::Release);
        std::mem::take(&mut *unsent)
    }

    /// Keeps ACKs the commit queue refused, for the next offer.
    pub fn keep_unsent_acks(&self, acks: Vec<Acked>) {
        if acks.is_empty() {
            return;
        }
        let mut unsent = self.unsent_acks.lock().unwrap_or_else(|e| e.into_inner());
        unsent.extend(acks);
        self.has_unsent_acks.store(true, Ordering::Release);
    }

    /// Whether ACKs refused by the commit queue wait to be offered again.
    pub fn has_unsent_acks(&self) -> bool {
        self.has_unsent_acks.load(Ordering::Acquire)
    }

    fn shares(&self) -> std::sync::MutexGuard<'_, BTreeMap<(u8, u64), Arc<Item>>> {
        self.shares.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Shares held in memory for this user.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Holds a share (an item with `group_ref.held`) in memory; whether it
    /// is new. (The directory's [`Directory::hold`] also counts it.)
    fn hold(&self, item: Arc<Item>) -> bool {
        let new = self
            .shares()
            .insert((item.priority, item.seq), item)
            .is_none();
        if new {
            self.held.fetch_add(1, Ordering::Relaxed);
        }
        new
    }

    /// Forgets a held share; the share, if it was held.
    fn unhold(&self, priority: u8, seq: u64) -> Option<Arc<Item>> {
        let gone = self.shares().remove(&(priority, seq));
        if gone.is_some() {
            self.held.fetch_sub(1, Ordering::Relaxed);
        }
        gone
    }

    /// The held share at (priority, SEQ), if any.
    pub fn share(&self, priority: u8, seq: u64) -> Option<Arc<Item>> {
        if self.held() == 0 {
            return None;
        }
        self.shares().get(&(priority, seq)).cloned()
    }

    /// Held shares past `cursors[p]` for each priority `p`, in (priority,
    /// SEQ) order (every one, with `cursors` all 0).
    pub fn shares_after(&self, cursors: &[u64]) -> Vec<Arc<Item>> {
        if self.held() == 0 {
            return Vec::new();
        }
        let shares = self.shares();
        let mut out = Vec::new();
        for (p, &cursor) in cursors.iter().enumerate() {
            let Ok(p) = u8::try_from(p) else { break };
            let Some(from) = cursor.checked_add(1) else {
                continue;
            };
            out.extend(
                shares
                    .range((p, from)..=(p, u64::MAX))
                    .map(|(_, i)| i.clone()),
            );
        }
        out
    }

    /// The last SEQ handed out (or below the first of this boot).
    pub fn last_seq(&self) -> u64 {
        self.next_seq.load(Ordering::SeqCst) - 1
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

    /// An in-flight item was settled: forgets it, and wakes the user's
    /// connection if it waits for a window slot (after the removal, under
    /// the lock the session counts its window with).
    pub fn settled(&self, seq: u64) -> Option<Inflight> {
        let entry = self.inflight().remove(&seq);
        if let Some(mb) = self.mailbox() {
            mb.slot_freed();
        }
        entry
    }

    /// The write of an ACK of the in-flight item `seq` failed (its request
    /// was rolled back, or its batch not written): the item is still
    /// queued, and the client did ACK it. The ACK is kept, and the user's
    /// connection, or the next one, offers it again after
    /// [`ACK_RETRY_MS`] after `now` (ms). Its entry stays marked `acking`,
    /// so the item is not written to the client again.
    pub fn ack_failed(&self, seq: u64, now: u64) {
        let acked = {
            let inflight = self.inflight();
            let Some(entry) = inflight.get(&seq).filter(|e| e.acking) else {
                return; // settled meanwhile
            };
            Acked {
                seq,
                priority: entry.priority,
                item: entry.item.clone(),
            }
        };
        self.ack_retry_at
            .store(now + ACK_RETRY_MS, Ordering::Relaxed);
        self.keep_unsent_acks(vec![acked]);
        if let Some(mb) = self.mailbox() {
            mb.wake(); // so that its connection sets its timer
        }
    }

    /// Takes `n` group members from the user's real-time reach budget at
    /// `now` (ms); whether there were that many ([`Reach::take`]).
    pub fn realtime_reach(&self, n: u64, now: u64) -> bool {
        let mut reach = self.reach.lock().unwrap_or_else(|e| e.into_inner());
        reach.take(n, now)
    }

    /// When ACKs kept after a failed write may be offered again, ms.
    pub fn ack_retry_at(&self) -> u64 {
        self.ack_retry_at.load(Ordering::Relaxed)
    }

    /// The connected session's mailbox, if the user is online.
    pub fn mailbox(&self) -> Option<Arc<Mailbox>> {
        self.attached.load_full().filter(|mb| mb.closed().is_none())
    }
}

/// Up to `budget` queued items of `user` past `cursors`, in (priority, SEQ)
/// order, stored or held (see [`merge_scan`]), and whether none was left
/// out.
pub fn scan_inbox(
    store: &Store,
    user: &User,
    cursors: &[u64; crate::store::keys::PRIORITIES],
    budget: usize,
) -> Result<(Vec<Arc<Item>>, bool), StoreError> {
    // Before the scan: see `merge_scan`.
    let visible = user.visible.load(Ordering::SeqCst);
    let scanned = store.scan_inbox(&user.address, cursors, budget)?;
    let held = user.shares_after(cursors);
    Ok(merge_scan(scanned, held, budget, visible))
}

/// What holding a share whose MSG record is `record` costs in memory,
/// counted as if the record were its own (it is shared by the send's
/// members: an overestimate, so `held_bytes` bounds the memory): the
/// record and the item with its map entry.
pub fn held_cost(record: &[u8]) -> usize {
    record.len() + 160
}

/// Merges an inbox scan of the store (`scanned`, and whether it reached the
/// end) with the user's held shares past the same cursors (`held`, from
/// [`User::shares_after`]), both in (priority, SEQ) order: at most `budget`
/// items, in that order, and whether nothing past the cursors was left out.
///
/// Only items up to `visible` (the user's [`User::visible`], read before
/// the store scan began) are taken. Each later one is offered to the
/// mailbox after that read, so the session finds it there; and a stored
/// item later than it may be in the scan while a share held in the same
/// batch, with a lower SEQ, is not in `shares` yet: taking the one would
/// move the cursor past the other.
///
/// A scan cut short by its budget ends at its last item: held shares after
/// it wait for the next scan, or a cursor would pass stored items not taken.
pub fn merge_scan(
    scanned: (Vec<Arc<Item>>, bool),
    held: Vec<Arc<Item>>,
    budget: usize,
    visible: u64,
) -> (Vec<Arc<Item>>, bool) {
    let (mut stored, mut done) = scanned;
    let key = |i: &Arc<Item>| (i.priority, i.seq);
    let limit = if done { None } else { stored.last().map(key) };
    stored.retain(|i| i.seq <= visible);
    if held.is_empty() {
        return (stored, done);
    }
    let mut out = Vec::with_capacity(stored.len() + held.len());
    let mut held = held.into_iter().filter(|i| i.seq <= visible).peekable();
    for item in stored {
        while let Some(h) = held.next_if(|h| key(h) < key(&item)) {
            out.push(h);
        }
        if held.peek().is_some_and(|h| key(h) == key(&item)) {
            held.next(); // its REF was written meanwhile: the same item
        }
        out.push(item);
    }
    for h in held {
        if limit.is_some_and(|l| key(&h) > l) {
            done = false;
            break;
        }
        out.push(h);
    }
    if out.len() > budget {
        out.truncate(budget);
        done = false;
    }
    (out, done)
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
    /// Who gets a message `sender` sends to the group: the members with
    /// `recv`, less the sender and members being deleted.
    pub fn recipients<'a>(&'a self, sender: &'a Arc<User>) -> impl Iterator<Item = &'a Arc<User>> {
        self.members
            .iter()
            .filter(move |m| {
                m.recv && !Arc::ptr_eq(&m.user, sender) && !m.user.deleted.load(Ordering::Acquire)
            })
            .map(|m| &m.user)
    }

    /// The membership of `address`, if any.
    pub fn member(&self, address: &str) -> Option<&Member> {
        self.members
            .binary_search_by(|m| (*m.user.address).cmp(address))
            .ok()
            .map(|i| &self.members[i])
    }
}

/// Every user and group, and the counters that must be unique per boot.
pub struct Directory {
    /// address → user; every stored user is here.
    users: papaya::HashMap<Arc<str>, Arc<User>, foldhash::fast::RandomState>,
    /// name → group; every stored group is here.
    groups: papaya::HashMap<Arc<str>, Arc<Group>, foldhash::fast::RandomState>,
    /// Next key of a shared group message record; starts at `boot << 40`.
    next_msgno: AtomicU64,
    /// This boot's number (see [`SEQ_BOOT_SHIFT`]).
    pub boot: u64,
    /// address → the first SEQ of a user created again under the address
    /// of one removed in this boot (see [`RETIRED_SEQ_GAP`]).
    retired: Mutex<HashMap<Arc<str>, u64>>,
    /// Group shares held in memory, all users together ([`Directory::hold`]).
    pub held: AtomicUsize,
    /// Their cost, bytes ([`held_cost`]): what `commit::send::HELD_MAX_BYTES`
    /// bounds, with `held_pending`.
    pub held_bytes: AtomicUsize,
    /// The cost of shares that batches built but not yet completed will
    /// hold (the commit thread counts them in, a completion out, written
    /// or not).
    pub held_pending: AtomicUsize,
}

impl Directory {
    /// An empty directory for boot `boot`.
    pub fn new(boot: u64) -> Directory {
        Directory {
            users: papaya::HashMap::with_hasher(Default::default()),
            groups: papaya::HashMap::with_hasher(Default::default()),
            next_msgno: AtomicU64::new(boot << SEQ_BOOT_SHIFT),
            boot,
            retired: Mutex::new(HashMap::new()),
            held: AtomicUsize::new(0),
            held_bytes: AtomicUsize::new(0),
            held_pending: AtomicUsize::new(0),
        }
    }

    /// Holds `item`, a share of a group send, in `user`'s memory and counts
    /// it. Also for a user deleted since the send was built: the purge that
    /// follows its deletion settles what it holds.
    pub fn hold(&self, user: &User, item: Arc<Item>) {
        let cost = held_cost(&item.record);
        if user.hold(item) {
            self.held.fetch_add(1, Ordering::Relaxed);
            self.held_bytes.fetch_add(cost, Ordering::Relaxed);
        }
    }

    /// Forgets a held share of `user`, if held.
    pub fn unhold(&self, user: &User, priority: u8, seq: u64) {
        if let Some(item) = user.unhold(priority, seq) {
            self.held.fetch_sub(1, Ordering::Relaxed);
            self.held_bytes
                .fetch_sub(held_cost(&item.record), Ordering::Relaxed);
        }
    }

    /// Loads every user (with its queued count) and group from the store.
    pub fn load(store: &Store, boot: u64) -> Result<Directory, StoreError> {
        let dir = Directory::new(boot);
        let counts = store.count_inbox()?;
        for rec in store.load_users()? {
            let mut user = User::new(&rec.address, rec.name, boot);
            user.created_ms = rec.created_ms;
            let queued = counts.get(&rec.address).copied().unwrap_or(0);
            user.queued.store(queued, Ordering::Relaxed);
            dir.insert_user(Arc::new(user));
        }
        for (name, members) in store.load_groups()? {
            let members = members
                .into_iter()
                .filter_map(|(address, perms)| {
                    Some(Member {
                        user: dir.user(&address)?,
                        send: perms & PERM_SEND != 0,
                        recv: perms & PERM_RECV != 0,
                    })
                })
                .collect();
            dir.publish_group(name.into(), members);
        }
        Ok(dir)
    }

    /// The user with this address, if it exists and is not deleted.
    pub fn user(&self, address: &str) -> Option<Arc<User>> {
        self.users
            .pin()
            .get(address)
            .filter(|u| !u.deleted.load(Ordering::Acquire))
            .cloned()
    }

    /// The user with this address, even one being deleted (the commit
    /// thread settles a deleted user's items).
    pub fn any_user(&self, address: &str) -> Option<Arc<User>> {
        self.users.pin().get(address).cloned()
    }

    /// Adds (or replaces) a user.
    pub fn insert_user(&self, user: Arc<User>) {
        self.users.pin().insert(user.address.clone(), user);
    }

    /// Every user.
    pub fn users(&self) -> Vec<Arc<User>> {
        self.users.pin().values().cloned().collect()
    }

    /// Items queued in the store for all users.
    pub fn queued_total(&self) -> u64 {
        let users = self.users.pin();
        users
            .iter()
            .map(|(_, u)| u.queued.load(Ordering::Relaxed))
            .sum()
    }

    /// Forgets a user.
    pub fn remove_user(&self, address: &str) {
        if let Some(old) = self.users.pin().remove(address) {
            let next = old.next_seq.load(Ordering::Relaxed) + RETIRED_SEQ_GAP;
            let mut retired = self.retired.lock().unwrap_or_else(|e| e.into_inner());
            retired.insert(old.address.clone(), next);
        }
    }

    /// A new user of this boot: its SEQs start after those of any user
    /// removed under the same address in this boot, whose items may
    /// still be stored (`remove_user`).
    pub fn new_user(&self, address: &str, name: String) -> Arc<User> {
        let user = User::new(address, name, self.boot);
        let retired = self.retired.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&next) = retired.get(address) {
            user.next_seq.fetch_max(next, Ordering::Relaxed);
            user.visible.fetch_max(next - 1, Ordering::Relaxed);
        }
        Arc::new(user)
    }

    /// The group with this name, if it exists.
    pub fn group(&self, name: &str) -> Option<Arc<Group>> {
        self.groups.pin().get(name).cloned()
    }

    /// The names of the groups `address` is a member of.
    pub fn groups_of(&self, address: &str) -> Vec<Arc<str>> {
        self.groups
            .pin()
            .iter()
            .filter(|(_, g)| g.member(address).is_some())
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Publishes a group snapshot (members normalized by [`normalize`]).
    pub fn publish_group(&self, name: Arc<str>, members: Vec<Member>) -> Arc<Group> {
        let group = Arc::new(Group {
            name: name.clone(),
            members: normalize(members),
        });
        self.groups.pin().insert(name, group.clone());
        group
    }

    /// Forgets a group.
    pub fn remove_group(&self, name: &str) {
        self.groups.pin().remove(name);
    }

    /// A new key for a shared group message record.
    pub fn next_msgno(&self) -> u64 {
        self.next_msgno.fetch_add(1, Ordering::Relaxed)
    }

    /// The user a token authenticates, if it is known and unexpired.
    pub fn authenticate(
        &self,
        store: &Store,
        token: &str,
        now: u64,
    ) -> Result<Option<Arc<User>>, StoreError> {
        let Some((address, expires)) = store.lookup_token(&hash_token(token))? else {
            return Ok(None);
        };
        if expires != 0 && expires <= now {
            return Ok(None);
        }
        Ok(self.user(&address))
    }
}

/// Members in address order (what [`Group::member`] searches), a member
/// named twice keeping its last mention.
pub fn normalize(mut members: Vec<Member>) -> Vec<Member> {
    members.reverse();
    // A stable sort keeps the last mention first among equals.
    members.sort_by(|a, b| a.user.address.cmp(&b.user.address));
    members.dedup_by(|a, b| a.user.address == b.user.address);
    members
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(keys: &[(u8, u64)]) -> Vec<Arc<Item>> {
        keys.iter()
            .map(|&(p, seq)| Arc::new(Item::held(seq, p, Arc::from(&[][..]), 1, 0)))
            .collect()
    }

    fn keys(items: &[Arc<Item>]) -> Vec<(u8, u64)> {
        items.iter().map(|i| (i.priority, i.seq)).collect()
    }

    #[test]
    fn a_scan_merges_held_shares_in_delivery_order_within_its_budget() {
        // Done: everything, in (priority, SEQ) order; a share whose REF
        // was written meanwhile (0, 5) comes once.
        let stored = items(&[(0, 2), (0, 5), (3, 1)]);
        let held = items(&[(0, 1), (0, 5), (0, 7), (9, 1)]);
        let (out, done) = merge_scan((stored.clone(), true), held.clone(), 10, u64::MAX);
        assert_eq!(keys(&out), [(0, 1), (0, 2), (0, 5), (0, 7), (3, 1), (9, 1)]);
        assert!(done);
        // Cut short at (0, 5): nothing held after it, or the cursors would
        // pass (3, 1), which is not taken yet.
        let (out, done) = merge_scan((stored[..2].to_vec(), false), held.clone(), 2, u64::MAX);
        assert_eq!(keys(&out), [(0, 1), (0, 2)]);
        assert!(!done);
        let (out, done) = merge_scan((stored[..2].to_vec(), false), held.clone(), 3, u64::MAX);
        assert_eq!(keys(&out), [(0, 1), (0, 2), (0, 5)]);
        assert!(!done);
        // The held shares alone push it over the budget.
        let (out, done) = merge_scan((Vec::new(), true), held.clone(), 3, u64::MAX);
        assert_eq!(keys(&out), [(0, 1), (0, 5), (0, 7)]);
        assert!(!done);
        let (out, done) = merge_scan((stored.clone(), true), Vec::new(), 3, u64::MAX);
        assert_eq!(keys(&out), [(0, 2), (0, 5), (3, 1)]);
        assert!(done);
        // Nothing past `visible`, stored or held: the mailbox has those.
        let (out, done) = merge_scan((stored.clone(), true), held.clone(), 10, 4);
        assert_eq!(keys(&out), [(0, 1), (0, 2), (3, 1), (9, 1)]);
        assert!(done);
        let (out, done) = merge_scan((stored, true), Vec::new(), 10, 1);
        assert_eq!(keys(&out), [(3, 1)]);
        assert!(done);
    }

    #[test]
    fn held_shares_are_taken_past_the_cursors_and_counted() {
        let dir = Directory::new(1);
        let u = dir.new_user("u", String::new());
        for (p, seq) in [(0, 1), (0, 4), (2, 3), (15, 9)] {
            dir.hold(&u, items(&[(p, seq)]).remove(0));
        }
        dir.hold(&u, items(&[(0, 4)]).remove(0)); // held once
        assert_eq!((u.held(), dir.held.load(Ordering::Relaxed)), (4, 4));
        assert_eq!(dir.held_bytes.load(Ordering::Relaxed), 4 * 160);
        let mut cursors = [0u64; 16];
        cursors[0] = 1;
        cursors[15] = u64::MAX;
        assert_eq!(keys(&u.shares_after(&cursors)), [(0, 4), (2, 3)]);
        dir.unhold(&u, 0, 4);
        dir.unhold(&u, 0, 4);
        assert_eq!((u.held(), dir.held.load(Ordering::Relaxed)), (3, 3));
        assert_eq!(dir.held_bytes.load(Ordering::Relaxed), 3 * 160);
        assert!(u.share(2, 3).is_some() && u.share(0, 4).is_none());
    }

    fn member(dir: &Directory, address: &str, send: bool) -> Member {
        Member {
            user: dir.user(address).unwrap(),
            send,
            recv: true,
        }
    }

    /// A user removed and created again in the same boot never gets a SEQ
    /// the removed one had, nor one it may still be handed: an inbox key
    /// is written at most once.
    #[test]
    fn a_user_created_again_does_not_reuse_a_seq() {
        let dir = Directory::new(3);
        dir.insert_user(dir.new_user("a", String::new()));
        let old = dir.user("a").unwrap();
        let mut last = 0;
        for _ in 0..5 {
            last = old.next_seq();
        }
        dir.remove_user("a");
        let late = old.next_seq(); // a request queued before the removal
        dir.insert_user(dir.new_user("a", String::new()));
        let first = dir.user("a").unwrap().next_seq();
        assert!(first > late && first > last, "{first} after {late}");
        assert_eq!(first >> SEQ_BOOT_SHIFT, 3, "still this boot's SEQs");
        let fresh = dir.new_user("b", String::new()).next_seq();
        assert_eq!(fresh, (3 << SEQ_BOOT_SHIFT) | 1);
    }

    #[test]
    fn groups_are_in_address_order_and_the_last_mention_wins() {
        let dir = Directory::new(1);
        for a in ["bb", "a", "c"] {
            dir.insert_user(Arc::new(User::new(a, String::new(), 1)));
        }
        let members = vec![
            member(&dir, "c", true),
            member(&dir, "a", true),
            member(&dir, "bb", true),
            member(&dir, "a", false),
        ];
        let g = dir.publish_group("g".into(), members);
        let order: Vec<&str> = g.members.iter().map(|m| &*m.user.address).collect();
        assert_eq!(order, ["a", "bb", "c"]);
        assert!(!g.member("a").unwrap().send);
        assert!(g.member("bb").is_some() && g.member("b").is_none());
        assert_eq!(dir.groups_of("a"), vec![Arc::<str>::from("g")]);
    }

    /// The reach budget: a full second's worth at once, refilled at its
    /// rate; a send larger than the budget leaves a debt that holds the
    /// rate; a clock stepped back refills nothing, and does not freeze it.
    #[test]
    fn the_realtime_reach_budget_holds_its_rate() {
        let full = REALTIME_REACH_PER_SEC as u64;
        let mut r = Reach::default();
        assert!(r.take(full, 10_000));
        assert!(!r.take(1, 10_000));
        assert!(r.take(1_000, 10_001));
        assert!(!r.take(1, 10_001));
        // Larger than the whole budget: once, then four seconds of debt.
        let mut r = Reach::default();
        assert!(r.take(5 * full, 0));
        assert!(!r.take(1, 1_000));
        assert!(!r.take(1, 3_999));
        assert!(r.take(1, 4_001));
        // The clock stepped back by a second.
        let mut r = Reach::default();
        assert!(r.take(full, 10_000));
        assert!(!r.take(1_000, 9_000));
        assert!(r.take(1_000, 9_001));
    }

    #[test]
    fn seqs_and_msgnos_start_at_the_boot() {
        let dir = Directory::new(3);
        let u = User::new("a", String::new(), 3);
        assert_eq!(u.next_seq(), (3 << SEQ_BOOT_SHIFT) | 1);
        assert_eq!(u.next_seq(), (3 << SEQ_BOOT_SHIFT) | 2);
        assert_eq!(dir.next_msgno(), 3 << SEQ_BOOT_SHIFT);
    }
}
