//! The only user of RocksDB: column families, keys, records, reads, and the
//! [`Batch`] the commit thread turns into one synced write.
//!
//! - [`keys`]: column families and key layouts (byte order = numeric order).
//! - [`record`]: value layouts and [`Item`], the in-memory form of a delivery.
//!
//! Reads that need no ordering (token look-ups at HELLO, inbox scans for a
//! connected user) go straight to RocksDB from the calling thread. The store
//! imports nothing from the crate but `wire`.

pub mod keys;
pub mod record;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use rocksdb::compaction_filter::Decision as CompactionDecision;
use rocksdb::{
    BlockBasedIndexType, BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor,
    LruCacheOptions, Options, ReadOptions, WriteBatch, WriteOptions, DB,
};

pub use record::{Dedup, Item, ItemView, MsgView, RefView, StatusView};

use keys::*;

/// A storage failure. RocksDB errors are not recoverable by the caller; the
/// server logs them and refuses the operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// (Displayed with its cause, and not also a `source`: error chains
    /// would print the cause twice.)
    #[error("rocksdb: {0}")]
    Rocks(rocksdb::Error),
    #[error("corrupt record in {cf}: {what}")]
    Corrupt { cf: &'static str, what: String },
    #[error("column family {0} missing")]
    MissingCf(&'static str),
    /// The database is being reopened after a fault, or could not be.
    #[error("database unavailable: reopening after a write failure")]
    Unavailable,
    /// The WAL files to be replayed could not be synced ([`sync_wal_files`]).
    #[error("syncing the WAL files before opening: {0}")]
    WalSync(std::io::Error),
    /// A fault injected by a test (see `commit`'s tests).
    #[cfg(test)]
    #[error("injected fault")]
    Injected,
}

impl From<rocksdb::Error> for StoreError {
    fn from(e: rocksdb::Error) -> Self {
        StoreError::Rocks(e)
    }
}

/// Result of a store operation.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A user as stored in the `users` column family.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UserRecord {
    /// The user's address (also the key).
    pub address: String,
    /// Display name, free text.
    #[serde(default)]
    pub name: String,
    /// Creation time, ms since the epoch.
    pub created_ms: u64,
}

/// A message listed for the admin API: (seq, priority, delivered, MSG record).
pub type Listed = (u64, u8, bool, Arc<[u8]>);

/// A stored group: its name and its (member, permission bits).
pub type GroupRecord = (String, Vec<(String, u8)>);

/// One column family's figures from RocksDB ([`Store::cf_stats`]).
#[derive(Debug, Clone, Copy)]
pub struct CfStats {
    pub name: &'static str,
    /// Bytes in its SST files.
    pub sst_bytes: u64,
    /// RocksDB's estimate of the live data in them (the rest is deleted
    /// or overwritten data that compaction has yet to drop).
    pub live_bytes: u64,
    /// Bytes compaction estimates it must rewrite to bring every level
    /// back under its target size.
    pub pending_compaction_bytes: u64,
    /// Files in level 0.
    pub l0_files: u64,
    /// Bytes in its memtables.
    pub memtable_bytes: u64,
    /// Estimated keys (counting tombstones not compacted away).
    pub keys: u64,
}

/// The open database. Cheap to share: wrap it in an `Arc`.
///
/// The RocksDB handle can be swapped: after a failed write RocksDB stays in
/// its background-error state (the C API has no `DB::Resume`), so
/// [`Store::reopen`] closes and opens it again once the fault has cleared.
/// Every operation clones the handle out of a lock held for nanoseconds, so
/// reopening waits only for the operations in progress.
pub struct Store {
    /// Where the database lives.
    dir: PathBuf,
    /// RocksDB with the column families of [`keys::ALL_CFS`]; `None` while
    /// reopening, or after a reopen failed (every operation then fails with
    /// [`StoreError::Unavailable`] until the next attempt succeeds).
    db: RwLock<Option<Arc<DB>>>,
    /// Why the last synced write failed, while it is not recovered.
    fault: Mutex<Option<String>>,
    /// Free space below which new messages are refused (0: no reserve).
    min_free: AtomicU64,
    /// Free bytes at the last [`Store::check_space`].
    free: AtomicU64,
    /// Whether `free < min_free` at the last check.
    low: AtomicBool,
    /// The earliest due time (ms) of the expiry-index entries written since
    /// the sweeper last asked ([`Store::take_expiry_floor`]); `u64::MAX`:
    /// none. The sweeper resumes after the last key it handed over, and
    /// this tells it when an entry was written behind that point.
    expiry_floor: AtomicU64,
    /// The due time (ms) of the first entry the expiry sweep last found
    /// due; `u64::MAX`: it found none ([`Store::expiry_lag`]).
    earliest_due: AtomicU64,
    /// When the oldest write not known to be synced was made
    /// (`clock::mono_us`); 0: every write is synced.
    unsynced_since: AtomicU64,
    /// Added to the age of unsynced writes ([`Store::age_unsynced`]), µs.
    #[cfg(test)]
    unsynced_aged: AtomicU64,
}

impl Store {
    /// Opens (or creates) the database under `dir`.
    pub fn open(dir: &Path) -> Result<Store> {
        let db = open_db(dir)?;
        Ok(Store {
            dir: dir.to_owned(),
            db: RwLock::new(Some(Arc::new(db))),
            fault: Mutex::new(None),
            min_free: AtomicU64::new(0),
            free: AtomicU64::new(u64::MAX),
            low: AtomicBool::new(false),
            expiry_floor: AtomicU64::new(u64::MAX),
            earliest_due: AtomicU64::new(u64::MAX),
            unsynced_since: AtomicU64::new(0),
            #[cfg(test)]
            unsynced_aged: AtomicU64::new(0),
        })
    }

    /// The earliest due time of the expiry-index entries written since the
    /// last call, if any were.
    pub fn take_expiry_floor(&self) -> Option<u64> {
        Some(self.expiry_floor.swap(u64::MAX, Ordering::AcqRel)).filter(|&t| t != u64::MAX)
    }

    /// Sets the free-space reserve (`min_free_space`), in bytes.
    pub fn set_min_free_space(&self, bytes: u64) {
        self.min_free.store(bytes, Ordering::Relaxed);
    }

    /// The free-space reserve (`min_free_space`), in bytes.
    pub fn min_free_space(&self) -> u64 {
        self.min_free.load(Ordering::Relaxed)
    }

    /// Measures the free space and returns whether it is below the reserve.
    /// A failed measurement keeps the last verdict.
    pub fn check_space(&self) -> bool {
        if let Ok(free) = self.free_space() {
            self.free.store(free, Ordering::Relaxed);
            let low = free < self.min_free.load(Ordering::Relaxed);
            self.low.store(low, Ordering::Relaxed);
        }
        self.space_low()
    }

