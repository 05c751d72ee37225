//! Admin operations: users, tokens and groups, each written to the store and
//! then published in the directory. Called by the HTTP API; queued-state
//! changes (purging a deleted user's queue) go through the commit thread like
//! every other change.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use crossbeam::channel;

use crate::clock::now_ms;
use crate::commit::{Commit, Request};
use crate::directory::{hash_token, normalize, Directory, Group, Member, User};
use crate::store::keys::{PERM_RECV, PERM_SEND};
use crate::store::{Store, StoreError, UserRecord};
use crate::wire::ErrorCode;

/// A membership as the admin API gives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberSpec {
    /// The member's address.
    pub address: String,
    /// May send to the group.
    pub send: bool,
    /// Receives the group's messages.
    pub recv: bool,
}

/// Why a group change was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
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

/// Why a user could not be created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UserError {
    #[error("invalid address")]
    InvalidAddress,
    /// A delete of the user failed half-way (its queue is still stored):
    /// only a retry of the delete may go on.
    #[error("the user's delete did not finish")]
    BeingDeleted,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The admin side of the server.
pub struct Admin {
    /// Users and groups in memory.
    pub dir: Arc<Directory>,
    /// Where users, tokens and groups are written.
    pub store: Arc<Store>,
    /// For the queue purge of a deleted user.
    commit: Commit,
    /// `max_group_size` from the configuration.
    max_group_size: usize,
    /// Serializes group changes (read-modify-write of a snapshot).
    group_admin: Mutex<()>,
    /// Serializes creating and deleting users, and adding tokens: a user
    /// created while one of the same address is being deleted would
    /// otherwise start its SEQs where the old one's still-stored items are
    /// (`Directory::new_user`), and a token added meanwhile would outlive
    /// the delete.
    user_admin: Mutex<()>,
}

