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
use std::path::Path;
use std::sync::Arc;

use rocksdb::{
    BlockBasedOptions, ColumnFamily, ColumnFamilyDescriptor, Options, ReadOptions, WriteBatch,
    WriteOptions, DB,
};

pub use record::{Dedup, Item, ItemView, MsgView, RefView, StatusView};

use keys::*;

/// A storage failure. RocksDB errors are not recoverable by the caller; the
/// server logs them and refuses the operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("corrupt record in {cf}: {what}")]
    Corrupt { cf: &'static str, what: String },
    #[error("column family {0} missing")]
    MissingCf(&'static str),
    /// A fault injected by a test (see `commit`'s tests).
    #[cfg(test)]
    #[error("injected fault")]
    Injected,
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

/// The open database. Cheap to share: wrap it in an `Arc`.
pub struct Store {
    /// RocksDB with the column families of [`keys::ALL_CFS`].
    db: DB,
}

impl Store {
    /// Opens (or creates) the database under `dir`.
    pub fn open(dir: &Path) -> Result<Store> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.increase_parallelism(2);
        opts.set_max_background_jobs(2);
        opts.set_keep_log_file_num(4);
        let cfs = ALL_CFS.iter().map(|&name| {
            let mut cf = Options::default();
            if name == CF_DEDUP || name == CF_TOKENS || name == CF_INBOX {
                // Point look-ups (dedup on every SEND, tokens at HELLO, inbox
                // on ACK) of keys that reached SST files are mostly answered
                // by the bloom filter.
                let mut table = BlockBasedOptions::default();
                table.set_bloom_filter(10.0, false);
                cf.set_block_based_table_factory(&table);
            }
            if name == CF_INBOX || name == CF_EXPIRY || name == CF_DEDUP {
                // Queues: most keys are deleted soon after they are written.
                // Compact files that fill with tombstones so scans stay fast.
                cf.add_compact_on_deletion_collector_factory(1024, 512, 0.5);
                cf.set_write_buffer_size(32 << 20);
            }
            ColumnFamilyDescriptor::new(name, cf)
        });
        let db = DB::open_cf_descriptors(&opts, dir, cfs)?;
        Ok(Store { db })
    }

    fn cf(&self, name: &'static str) -> Result<&ColumnFamily> {
        self.db.cf_handle(name).ok_or(StoreError::MissingCf(name))
    }

    /// Writes a batch; with `sync`, returns only once it is on stable storage.
    fn write(&self, batch: WriteBatch, sync: bool) -> Result<()> {
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        Ok(self.db.write_opt(batch, &wo)?)
    }

    /// Increments the boot counter durably and returns the new value. Each
    /// boot owns the SEQ range `boot << 40 ..`, so SEQs never repeat across
    /// restarts even for items that were never stored.
    pub fn next_boot(&self) -> Result<u64> {
        let meta = self.cf(CF_META)?;
        let boot = match self.db.get_cf(meta, META_BOOT)? {
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
        self.write(batch, true)?;
        Ok(boot)
    }

    /// All users.
    pub fn load_users(&self) -> Result<Vec<UserRecord>> {
        let cf = self.cf(CF_USERS)?;
        let mut users = Vec::new();
        for kv in self.db.iterator_cf(cf, rocksdb::IteratorMode::Start) {
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
        let users = self.cf(CF_USERS)?;
        let tokens = self.cf(CF_TOKENS)?;
        let mut batch = WriteBatch::default();
        let json = serde_json::to_vec(user).map_err(|e| StoreError::Corrupt {
            cf: CF_USERS,
            what: e.to_string(),
        })?;
        batch.put_cf(users, user.address.as_bytes(), json);
        let mut value = expires_ms.to_be_bytes().to_vec();
        value.extend_from_slice(user.address.as_bytes());
        batch.put_cf(tokens, token_hash, value);
        self.write(batch, true)
    }

    /// Adds a token hash for an existing user, durably.
    pub fn put_token(&self, address: &str, token_hash: &[u8; 32], expires_ms: u64) -> Result<()> {
        let tokens = self.cf(CF_TOKENS)?;
        let mut value = expires_ms.to_be_bytes().to_vec();
        value.extend_from_slice(address.as_bytes());
        let mut batch = WriteBatch::default();
        batch.put_cf(tokens, token_hash, value);
        self.write(batch, true)
    }

    /// Deletes every token of a user (and, with `user`, the user record),
    /// durably. Tokens are keyed by hash, so this scans them: an admin
    /// operation, not a hot path.
    pub fn revoke_tokens(&self, address: &str, user: bool) -> Result<usize> {
        let tokens = self.cf(CF_TOKENS)?;
        let mut batch = WriteBatch::default();
        let mut n = 0;
        let mut it = self.db.raw_iterator_cf(tokens);
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
            batch.delete_cf(self.cf(CF_USERS)?, address.as_bytes());
        }
        self.write(batch, true)?;
        Ok(n)
    }

    /// The (address, expires_ms) a token hash belongs to; expires 0 = never.
    pub fn lookup_token(&self, token_hash: &[u8; 32]) -> Result<Option<(String, u64)>> {
        let cf = self.cf(CF_TOKENS)?;
        let Some(v) = self.db.get_pinned_cf(cf, token_hash)? else {
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
        let cf = self.cf(CF_INBOX)?;
        let mut counts: HashMap<String, u64> = HashMap::new();
        let mut it = self.db.raw_iterator_cf(cf);
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
        let cf = self.cf(CF_INBOX)?;
        let mut items = Vec::new();
        let mut ro = ReadOptions::default();
        let prefix = inbox_prefix(address);
        let mut upper = prefix.clone();
        upper.push(PRIORITIES as u8);
        ro.set_iterate_lower_bound(prefix.clone());
        ro.set_iterate_upper_bound(upper);
        let mut it = self.db.raw_iterator_cf_opt(cf, ro);
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
                }));
                it.next();
            }
            it.status()?;
        }
        Ok((items, true))
    }

    /// The shared MSG record of a group send.
    pub fn message(&self, msgno: u64) -> Result<Option<Arc<[u8]>>> {
        let cf = self.cf(CF_MESSAGES)?;
        Ok(self
            .db
            .get_pinned_cf(cf, message_key(msgno))?
            .map(|v| Arc::from(&v[..])))
    }

    /// Every group with its members and their permission bits.
    pub fn load_groups(&self) -> Result<Vec<GroupRecord>> {
        let cf = self.cf(CF_GROUPS)?;
        let mut groups: Vec<GroupRecord> = Vec::new();
        let mut it = self.db.raw_iterator_cf(cf);
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
        let cf = self.cf(CF_GROUPS)?;
        let mut batch = WriteBatch::default();
        let prefix = group_prefix(name);
        batch.delete_range_cf(cf, &prefix, &prefix_end(&prefix));
        batch.put_cf(cf, group_key(name), created_ms.to_be_bytes());
        for (member, perms) in members {
            batch.put_cf(cf, group_member_key(name, member), [*perms]);
        }
        self.write(batch, true)
    }

    /// Deletes a group and its memberships, durably.
    pub fn delete_group(&self, name: &str) -> Result<()> {
        let cf = self.cf(CF_GROUPS)?;
        let mut batch = WriteBatch::default();
        let prefix = group_prefix(name);
        batch.delete_range_cf(cf, &prefix, &prefix_end(&prefix));
        self.write(batch, true)
    }

    /// Number of keys in a column family (for tests and diagnostics).
    pub fn count_keys(&self, name: &'static str) -> Result<usize> {
        let cf = self.cf(name)?;
        let mut it = self.db.raw_iterator_cf(cf);
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
        let mut out = Vec::new();
        let prefix = inbox_prefix(address);
        for (cf, delivered) in [(CF_INBOX, false), (CF_HISTORY, true)] {
            if delivered && !retained {
                break;
            }
            let handle = self.cf(cf)?;
            let mut ro = ReadOptions::default();
            ro.set_iterate_lower_bound(prefix.clone());
            ro.set_iterate_upper_bound(prefix_end(&prefix));
            let mut it = self.db.raw_iterator_cf_opt(handle, ro);
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
        let cf = self.cf(CF_HISTORY)?;
        let prefix = inbox_prefix(address);
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(prefix.clone());
        ro.set_iterate_upper_bound(prefix_end(&prefix));
        let mut it = self.db.raw_iterator_cf_opt(cf, ro);
        it.seek_to_first();
        let mut out = Vec::new();
        while let (Some(key), Some(value)) = (it.key(), it.value()) {
            out.push((key.to_vec(), value.to_vec()));
            it.next();
        }
        it.status()?;
        Ok(out)
    }

    /// The keys of every item queued for `address` (for a purge).
    pub fn inbox_keys(&self, address: &str) -> Result<Vec<Vec<u8>>> {
        let cf = self.cf(CF_INBOX)?;
        let prefix = inbox_prefix(address);
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(prefix.clone());
        let mut upper = prefix;
        upper.push(PRIORITIES as u8);
        ro.set_iterate_upper_bound(upper);
        let mut it = self.db.raw_iterator_cf_opt(cf, ro);
        it.seek_to_first();
        let mut keys = Vec::new();
        while let Some(key) = it.key() {
            keys.push(key.to_vec());
            it.next();
        }
        it.status()?;
        Ok(keys)
    }

    /// Up to `limit` expiry-index keys due at or before `now_ms`, oldest first.
    pub fn due_expiries(&self, now_ms: u64, limit: usize) -> Result<Vec<Box<[u8]>>> {
        let cf = self.cf(CF_EXPIRY)?;
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(now_ms.saturating_add(1).to_be_bytes().to_vec());
        let mut it = self.db.raw_iterator_cf_opt(cf, ro);
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

    /// Point read in a column family.
    pub fn get(&self, cf: &'static str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let handle = self.cf(cf)?;
        Ok(self.db.get_cf(handle, key)?)
    }

    /// A batch builder bound to this store's column families.
    pub fn batch(&self) -> Batch<'_> {
        Batch {
            store: self,
            batch: WriteBatch::default(),
            staged: Vec::new(),
        }
    }

    /// Flushes memtables and the WAL (used at clean shutdown).
    pub fn flush(&self) -> Result<()> {
        self.db.flush_wal(true)?;
        for name in ALL_CFS {
            let cf = self.cf(name)?;
            self.db.flush_cf(cf)?;
        }
        Ok(())
    }
}