    /// Whether the free space was below the reserve at the last check: new
    /// messages are refused then.
    pub fn space_low(&self) -> bool {
        self.low.load(Ordering::Relaxed)
    }

    /// `Ok` when the store takes writes; else why not, for `/readyz` and logs.
    pub fn health(&self) -> std::result::Result<(), String> {
        if let Some(fault) = self.fault() {
            return Err(format!("store write failed: {fault}"));
        }
        if self.space_low() {
            return Err(format!(
                "disk space low: {} bytes free on {}, min_free_space is {}",
                self.free.load(Ordering::Relaxed),
                self.dir.display(),
                self.min_free.load(Ordering::Relaxed)
            ));
        }
        Ok(())
    }

    /// The open handle, or [`StoreError::Unavailable`] while it is being reopened.
    fn db(&self) -> Result<Arc<DB>> {
        self.db
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or(StoreError::Unavailable)
    }

    /// Writes a batch; with `sync`, returns only once it is on stable storage.
    /// A failure is remembered as the store's fault (see [`Store::fault`]).
    fn write(&self, db: &DB, batch: WriteBatch, sync: bool) -> Result<()> {
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        db.write_opt(batch, &wo).map_err(|e| self.failed(e))
    }

    /// Remembers `e` as the store's fault (the first one counts).
    fn failed(&self, e: rocksdb::Error) -> StoreError {
        let mut fault = self.fault.lock().unwrap_or_else(|e| e.into_inner());
        if fault.is_none() {
            *fault = Some(format!("rocksdb: {e}"));
        }
        StoreError::Rocks(e)
    }

    /// Takes the database handle out (`None`: every operation then fails
    /// with [`StoreError::Unavailable`]) or puts it back; for tests of what
    /// follows a failed write.
    #[cfg(test)]
    pub(crate) fn swap_db(&self, db: Option<Arc<DB>>) -> Option<Arc<DB>> {
        let mut slot = self.db.write().unwrap_or_else(|e| e.into_inner());
        std::mem::replace(&mut *slot, db)
    }

    /// How long the oldest write not synced yet has waited; `None` when
    /// every write is synced.
    ///
    /// Only [`Batch::commit`] writes without `sync` (on the commit writer
    /// thread), and only it and [`Store::sync_wal`] move this; other
    /// threads' synced writes sync those writes too, but leave the marker:
    /// it errs on the side of one sync too many.
    pub fn unsynced_for(&self) -> Option<std::time::Duration> {
        match self.unsynced_since.load(Ordering::Acquire) {
            0 => None,
            since => {
                let now = crate::clock::mono_us();
                #[cfg(test)]
                let now = now + self.unsynced_aged.load(Ordering::Relaxed);
                Some(std::time::Duration::from_micros(now.saturating_sub(since)))
            }
        }
    }

    /// Makes every unsynced write look `by` older to
    /// [`Store::unsynced_for`] (for tests of what depends on its age).
    #[cfg(test)]
    pub(crate) fn age_unsynced(&self, by: std::time::Duration) {
        self.unsynced_aged
            .fetch_add(by.as_micros() as u64, Ordering::Relaxed);
    }

    /// Syncs the WAL if a write since the last sync was not synced. A
    /// failure is remembered as the store's fault, like a failed write's:
    /// the unsynced writes may be lost, and the store is reopened.
    pub fn sync_wal(&self) -> Result<()> {
        let since = self.unsynced_since.swap(0, Ordering::AcqRel);
        if since == 0 {
            return Ok(());
        }
        let synced = self
            .db()
            .and_then(|db| db.flush_wal(true).map_err(|e| self.failed(e)));
        if synced.is_err() {
            let _ =
                self.unsynced_since
                    .compare_exchange(0, since, Ordering::AcqRel, Ordering::Relaxed);
        }
        synced
    }