impl Admin {
    /// The admin operations over these parts.
    pub fn new(
        dir: Arc<Directory>,
        store: Arc<Store>,
        commit: Commit,
        max_group_size: usize,
    ) -> Admin {
        Admin {
            dir,
            store,
            commit,
            max_group_size,
            group_admin: Mutex::new(()),
            user_admin: Mutex::new(()),
        }
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
        let _admin = self.user_admin.lock().unwrap_or_else(|e| e.into_inner());
        if self
            .dir
            .any_user(address)
            .is_some_and(|u| u.deleted.load(Ordering::Acquire))
        {
            return Err(UserError::BeingDeleted);
        }
        let existing = self.dir.user(address);
        let token = new_token();
        let now = now_ms();
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
        let expires = expiry(now, token_ttl_secs);
        self.store.put_user(&record, &hash_token(&token), expires)?;
        match existing {
            Some(user) => {
                if let Ok(mut n) = user.name.lock() {
                    *n = name;
                }
                Ok((false, token))
            }
            None => {
                self.dir.insert_user(self.dir.new_user(address, name));
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
        // Under the lock a delete holds throughout: a token put between a
        // delete's look at the user and its last revoke would survive it,
        // and log into a user created again under the address.
        let _admin = self.user_admin.lock().unwrap_or_else(|e| e.into_inner());
        if self.dir.user(address).is_none() {
            return Ok(None);
        }
        let token = new_token();
        let expires = expiry(now_ms(), token_ttl_secs);
        self.store
            .put_token(address, &hash_token(&token), expires)?;
        Ok(Some(token))
    }

    /// Revokes every token of a user and closes its session; `false` if
    /// there is no such user.
    pub fn revoke_tokens(&self, address: &str) -> Result<bool, StoreError> {
        let Some(user) = self.dir.user(address) else {
            return Ok(false);
        };
        self.store.revoke_tokens(address, false)?;
        close_session(&user, ErrorCode::AUTH_FAILED);
        Ok(true)
    }

    /// Deletes a user: tokens revoked, session closed with ERROR
    /// AUTH_FAILED, memberships removed, queued items deleted (their senders
    /// get STATUS DELETED). `false` if there is no such user.
    pub fn delete_user(&self, address: &str) -> Result<bool, StoreError> {
        let _admin = self.user_admin.lock().unwrap_or_else(|e| e.into_inner());
        // Also a user whose earlier delete failed half-way: this retries it.
        let Some(user) = self.dir.any_user(address) else {
            return Ok(false);
        };
        // SeqCst: a login that swaps itself in after the close below sees
        // the flag (the session's HELLO).
        user.deleted.store(true, Ordering::SeqCst);
        // The user's record goes only with its queue (below): a delete
        // whose purge failed leaves a user that a restart loads again,
        // with its items, rather than items no user owns, which a user
        // created again under the address would get.
        self.store.revoke_tokens(address, false)?;
        close_session(&user, ErrorCode::AUTH_FAILED);
        for name in self.dir.groups_of(address) {
            match self.change_members(&name, Vec::new(), &[address.to_owned()]) {
                Ok(_) | Err(GroupError::NotFound) => {}
                Err(GroupError::Store(e)) => return Err(e),
                Err(e) => tracing::warn!(group = %name, error = %e, "membership not removed"),
            }
        }
        let (done, wait) = channel::bounded(1);
        if !self.commit.submit(Request::Purge { user, done }) || wait.recv() != Ok(true) {
            // Its queued items are still stored: the user stays in the
            // directory (marked deleted: unreachable), so that the delete
            // can be retried, and its items never reach a user created
            // again under the same address.
            return Err(StoreError::Unavailable);
        }
        // The record, and the tokens again (`create_user` and `add_token`
        // wait for this lock, so none can have been added meanwhile; this
        // is the record's delete, which the purge had to come before).
        self.store.revoke_tokens(address, true)?;
        self.dir.remove_user(address);
        Ok(true)
    }

    /// Creates or replaces a group. Returns whether it is new.
    pub fn put_group(&self, name: &str, members: Vec<MemberSpec>) -> Result<bool, GroupError> {
        if !crate::wire::is_valid_address(name) {
            return Err(GroupError::InvalidName);
        }
        let _admin = self.group_admin.lock().unwrap_or_else(|e| e.into_inner());
        let created = self.dir.group(name).is_none();
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
        let group = self.dir.group(name).ok_or(GroupError::NotFound)?;
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
        if self.dir.group(name).is_none() {
            return Ok(false);
        }
        self.store.delete_group(name)?;
        self.dir.remove_group(name);
        Ok(true)
    }

    /// Validates, writes and publishes a membership (caller holds `group_admin`).
    fn store_group(&self, name: &str, specs: Vec<MemberSpec>) -> Result<Arc<Group>, GroupError> {
        let mut members: Vec<Member> = Vec::with_capacity(specs.len());
        for spec in specs {
            let user = self
                .dir
                .user(&spec.address)
                .ok_or_else(|| GroupError::UnknownUser(spec.address.clone()))?;
            members.push(Member {
                user,
                send: spec.send,
                recv: spec.recv,
            });
        }
        let members = normalize(members);
        if members.len() > self.max_group_size {
            return Err(GroupError::TooLarge(self.max_group_size));
        }
        let records: Vec<(String, u8)> = members
            .iter()
            .map(|m| {
                let send = if m.send { PERM_SEND } else { 0 };
                let recv = if m.recv { PERM_RECV } else { 0 };
                (m.user.address.to_string(), send | recv)
            })
            .collect();
        self.store.put_group(name, &records, now_ms())?;
        Ok(self.dir.publish_group(name.into(), members))
    }
}

/// Closes the user's session, if any, with ERROR `code`.
fn close_session(user: &User, code: ErrorCode) {
    if let Some(mb) = user.attached.load_full() {
        mb.close(code);
        mb.wake();
    }
}

/// When a token with this TTL expires (0 = never).
fn expiry(now: u64, ttl_secs: Option<u64>) -> u64 {
    ttl_secs
        .map(|s| now.saturating_add(s.saturating_mul(1000)))
        .unwrap_or(0)
}

/// A fresh random token: 256 bits, hex.
pub fn new_token() -> String {
    let bytes: [u8; 32] = rand::random();
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A delete whose queue purge was not committed (its write failed)
    /// ends in an error and leaves the user listed, unable to get a token
    /// or to be created again, until a retry of the delete goes through.
    #[test]
    fn a_delete_whose_purge_was_not_committed_can_be_retried() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(tmp.path()).unwrap());
        let dir = Arc::new(Directory::new(1));
        let (commit, queue) = crate::commit::queue();
        // The commit thread's answers: the first purge refused, then done.
        std::thread::spawn(move || {
            let mut refuse = true;
            for req in queue.into_receiver() {
                if let Request::Purge { done, .. } = req {
                    let _ = done.send(!std::mem::replace(&mut refuse, false));
                }
            }
        });
        let admin = Admin::new(dir.clone(), store.clone(), commit, 100);
        admin.create_user("bob", None, None).unwrap();
        assert!(matches!(
            admin.delete_user("bob"),
            Err(StoreError::Unavailable)
        ));
        assert!(dir.user("bob").is_none(), "unreachable");
        assert!(dir.any_user("bob").is_some(), "but still there");
        // And still stored: a restart loads bob again, with his items.
        let stored = |a: &str| store.load_users().unwrap().iter().any(|u| u.address == a);
        assert!(stored("bob"));
        assert!(matches!(
            admin.create_user("bob", None, None),
            Err(UserError::BeingDeleted)
        ));
        assert_eq!(admin.add_token("bob", None).unwrap(), None);
        assert!(admin.delete_user("bob").unwrap(), "the retry");
        assert!(dir.any_user("bob").is_none());
        assert!(!stored("bob"));
        let (created, _) = admin.create_user("bob", None, None).unwrap();
        assert!(created, "a new bob");
    }
}