/// One change staged for the batch.
enum Op<'s> {
    Put(&'s ColumnFamily, Vec<u8>, Vec<u8>),
    Delete(&'s ColumnFamily, Vec<u8>),
    DeleteRange(&'s ColumnFamily, Vec<u8>, Vec<u8>),
}

/// A WriteBatch that takes column families by name, built one request at a
/// time: changes are staged until [`Batch::seal`] moves them into the batch,
/// or [`Batch::rollback`] drops them. So a request that fails part-way leaves
/// nothing behind, and the requests before and after it still commit
/// (rust-rocksdb exposes no WriteBatch save points; staging is the same
/// thing).
pub struct Batch<'s> {
    store: &'s Store,
    /// Sealed changes: what [`Batch::commit`] writes.
    batch: WriteBatch,
    /// The current request's changes.
    staged: Vec<Op<'s>>,
}

impl<'s> Batch<'s> {
    /// Stages `key = value` in column family `cf`.
    pub fn put(&mut self, cf: &'static str, key: &[u8], value: &[u8]) -> Result<()> {
        let cf = self.store.cf(cf)?;
        self.staged.push(Op::Put(cf, key.to_vec(), value.to_vec()));
        Ok(())
    }

    /// Stages the deletion of every key in `[from, to)` of column family `cf`.
    pub fn delete_range(&mut self, cf: &'static str, from: &[u8], to: &[u8]) -> Result<()> {
        let cf = self.store.cf(cf)?;
        self.staged
            .push(Op::DeleteRange(cf, from.to_vec(), to.to_vec()));
        Ok(())
    }

    /// Stages the deletion of `key` from column family `cf`.
    pub fn delete(&mut self, cf: &'static str, key: &[u8]) -> Result<()> {
        let cf = self.store.cf(cf)?;
        self.staged.push(Op::Delete(cf, key.to_vec()));
        Ok(())
    }

    /// Keeps the staged changes: they are part of the batch from now on.
    pub fn seal(&mut self) {
        for op in self.staged.drain(..) {
            match op {
                Op::Put(cf, k, v) => self.batch.put_cf(cf, k, v),
                Op::Delete(cf, k) => self.batch.delete_cf(cf, k),
                Op::DeleteRange(cf, from, to) => self.batch.delete_range_cf(cf, from, to),
            }
        }
    }

    /// Drops the staged changes.
    pub fn rollback(&mut self) {
        self.staged.clear();
    }

    /// Number of sealed operations in the batch.
    pub fn len(&self) -> usize {
        self.batch.len()
    }

    /// Whether the batch holds no sealed operation.
    pub fn is_empty(&self) -> bool {
        self.batch.is_empty()
    }

    /// Writes the sealed changes (synced when `sync`); staged ones are dropped.
    pub fn commit(self, sync: bool) -> Result<()> {
        self.store.write(self.batch, sync)
    }
}