    /// Why writes fail, since the first failed write and until a
    /// [`Store::reopen`] succeeds; `None` when healthy.
    pub fn fault(&self) -> Option<String> {
        self.fault.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Closes and reopens the database, which clears RocksDB's
    /// background-error state, then proves it with a synced write. The
    /// fault stays until [`Store::recovered`]. Waits up
    /// to [`REOPEN_WAIT`] for operations holding the old handle; on any
    /// failure the fault stays and the caller tries again later.
    pub fn reopen(&self) -> Result<()> {
        let old = self.db.write().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut old) = old {
            let deadline = std::time::Instant::now() + REOPEN_WAIT;
            loop {
                match Arc::try_unwrap(old) {
                    Ok(db) => {
                        drop(db);
                        break;
                    }
                    Err(still_shared) if std::time::Instant::now() < deadline => {
                        old = still_shared;
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                    Err(still_shared) => {
                        *self.db.write().unwrap_or_else(|e| e.into_inner()) = Some(still_shared);
                        return Err(StoreError::Unavailable);
                    }
                }
            }
        }
        let db = Arc::new(open_db(&self.dir)?);
        // The boot key rewritten as it is: a synced write that proves the
        // WAL takes writes again.
        let meta = cf(&db, CF_META)?;
        let mut probe = WriteBatch::default();
        if let Some(boot) = db.get_cf(meta, META_BOOT)? {
            probe.put_cf(meta, META_BOOT, boot);
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        db.write_opt(probe, &wo)?;
        *self.db.write().unwrap_or_else(|e| e.into_inner()) = Some(db);
        Ok(())
    }

    /// After a [`Store::reopen`] and what must follow it (`commit::resync`:
    /// every session closed, so clients reconnect to a consistent store):
    /// the fault is cleared, and `/readyz` and new SENDs see a healthy store.
    pub fn recovered(&self) {
        *self.fault.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Bytes available to tern on the filesystem that holds the database.
    pub fn free_space(&self) -> std::io::Result<u64> {
        free_space(&self.dir)
    }

    /// Increments the boot counter durably and returns the new value. Each
    /// boot owns the SEQ range `boot << 40 ..`, so SEQs never repeat across
    /// restarts even for items that were never stored.
    pub fn next_boot(&self) -> Result<u64> {
        let db = self.db()?;
        let meta = cf(&db, CF_META)?;
        let boot = match db.get_cf(meta, META_BOOT)? {
            Some(v) => {
                u64::from_be_bytes(v.as_slice().try_into().map_err(|_| StoreError::Corrupt {
                    cf: CF_META,
                    what: "boot counter".into(),
                })?)
            }
            None => 0,
        } + 1;
        let mut batch = WriteBatch::default();
        batch.put_cf(meta, META_BOOT, boot.to_be_bytes());
        self.write(&db, batch, true)?;
        Ok(boot)
    }

    /// All users.
    pub fn load_users(&self) -> Result<Vec<UserRecord>> {
        let db = self.db()?;
        let cf = cf(&db, CF_USERS)?;
        let mut users = Vec::new();
        for kv in db.iterator_cf(cf, rocksdb::IteratorMode::Start) {
            let (_, v) = kv?;
            users.push(serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt {
                cf: CF_USERS,
                what: e.to_string(),
            })?);
        }
        Ok(users)
    }

    /// Stores a user record and a new token hash for it, durably.
    pub fn put_user(
        &self,
        user: &UserRecord,
        token_hash: &[u8; 32],
        expires_ms: u64,
    ) -> Result<()> {
        let db = self.db()?;
        let users = cf(&db, CF_USERS)?;
        let tokens = cf(&db, CF_TOKENS)?;
        let mut batch = WriteBatch::default();
        let json = serde_json::to_vec(user).map_err(|e| StoreError::Corrupt {
            cf: CF_USERS,
            what: e.to_string(),
        })?;
        batch.put_cf(users, user.address.as_bytes(), json);
        let mut value = expires_ms.to_be_bytes().to_vec();
        value.extend_from_slice(user.address.as_bytes());
        batch.put_cf(tokens, token_hash, value);
        self.write(&db, batch, true)
    }

    /// Adds a token hash for an existing user, durably.
    pub fn put_token(&self, address: &str, token_hash: &[u8; 32], expires_ms: u64) -> Result<()> {
        let db = self.db()?;
        let tokens = cf(&db, CF_TOKENS)?;
        let mut value = expires_ms.to_be_bytes().to_vec();
        value.extend_from_slice(address.as_bytes());
        let mut batch = WriteBatch::default();
        batch.put_cf(tokens, token_hash, value);
        self.write(&db, batch, true)
    }

    /// Deletes every token of a user (and, with `user`, the user record),
    /// durably. Tokens are keyed by hash, so this scans them: an admin
    /// operation, not a hot path.
    pub fn revoke_tokens(&self, address: &str, user: bool) -> Result<usize> {
        let db = self.db()?;
        let tokens = cf(&db, CF_TOKENS)?;
        let mut batch = WriteBatch::default();
        let mut n = 0;
        let mut it = db.raw_iterator_cf(tokens);
        it.seek_to_first();
        while let (Some(key), Some(value)) = (it.key(), it.value()) {
            if value.get(8..) == Some(address.as_bytes()) {
                batch.delete_cf(tokens, key);
                n += 1;
            }
            it.next();
        }
        it.status()?;
        if user {
            batch.delete_cf(cf(&db, CF_USERS)?, address.as_bytes());
        }
        self.write(&db, batch, true)?;
        Ok(n)
    }

    /// The (address, expires_ms) a token hash belongs to; expires 0 = never.
    pub fn lookup_token(&self, token_hash: &[u8; 32]) -> Result<Option<(String, u64)>> {
        let db = self.db()?;
        let cf = cf(&db, CF_TOKENS)?;
        let Some(v) = db.get_pinned_cf(cf, token_hash)? else {
            return Ok(None);
        };
        if v.len() < 9 {
            return Err(StoreError::Corrupt {
                cf: CF_TOKENS,
                what: "short token record".into(),
            });
        }
        let expires = u64::from_be_bytes(v[..8].try_into().unwrap_or_default());
        let address = String::from_utf8_lossy(&v[8..]).into_owned();
        Ok(Some((address, expires)))
    }

    /// How many items each user has queued (run once at start-up).
    pub fn count_inbox(&self) -> Result<HashMap<String, u64>> {
        let db = self.db()?;
        let cf = cf(&db, CF_INBOX)?;
        let mut counts: HashMap<String, u64> = HashMap::new();
        let mut it = db.raw_iterator_cf(cf);
        it.seek_to_first();
        while let Some(key) = it.key() {
            if let Some((address, _, _)) = parse_inbox_key(key) {
                match counts.get_mut(address) {
                    Some(n) => *n += 1,
                    None => {
                        counts.insert(address.to_owned(), 1);
                    }
                }
            }
            it.next();
        }
        it.status()?;
        Ok(counts)
    }

    /// Reads queued items of one user in delivery order: priority 0 first,
    /// then by SEQ, starting after `cursors[p]` for each priority `p`, at most
    /// `budget` items. Returns the items and whether the inbox was exhausted
    /// (no more items past the cursors when the scan began).
    pub fn scan_inbox(
        &self,
        address: &str,
        cursors: &[u64; PRIORITIES],
        budget: usize,
    ) -> Result<(Vec<Arc<Item>>, bool)> {
        let db = self.db()?;
        let cf = cf(&db, CF_INBOX)?;
        let mut items = Vec::new();
        let mut ro = ReadOptions::default();
        let prefix = inbox_prefix(address);
        let mut upper = prefix.clone();
        upper.push(PRIORITIES as u8);
        ro.set_iterate_lower_bound(prefix.clone());
        ro.set_iterate_upper_bound(upper);
        let mut it = db.raw_iterator_cf_opt(cf, ro);
        for (p, &cursor) in cursors.iter().enumerate() {
            let Some(from) = cursor.checked_add(1) else {
                continue;
            };
            it.seek(inbox_key(address, p as u8, from));
            while let (Some(key), Some(value)) = (it.key(), it.value()) {
                let Some((_, prio, seq)) = parse_inbox_key(key) else {
                    break;
                };
                if usize::from(prio) != p {
                    break;
                }
                if items.len() == budget {
                    return Ok((items, false));
                }
                let record = match record::decode_item(value) {
                    Some(ItemView::Ref(r)) => match self.message(r.msgno)? {
                        Some(msg) => msg,
                        None => {
                            // The payload went with an earlier delete; the
                            // commit thread settles the dangling item.
                            tracing::warn!(
                                address,
                                seq,
                                msgno = r.msgno,
                                "group item without payload"
                            );
                            it.next();
                            continue;
                        }
                    },
                    _ => value.into(),
                };
                items.push(Arc::new(Item {
                    seq,
                    priority: prio,
                    ephemeral: false,
                    record,
                    born_us: 0,
                    pushed_us: Default::default(),
                    group_ref: None,
                    settle_hint: Default::default(),
                }));
                it.next();
            }
            it.status()?;
        }
        Ok((items, true))
    }

    /// Writes a REF for every member's share of a group send that was held
    /// in memory when the server stopped (a bit set in a `held` bitmap,
    /// `record::encode_refs`), and clears the bitmaps, all in one synced
    /// batch: after a restart the store is all there is. Run at
    /// start-up (and after a reopen, with every held share dropped from
    /// memory), before anything reads the inbox. Returns how many.
    ///
    /// A held share never had a REF, so each REF is put exactly once (it is
    /// settled with SingleDelete), and a crash or failure leaves all of
    /// them done or all still to do. (At most `commit::send::HELD_MAX_BYTES`
    /// of shares were held: the batch is bounded.)
    pub fn store_held_shares(&self) -> Result<u64> {
        let db = self.db()?;
        let messages = cf(&db, CF_MESSAGES)?;
        let mut todo = Vec::new();
        let mut it = db.raw_iterator_cf(messages);
        it.seek_to_first();
        while let (Some(key), Some(value)) = (it.key(), it.value()) {
            if let (Some((msgno, 1)), Some((count, held))) =
                (split_message_key(key), record::decode_refs(value))
            {
                if held.iter().any(|&b| b != 0) {
                    todo.push((msgno, count, held.to_vec()));
                }
            }
            it.next();
        }
        it.status()?;
        drop(it);
        drop(db);
        let mut n = 0;
        let mut batch = self.batch();
        for (msgno, count, held) in todo {
            let members = self.get(CF_MESSAGES, &message_members_key(msgno))?;
            let msg = self.message(msgno)?;
            let parts = members.as_deref().and_then(record::decode_members);
            let view = msg.as_deref().and_then(record::decode_item);
            let reference = match view {
                Some(ItemView::Msg(m)) => m.group_ref(msgno, true),
                _ => None,
            };
            let (Some((priority, members)), Some(reference)) = (parts, reference) else {
                // Corrupt: nothing can deliver these; its expiry entry
                // removes what is left.
                tracing::error!(
                    msgno,
                    "group send without member list or record: held shares not stored"
                );
                continue;
            };
            let reference = record::encode_ref(&reference);
            for (i, (address, seq)) in (0u32..).zip(members) {
                if record::bit(&held, i) {
                    batch.put(CF_INBOX, &inbox_key(address, priority, seq), &reference)?;
                    n += 1;
                }
            }
            batch.put(
                CF_MESSAGES,
                &message_refs_key(msgno),
                &record::encode_refs(count, &[]),
            )?;
        }
        // One synced batch: all stored, or none (then all still held).
        batch.seal();
        batch.commit(true)?;
        Ok(n)
    }

    /// The shared MSG record of a group send.
    pub fn message(&self, msgno: u64) -> Result<Option<Arc<[u8]>>> {
        let db = self.db()?;
        let cf = cf(&db, CF_MESSAGES)?;
        let record = db
            .get_pinned_cf(cf, message_key(msgno))?
            .map(|v| Arc::from(&v[..]));
        Ok(record)
    }

    /// Every group with its members and their permission bits.
    pub fn load_groups(&self) -> Result<Vec<GroupRecord>> {
        let db = self.db()?;
        let cf = cf(&db, CF_GROUPS)?;
        let mut groups: Vec<GroupRecord> = Vec::new();
        let mut it = db.raw_iterator_cf(cf);
        it.seek_to_first();
        while let (Some(key), Some(value)) = (it.key(), it.value()) {
            let Some((&glen, rest)) = key.split_first() else {
                break;
            };
            let glen = usize::from(glen);
            let (Some(name), Some(&kind)) = (rest.get(..glen), rest.get(glen)) else {
                break;
            };
            let name = String::from_utf8_lossy(name).into_owned();
            if kind == 0 {
                groups.push((name, Vec::new()));
            } else if let (Some(member), Some(g)) =
                (parse_group_member_key(&name, key), groups.last_mut())
            {
                if g.0 == name {
                    g.1.push((member.to_owned(), value.first().copied().unwrap_or(0)));
                }
            }
            it.next();
        }
        it.status()?;
        Ok(groups)
    }

    /// Replaces a group's membership (creating the group), durably.
    pub fn put_group(&self, name: &str, members: &[(String, u8)], created_ms: u64) -> Result<()> {
        let db = self.db()?;
        let cf = cf(&db, CF_GROUPS)?;
        let mut batch = WriteBatch::default();
        let prefix = group_prefix(name);
        batch.delete_range_cf(cf, &prefix, &prefix_end(&prefix));
        batch.put_cf(cf, group_key(name), created_ms.to_be_bytes());
        for (member, perms) in members {
            batch.put_cf(cf, group_member_key(name, member), [*perms]);
        }
        self.write(&db, batch, true)
    }

    /// Deletes a group and its memberships, durably.
    pub fn delete_group(&self, name: &str) -> Result<()> {
        let db = self.db()?;
        let cf = cf(&db, CF_GROUPS)?;
        let mut batch = WriteBatch::default();
        let prefix = group_prefix(name);
        batch.delete_range_cf(cf, &prefix, &prefix_end(&prefix));
        self.write(&db, batch, true)
    }

    /// Number of keys in a column family (for tests and diagnostics).
    pub fn count_keys(&self, name: &'static str) -> Result<usize> {
        let db = self.db()?;
        let cf = cf(&db, name)?;
        let mut it = db.raw_iterator_cf(cf);
        it.seek_to_first();
        let mut n = 0;
        while it.valid() {
            n += 1;
            it.next();
        }
        it.status()?;
        Ok(n)
    }

    /// Messages of `address` for the admin API: queued MSGs (group REFs
    /// resolved; statuses left out) and, `retained`, delivered ones kept by
    /// `retain_delivered`; `time >= since`, at most `limit`, queued first in
    /// delivery order. Each is (seq, priority, delivered, MSG record).
    pub fn list_messages(
        &self,
        address: &str,
        since: u64,
        limit: usize,
        retained: bool,
    ) -> Result<Vec<Listed>> {
        let db = self.db()?;
        let mut out = Vec::new();
        let prefix = inbox_prefix(address);
        for (name, delivered) in [(CF_INBOX, false), (CF_HISTORY, true)] {
            if delivered && !retained {
                break;
            }
            let handle = cf(&db, name)?;
            let mut ro = ReadOptions::default();
            ro.set_iterate_lower_bound(prefix.clone());
            ro.set_iterate_upper_bound(prefix_end(&prefix));
            let mut it = db.raw_iterator_cf_opt(handle, ro);
            it.seek_to_first();
            while let (Some(key), Some(value)) = (it.key(), it.value()) {
                if out.len() >= limit {
                    return Ok(out);
                }
                let (priority, seq) = if delivered {
                    let seq = key
                        .get(key.len().saturating_sub(8)..)
                        .and_then(|b| b.try_into().ok())
                        .map(u64::from_be_bytes)
                        .unwrap_or(0);
                    (0, seq)
                } else {
                    match parse_inbox_key(key) {
                        Some((_, p, seq)) => (p, seq),
                        None => {
                            it.next();
                            continue;
                        }
                    }
                };
                let record: Option<Arc<[u8]>> = match record::decode_item(value) {
                    Some(ItemView::Msg(m)) if m.time >= since => Some(value.into()),
                    Some(ItemView::Ref(r)) if r.time >= since => self.message(r.msgno)?,
                    _ => None,
                };
                if let Some(record) = record {
                    out.push((seq, priority, delivered, record));
                }
                it.next();
            }
            it.status()?;
        }
        Ok(out)
    }

    /// The keys of every delivered message kept for `address`.
    pub fn history_keys(&self, address: &str) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let db = self.db()?;
        let cf = cf(&db, CF_HISTORY)?;
        let prefix = inbox_prefix(address);
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(prefix.clone());
        ro.set_iterate_upper_bound(prefix_end(&prefix));
        let mut it = db.raw_iterator_cf_opt(cf, ro);
        it.seek_to_first();
        let mut out = Vec::new();
        while let (Some(key), Some(value)) = (it.key(), it.value()) {
            out.push((key.to_vec(), value.to_vec()));
            it.next();
        }
        it.status()?;
        Ok(out)
    }

    /// The keys of column family `name` in `[from, to)`.
    pub fn keys_in(&self, name: &'static str, from: &[u8], to: &[u8]) -> Result<Vec<Vec<u8>>> {
        let db = self.db()?;
        let cf = cf(&db, name)?;
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(from.to_vec());
        ro.set_iterate_upper_bound(to.to_vec());
        let mut it = db.raw_iterator_cf_opt(cf, ro);
        it.seek_to_first();
        let mut keys = Vec::new();
        while let Some(key) = it.key() {
            keys.push(key.to_vec());
            it.next();
        }
        it.status()?;
        Ok(keys)
    }

    /// The keys of every item queued for `address` (for a purge).
    pub fn inbox_keys(&self, address: &str) -> Result<Vec<Vec<u8>>> {
        let prefix = inbox_prefix(address);
        let mut upper = prefix.clone();
        upper.push(PRIORITIES as u8);
        self.keys_in(CF_INBOX, &prefix, &upper)
    }

    /// Up to `limit` expiry-index keys due at or before `now_ms`, oldest first.
    pub fn due_expiries(&self, now_ms: u64, limit: usize) -> Result<Vec<Box<[u8]>>> {
        self.due_expiries_from(None, now_ms, limit)
    }

    /// [`Store::due_expiries`] from `from` on (inclusive): a sweep that
    /// resumes where the last one stopped does not step again over the
    /// tombstones of every key swept since the last compaction.
    pub fn due_expiries_from(
        &self,
        from: Option<&[u8]>,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<Box<[u8]>>> {
        let db = self.db()?;
        let cf = cf(&db, CF_EXPIRY)?;
        let mut ro = ReadOptions::default();
        if let Some(from) = from {
            ro.set_iterate_lower_bound(from.to_vec());
        }
        ro.set_iterate_upper_bound(now_ms.saturating_add(1).to_be_bytes().to_vec());
        let mut it = db.raw_iterator_cf_opt(cf, ro);
        it.seek_to_first();
        let mut due = Vec::new();
        while let Some(key) = it.key() {
            if due.len() == limit {
                break;
            }
            due.push(key.into());
            it.next();
        }
        it.status()?;
        Ok(due)
    }

    /// RocksDB's own figures for each column family, for /metrics: what
    /// its files hold, what compaction still has to do.
    pub fn cf_stats(&self) -> Result<Vec<CfStats>> {
        let db = self.db()?;
        let mut out = Vec::with_capacity(ALL_CFS.len());
        for name in ALL_CFS {
            let handle = cf(&db, name)?;
            let prop =
                |p: &str| -> Result<u64> { Ok(db.property_int_value_cf(handle, p)?.unwrap_or(0)) };
            out.push(CfStats {
                name,
                sst_bytes: prop("rocksdb.total-sst-files-size")?,
                live_bytes: prop("rocksdb.estimate-live-data-size")?,
                pending_compaction_bytes: prop("rocksdb.estimate-pending-compaction-bytes")?,
                l0_files: prop("rocksdb.num-files-at-level0")?,
                memtable_bytes: prop("rocksdb.cur-size-all-mem-tables")?,
                keys: prop("rocksdb.estimate-num-keys")?,
            });
        }
        Ok(out)
    }

    /// Records what an expiry sweep found due: `first`, the earliest key
    /// (`None`: nothing was due).
    pub fn note_swept(&self, first: Option<&[u8]>) {
        let due = first.map_or(u64::MAX, expiry_due);
        self.earliest_due.store(due, Ordering::Relaxed);
    }

    /// How long, at `now` (ms), the earliest entry the expiry sweep last
    /// found due has been due: 0 while the sweep keeps up. Taken from the
    /// sweep rather than by reading the index, whose start is a run of
    /// tombstones until compaction removes them: `/metrics`, which needs
    /// no token, must not walk them at each request.
    pub fn expiry_lag(&self, now: u64) -> u64 {
        match self.earliest_due.load(Ordering::Relaxed) {
            u64::MAX => 0,
            due => now.saturating_sub(due),
        }
    }

    /// Point read in a column family.
    pub fn get(&self, name: &'static str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let db = self.db()?;
        let handle = cf(&db, name)?;
        Ok(db.get_cf(handle, key)?)
    }

    /// Point reads of `keys` (sorted, no two equal) in one column family
    /// at once: RocksDB's batched MultiGet, which looks them all up in one
    /// pass over the memtables and each file, cheaper per key than a
    /// [`Store::get`] each. Each key's value in order, or its read's error.
    pub fn multi_get(
        &self,
        name: &'static str,
        keys: &[Vec<u8>],
    ) -> Result<Vec<Result<Option<Vec<u8>>>>> {
        let db = self.db()?;
        let handle = cf(&db, name)?;
        Ok(db
            .batched_multi_get_cf(handle, keys, true)
            .into_iter()
            .map(|r| r.map(|v| v.map(|v| v.to_vec())).map_err(StoreError::from))
            .collect())
    }

    /// A batch builder bound to this store's column families.
    pub fn batch(&self) -> Batch<'_> {
        self.batch_with_capacity(0, 0)
    }

    /// An empty batch with room for `ops` changes of `bytes` bytes of keys
    /// and values ([`Batch::size`] of an earlier one).
    pub fn batch_with_capacity(&self, ops: usize, bytes: usize) -> Batch<'_> {
        Batch {
            store: self,
            ops: Vec::with_capacity(ops),
            bytes: Vec::with_capacity(bytes),
            sealed: (0, 0),
        }
    }

    /// When the store has gone idle: memtables holding more than
    /// [`IDLE_FLUSH_MIN`] (after a burst is delivered, mostly tombstones)
    /// are written out and freed, then the freed memory goes back to the
    /// OS. Returns the memtable bytes flushed.
    pub fn compact_memory(&self) -> Result<u64> {
        let db = self.db()?;
        let mut flushed = 0;
        for name in ALL_CFS {
            let cf = cf(&db, name)?;
            let size = db
                .property_int_value_cf(cf, "rocksdb.cur-size-all-mem-tables")?
                .unwrap_or(0);
            if size > IDLE_FLUSH_MIN {
                db.flush_cf(cf)?;
                flushed += size;
            }
        }
        release_free_memory();
        Ok(flushed)
    }

    /// Flushes one column family's memtables and compacts all of it (for
    /// tests and diagnostics: compaction filters run over every key).
    pub fn compact(&self, name: &'static str) -> Result<()> {
        let db = self.db()?;
        let cf = cf(&db, name)?;
        db.flush_cf(cf)?;
        db.compact_range_cf(cf, None::<&[u8]>, None::<&[u8]>);
        Ok(())
    }

    /// Flushes memtables and the WAL (used at clean shutdown).
    pub fn flush(&self) -> Result<()> {
        let db = self.db()?;
        db.flush_wal(true)?;
        for name in ALL_CFS {
            let cf = cf(&db, name)?;
            db.flush_cf(cf)?;
        }
        Ok(())
    }
}

/// A column family's memtables are flushed when the store goes idle only
/// above this size, so that light traffic does not make tiny files.
const IDLE_FLUSH_MIN: u64 = 8 << 20;

/// Memory all memtables may use together, bytes.
pub const DB_WRITE_BUFFER: usize = 96 << 20;

/// WAL files kept in all, bytes (then the families holding the oldest are
/// flushed): bounds the WAL's disk and the replay at start-up.
pub const MAX_TOTAL_WAL: u64 = 256 << 20;
/// The block cache shared by every column family (data, index and filter
/// blocks).
const BLOCK_CACHE: usize = 64 << 20;

/// Whether [`release_free_memory`] trims glibc's heap (see there).
static TRIM_C_HEAP: AtomicBool = AtomicBool::new(true);

/// Tells [`release_free_memory`] whether the C heap is glibc's and worth
/// trimming. A program whose allocator hands free pages back on its own
/// (the `tern` binary: jemalloc with its background threads) turns it off.
pub fn set_trim_c_heap(on: bool) {
    TRIM_C_HEAP.store(on, Ordering::Relaxed);
}

/// Hands the C heap's free memory back to the OS. RocksDB allocates its
/// memtables and blocks with the C library's malloc, which keeps what they
/// free for reuse; after a burst is delivered that is 100-200 MiB that no
/// one needs. The commit thread calls this when it goes idle. Programs that
/// link the library with glibc's malloc need it; the `tern` binary's
/// allocator is jemalloc (src/main.rs), which returns free pages on its
/// own, and it turns this off ([`set_trim_c_heap`]).
#[allow(unsafe_code)]
pub fn release_free_memory() {
    if !TRIM_C_HEAP.load(Ordering::Relaxed) {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointer from us; it walks glibc's own
    // arenas under their locks and only releases pages that are free.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// How long [`Store::reopen`] waits for operations holding the old handle.
const REOPEN_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Opens (or creates) RocksDB under `dir` with tern's column families.
fn open_db(dir: &Path) -> Result<DB> {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    opts.increase_parallelism(2);
    opts.set_max_background_jobs(2);
    opts.set_keep_log_file_num(4);
    // All memtables together: without a cap, four column families with two
    // 32-64 MiB write buffers each could hold over 300 MiB after a burst.
    opts.set_db_write_buffer_size(DB_WRITE_BUFFER);
    // A WAL file is deleted only once every column family with a write in
    // it is flushed. The inbox fills and flushes its memtable every few
    // seconds, but the small families (dedup, expiry, users) take far
    // longer, and RocksDB's own cap on the WALs is four times every
    // family's memtables (4,352 MiB here): measured, 2 GB of WAL after 8 s
    // of 48 KiB messages, all of it replayed at the next start (4.3 s).
    // Past this cap RocksDB flushes the families that hold the oldest WAL.
    opts.set_max_total_wal_size(MAX_TOTAL_WAL);
    // Replaying the WAL into memtables without flushing them at open: an
    // open then needs almost no free space, so a server stopped by a full
    // disk starts again (and drains its queues) with little room.
    // (rust-rocksdb has no setter for it: the options-string parser does.)
    //
    // SingleDelete meeting a plain Delete of the same key fails the
    // compaction by default (and stops every write). Inbox items and
    // expiry entries written by earlier versions were settled with Delete;
    // a SingleDelete of such a key after the upgrade still leaves it
    // deleted, so that is not an error here.
    //
    // SST files have their writeback started every 1 MiB as they are
    // written (`sync_file_range`, not waited for), rather than all at the
    // flush's final fsync: on ext4 an fdatasync of the WAL that records a
    // new size waits for a journal commit, and that commit for the data
    // other files left dirty (measured: single WAL syncs of 100-250 ms
    // while a flush wrote its SST).
    //
    // WAL files are not recycled (`recycle_log_file_num`), though a sync
    // of an overwritten block would record no size: recovering recycled
    // WALs after a crash is the part of RocksDB its own crash test leaves
    // out, for data loss found there (facebook/rocksdb#12918), and tern's
    // promise is the power cut, not the 99th percentile.
    let opts = opts.get_options_from_string(
        "avoid_flush_during_recovery=true;enforce_single_del_contracts=false;\
         bytes_per_sync=1048576",
    )?;
    // One block cache for every column family, holding the index and
    // filter blocks too: without it each family had its own default cache,
    // and the bloom filters of the dedup records (kept for the dedup
    // window: a day of traffic) sat outside any cache, so RSS grew with
    // the traffic of the last day.
    //
    // Few shards: LRU shards of their own accord are 1 MiB each at this
    // size (64 of them), and a filter block bigger than its shard is never
    // kept, so every look-up read it from the file and checksummed it again:
    // a 30-minute soak fell from 15,000 to 4,500 msgs/s within minutes, the
    // commit thread spending two thirds of its time in those re-reads.
    let mut cache_opts = LruCacheOptions::default();
    cache_opts.set_capacity(BLOCK_CACHE);
    cache_opts.set_num_shard_bits(2);
    let cache = Cache::new_lru_cache_opts(&cache_opts);
    let mut cfs = Vec::with_capacity(ALL_CFS.len());
    for name in ALL_CFS {
        let mut cf = if name == CF_INBOX {
            // Each user's inbox keys arrive in order (SEQ grows), so a
            // memtable insert can start from where the user's last one
            // went instead of from the top of the skip list: RocksDB
            // keeps one insert hint per prefix. The prefix is the key's
            // first 16 bytes: the length byte, the address, the priority
            // and the SEQ's top bytes (the boot and bits that change once
            // per 2^24 items): for addresses of 9 to 14 bytes exactly one
            // user's (8 bytes: one per 256 items). Longer addresses that share their
            // first 15 bytes share a hint (a hint is only a hint: a wrong
            // one costs a search, never order). Addresses of 7 bytes or
            // less reach the SEQ's low bytes: a hint per key, which helps
            // nothing and costs a 224-byte splice in the memtable's arena
            // and a map node outside it (bounded by the memtable, ~5 MB
            // for a full one). Measured: 8 bytes instead of 16 cost
            // peerbench's fan-out (10-12-byte addresses) ~15 %.
            // Setter-less in rust-rocksdb; the options string has it.
            // (Used as long as writes are not concurrent: one writer.)
            Options::default().get_options_from_string(
                "memtable_insert_with_hint_prefix_extractor=rocksdb.CappedPrefix.16",
            )?
        } else if name == CF_EXPIRY {
            // The expiry index's keys (time, kind, key) arrive in runs: a
            // batch writes its entries with one clock reading, and settles
            // entries written together, so the hint is per millisecond (8
            // bytes), at most a thousand splices a second whatever the
            // addresses. The dedup family has no hint: its keys (length
            // byte, sender, ID) would need one per sender, which no fixed
            // prefix gives. 16 bytes reach into the ID for senders of 7
            // bytes or less, so each record got a 224-byte splice, and
            // those records stay in the memtable for the whole window: a
            // slow consumer's 100,000 messages from "alice" took 22 MiB
            // more (delivery::slow_consumer_is_bounded_and_loses_nothing
            // went over its bound). 8 bytes would give senders sharing
            // their first 7 bytes one hint, wrong at every insert.
            Options::default().get_options_from_string(
                "memtable_insert_with_hint_prefix_extractor=rocksdb.CappedPrefix.8",
            )?
        } else {
            Options::default()
        };
        let mut table = BlockBasedOptions::default();
        table.set_block_cache(&cache);
        table.set_cache_index_and_filter_blocks(true);
        table.set_pin_l0_filter_and_index_blocks_in_cache(true);
        if name == CF_DEDUP || name == CF_TOKENS || name == CF_INBOX {
            // Point look-ups (dedup on every SEND, tokens at HELLO, inbox
            // on ACK) of keys that reached SST files are mostly answered
            // by the bloom filter.
            table.set_bloom_filter(10.0, false);
            // Filters and indexes in 4 KiB partitions, loaded and evicted
            // one by one, under a small pinned top level: a large file's
            // filter then never has to fit the cache whole.
            table.set_partition_filters(true);
            table.set_index_type(BlockBasedIndexType::TwoLevelIndexSearch);
            table.set_metadata_block_size(4096);
            table.set_pin_top_level_index_and_filter(true);
        }
        cf.set_block_based_table_factory(&table);
        if name == CF_INBOX || name == CF_EXPIRY || name == CF_DEDUP {
            // Queues: most keys are deleted soon after they are written.
            // Compact files that fill with tombstones so scans stay fast.
            cf.add_compact_on_deletion_collector_factory(1024, 512, 0.5);
            cf.set_write_buffer_size(32 << 20);
        }
        if name == CF_DEDUP {
            // Every SEND looks its (sender, ID) up, and almost always misses:
            // a bloom filter over the memtable answers that without a
            // search of the skip list (~2 % of the write buffer).
            cf.set_memtable_whole_key_filtering(true);
            cf.set_memtable_prefix_bloom_ratio(0.02);
            cf.set_compaction_filter("tern-dedup-until", dedup_filter);
            // Files no write pushes down are compacted (and their records
            // past `until` dropped) at least once a day all the same.
            cf.set_periodic_compaction_seconds(DEDUP_RECHECK_SECS);
        }
        cfs.push(ColumnFamilyDescriptor::new(name, cf));
    }
    sync_wal_files(dir).map_err(StoreError::WalSync)?;
    Ok(DB::open_cf_descriptors(&opts, dir, cfs)?)
}

/// Syncs the WAL files an open is about to replay. Batches may have been
/// written to them without an fsync (`commit::needs_sync`) before a crash
/// of the process or a failed write: they are in the page cache, and no
/// synced write of the new process syncs them (RocksDB syncs only the WAL
/// files it writes itself). Without this, a power cut after the restart
/// could lose them while later synced writes, built on them, survive.
fn sync_wal_files(dir: &Path) -> std::io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_some_and(|x| x == "log") && path.is_file() {
            std::fs::File::open(&path)?.sync_data()?;
        }
    }
    Ok(())
}

/// How often, at the least, compaction looks at every dedup file.
const DEDUP_RECHECK_SECS: u64 = 86_400;

/// The `dedup` family's compaction filter: drops a record that is
/// [`Dedup::gone`] (records of earlier versions, without an `until`, wait
/// for their expiry entry).
/// Member receipts (longer keys) go with their record's expiry entry. A
/// dropped key becomes a tombstone, so an older version of it in a lower
/// level never comes back.
fn dedup_filter(_level: u32, key: &[u8], value: &[u8]) -> CompactionDecision {
    match is_dedup_key(key).then(|| Dedup::decode(value)).flatten() {
        Some(d) if d.gone(crate::clock::now_ms()) => CompactionDecision::Remove,
        _ => CompactionDecision::Keep,
    }
}

/// A column family of `db` by name.
fn cf<'d>(db: &'d DB, name: &'static str) -> Result<&'d ColumnFamily> {
    db.cf_handle(name).ok_or(StoreError::MissingCf(name))
}

/// Bytes available to an unprivileged writer on the filesystem of `path`.
pub fn free_space(path: &Path) -> std::io::Result<u64> {
    let stat = rustix::fs::statvfs(path)?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// Total size of the filesystem of `path`, bytes.
pub fn disk_size(path: &Path) -> std::io::Result<u64> {
    let stat = rustix::fs::statvfs(path)?;
    Ok(stat.f_blocks.saturating_mul(stat.f_frsize))
}

/// What one staged change does; its key and value are ranges of
/// [`Batch::bytes`].
#[derive(Clone, Copy)]
enum OpKind {
    Put,
    Delete,
    /// A delete that cancels the key's one put (see [`Batch::single_delete`]).
    SingleDelete,
    /// Key = from, value = to.
    DeleteRange,
}

/// One change staged for the batch: `key` is `bytes[at..at + klen]`, the
/// value the `vlen` bytes after it.
#[derive(Clone, Copy)]
struct Op {
    kind: OpKind,
    /// Index in [`ALL_CFS`].
    cf: usize,
    at: usize,
    klen: usize,
    vlen: usize,
}

/// Where [`CF_EXPIRY`] is in [`ALL_CFS`] (what [`Op::cf`] holds).
const EXPIRY_CF_INDEX: usize = {
    let mut i = 0;
    while !same(ALL_CFS[i].as_bytes(), CF_EXPIRY.as_bytes()) {
        i += 1;
    }
    i
};

const fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// The due time (ms) an expiry-index key starts with.
fn expiry_due(key: &[u8]) -> u64 {
    key.get(..8)
        .and_then(|t| t.try_into().ok())
        .map_or(0, u64::from_be_bytes)
}

/// A write batch that takes column families by name, built one request at a
/// time: changes are staged until [`Batch::seal`] keeps them, or
/// [`Batch::rollback`] drops them. So a request that fails part-way leaves
/// nothing behind, and the requests before and after it still commit
/// (rust-rocksdb exposes no WriteBatch save points; staging is the same
/// thing). Keys and values are copied into one growing buffer (two
/// allocations per change were a tenth of the commit thread's time), and
/// the RocksDB `WriteBatch` is built at [`Batch::commit`], against the
/// handle open at that moment.
pub struct Batch<'s> {
    store: &'s Store,
    /// Every change, sealed ones first.
    ops: Vec<Op>,
    /// The keys and values of `ops`, back to back.
    bytes: Vec<u8>,
    /// How many of `ops` (and of `bytes`) are sealed: what
    /// [`Batch::commit`] writes.
    sealed: (usize, usize),
}

impl Batch<'_> {
    /// Changes staged, and the bytes of their keys and values.
    pub fn size(&self) -> (usize, usize) {
        (self.ops.len(), self.bytes.len())
    }

    fn stage(&mut self, kind: OpKind, cf: &'static str, key: &[u8], value: &[u8]) -> Result<()> {
        let cf = ALL_CFS
            .iter()
            .position(|&name| name == cf)
            .ok_or(StoreError::MissingCf(cf))?;
        let at = self.bytes.len();
        self.bytes.extend_from_slice(key);
        self.bytes.extend_from_slice(value);
        self.ops.push(Op {
            kind,
            cf,
            at,
            klen: key.len(),
            vlen: value.len(),
        });
        Ok(())
    }

    /// Stages `key = value` in column family `cf`.
    pub fn put(&mut self, cf: &'static str, key: &[u8], value: &[u8]) -> Result<()> {
        self.stage(OpKind::Put, cf, key, value)
    }

    /// Stages the deletion of every key in `[from, to)` of column family `cf`.
    pub fn delete_range(&mut self, cf: &'static str, from: &[u8], to: &[u8]) -> Result<()> {
        self.stage(OpKind::DeleteRange, cf, from, to)
    }

    /// Stages the deletion of `key` from column family `cf`.
    pub fn delete(&mut self, cf: &'static str, key: &[u8]) -> Result<()> {
        self.stage(OpKind::Delete, cf, key, &[])
    }

    /// Stages the deletion of `key`, a key that was put once and never
    /// overwritten (RocksDB's SingleDelete). Where that holds, the put and
    /// this delete cancel out when their memtable is flushed: neither is
    /// written to a file, and no tombstone is left for compaction.
    pub fn single_delete(&mut self, cf: &'static str, key: &[u8]) -> Result<()> {
        self.stage(OpKind::SingleDelete, cf, key, &[])
    }

    /// Keeps the staged changes: they are part of the batch from now on.
    pub fn seal(&mut self) {
        self.sealed = (self.ops.len(), self.bytes.len());
    }

    /// Drops the staged changes.
    pub fn rollback(&mut self) {
        self.ops.truncate(self.sealed.0);
        self.bytes.truncate(self.sealed.1);
    }

    /// Number of sealed operations in the batch.
    pub fn len(&self) -> usize {
        self.sealed.0
    }

    /// Whether the batch holds no sealed operation.
    pub fn is_empty(&self) -> bool {
        self.sealed.0 == 0
    }

    /// Writes the sealed changes (synced when `sync`); staged ones are dropped.
    pub fn commit(self, sync: bool) -> Result<()> {
        let db = self.store.db()?;
        let handles = ALL_CFS
            .iter()
            .map(|&name| cf(&db, name))
            .collect::<Result<Vec<_>>>()?;
        let mut batch = WriteBatch::with_capacity_bytes(self.sealed.1 + 16 * self.sealed.0);
        let mut floor = u64::MAX;
        for op in &self.ops[..self.sealed.0] {
            let key = &self.bytes[op.at..op.at + op.klen];
            let value = &self.bytes[op.at + op.klen..op.at + op.klen + op.vlen];
            let handle = handles[op.cf];
            match op.kind {
                OpKind::Put => {
                    if op.cf == EXPIRY_CF_INDEX {
                        floor = floor.min(expiry_due(key));
                    }
                    batch.put_cf(handle, key, value)
                }
                OpKind::Delete => batch.delete_cf(handle, key),
                OpKind::SingleDelete => batch.single_delete_cf(handle, key),
                OpKind::DeleteRange => batch.delete_range_cf(handle, key, value),
            }
        }
        // Without `sync` the write is in the kernel when it returns, so a
        // crash of the process loses nothing; a power cut may lose it, and
        // with it every later unsynced write, never an earlier synced one
        // (the WAL is one sequence: a synced write syncs every live WAL
        // file before it returns, and an open syncs the ones it replays).
        // The marker is set after the write, so a `sync_wal` in between
        // cannot clear it for a write that it did not sync.
        let written = self.store.write(&db, batch, sync);
        if !sync {
            let _ = self.store.unsynced_since.compare_exchange(
                0,
                crate::clock::mono_us(),
                Ordering::AcqRel,
                Ordering::Relaxed,
            );
        } else if written.is_ok() {
            self.store.unsynced_since.store(0, Ordering::Release);
        }
        // After the write, failed or not (a failed synced write may still
        // reach the disk): a sweep that asks later sees these entries.
        if floor != u64::MAX {
            self.store.expiry_floor.fetch_min(floor, Ordering::AcqRel);
        }
        written
    }
}
