//! Column-family names and key layouts. All integers are big-endian so that
//! RocksDB's byte order is numeric order; addresses carry a length byte so that
//! one user's keys never share a prefix with another's ("bob" vs "bobby").
//!
//! ```text
//! cf        key                                             value
//! users     address                                         JSON user record
//! tokens    sha256(token)[32]                               expires_ms:u64 | address
//! inbox     alen:u8 address prio:u8 seq:u64                 item record (record.rs)
//! messages  msgno:u64 0x00                                  MSG record of a group send
//!           msgno:u64 0x01                                  refs:u32 (inbox items left)
//!           msgno:u64 0x02                                  prio:u8 (alen address seq:u64)*
//!                                                           (whose inbox holds a REF of it)
//! dedup     alen:u8 sender id:u64                           dedup record (record.rs)
//!           alen:u8 sender id:u64 mlen:u8 member            member receipt (record.rs)
//! history   alen:u8 address seq:u64                         MSG record (retain_delivered)
//! groups    glen:u8 group 0x00                              created_ms:u64
//!           glen:u8 group 0x01 mlen:u8 member               perms:u8 (1 send, 2 recv)
//! expiry    at_ms:u64 kind:u8 key-of-that-kind              empty
//! meta      b"boot"                                         boot counter:u64
//! ```
//!
//! Expiry kinds: [`EXPIRE_ITEM`] (rest = an inbox key), [`EXPIRE_DEDUP`] (rest =
//! a dedup key, with the member receipts under it), [`EXPIRE_DEDUP_ONLY`]
//! (rest = a dedup key without member receipts: only in stores of earlier
//! versions; such records now carry their `until` and compaction drops
//! them), [`EXPIRE_GROUP`] (rest = a msgno: every REF of one group send,
//! which share one expiry entry instead of one each). Scanning `expiry` from
//! the start up to `now` yields exactly what is due, oldest first.

pub const CF_USERS: &str = "users";
pub const CF_TOKENS: &str = "tokens";
pub const CF_INBOX: &str = "inbox";
pub const CF_MESSAGES: &str = "messages";
pub const CF_DEDUP: &str = "dedup";
pub const CF_EXPIRY: &str = "expiry";
pub const CF_META: &str = "meta";
pub const CF_GROUPS: &str = "groups";
pub const CF_HISTORY: &str = "history";

/// Every column family, in the order they are opened.
pub const ALL_CFS: [&str; 9] = [
    CF_USERS,
    CF_TOKENS,
    CF_INBOX,
    CF_MESSAGES,
    CF_DEDUP,
    CF_EXPIRY,
    CF_META,
    CF_GROUPS,
    CF_HISTORY,
];

/// `groups` member permission bit: may send to the group.
pub const PERM_SEND: u8 = 1;
/// `groups` member permission bit: receives the group's messages.
pub const PERM_RECV: u8 = 2;

/// `meta` key of the boot counter.
pub const META_BOOT: &[u8] = b"boot";

/// Expiry-index kind: a queued inbox item.
pub const EXPIRE_ITEM: u8 = 1;
/// Expiry-index kind: a duplicate-detection record.
pub const EXPIRE_DEDUP: u8 = 2;
/// Expiry-index kind: the REF items of one group send (rest = its msgno).
pub const EXPIRE_GROUP: u8 = 3;
/// Expiry-index kind: a duplicate-detection record that has no member
/// receipts (rest = its key): one point delete, where [`EXPIRE_DEDUP`]
/// looks for the receipts under the key too.
pub const EXPIRE_DEDUP_ONLY: u8 = 4;

/// Number of priorities (0 highest … 15 lowest).
pub const PRIORITIES: usize = 16;

fn push_address(key: &mut Vec<u8>, address: &str) {
    // Addresses are validated to 1..=255 bytes before they reach the store.
    debug_assert!(!address.is_empty() && address.len() <= 255);
    key.push(address.len() as u8);
    key.extend_from_slice(address.as_bytes());
}

/// The prefix of all of one user's inbox keys.
pub fn inbox_prefix(address: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + address.len() + 9);
    push_address(&mut key, address);
    key
}

/// `alen address prio seq`: one queued item.
pub fn inbox_key(address: &str, priority: u8, seq: u64) -> Vec<u8> {
    let mut key = inbox_prefix(address);
    key.push(priority);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// The parts of an inbox key: (address, priority, seq).
pub fn parse_inbox_key(key: &[u8]) -> Option<(&str, u8, u64)> {
    let (&alen, rest) = key.split_first()?;
    let alen = usize::from(alen);
    if rest.len() != alen + 9 {
        return None;
    }
    let address = std::str::from_utf8(&rest[..alen]).ok()?;
    let priority = rest[alen];
    let seq = u64::from_be_bytes(rest[alen + 1..].try_into().ok()?);
    Some((address, priority, seq))
}

/// `alen address seq`: a delivered message kept with `retain_delivered`.
pub fn history_key(address: &str, seq: u64) -> Vec<u8> {
    let mut key = inbox_prefix(address);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// `alen sender id`: the duplicate-detection record of one SEND.
pub fn dedup_key(sender: &str, id: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + sender.len() + 8);
    push_address(&mut key, sender);
    key.extend_from_slice(&id.to_be_bytes());
    key
}

/// Whether a `dedup` family key is a send's record (`alen sender id`), not
/// a member receipt under it (which is longer).
pub fn is_dedup_key(key: &[u8]) -> bool {
    key.first()
        .is_some_and(|&alen| key.len() == 1 + usize::from(alen) + 8)
}

/// `alen sender id mlen member`: what a group member did with one group send
/// (for its READ receipt). Sorts right after the send's dedup key, so one
/// scan of the dedup key's prefix finds them all.
pub fn member_receipt_key(sender: &str, id: u64, member: &str) -> Vec<u8> {
    let mut key = dedup_key(sender, id);
    push_address(&mut key, member);
    key
}

/// An exclusive upper bound for keys that are `prefix` followed by an address
/// (a length byte, then ASCII): `prefix ff ff` sorts after all of them.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    end.push(0xff);
    end.push(0xff);
    end
}

/// `msgno 0x00`: the shared MSG record of a group send.
pub fn message_key(msgno: u64) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[..8].copy_from_slice(&msgno.to_be_bytes());
    key
}

/// The msgno and suffix of a `messages` key (`None` for another length).
pub fn split_message_key(key: &[u8]) -> Option<(u64, u8)> {
    let (msgno, suffix) = key.split_first_chunk::<8>()?;
    match suffix {
        [s] => Some((u64::from_be_bytes(*msgno), *s)),
        _ => None,
    }
}

/// `msgno 0x01`: how many members' shares still refer to the message (REF
/// items, or shares held in memory), and which are held
/// (`record::encode_refs`).
pub fn message_refs_key(msgno: u64) -> [u8; 9] {
    let mut key = message_key(msgno);
    key[8] = 1;
    key
}

/// `msgno 0x02`: where the REF items of a group send are queued (for its
/// one expiry entry).
pub fn message_members_key(msgno: u64) -> [u8; 9] {
    let mut key = message_key(msgno);
    key[8] = 2;
    key
}

/// The prefix of all of one group's keys.
pub fn group_prefix(name: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(2 + name.len());
    push_address(&mut key, name);
    key
}

/// `glen group 0x00`: the group exists.
pub fn group_key(name: &str) -> Vec<u8> {
    let mut key = group_prefix(name);
    key.push(0);
    key
}

/// `glen group 0x01 mlen member`: one membership.
pub fn group_member_key(name: &str, member: &str) -> Vec<u8> {
    let mut key = group_prefix(name);
    key.push(1);
    push_address(&mut key, member);
    key
}

/// The member address of a membership key of `name`.
pub fn parse_group_member_key<'k>(name: &str, key: &'k [u8]) -> Option<&'k str> {
    let head = 1 + name.len() + 1;
    let rest = key.get(head..)?;
    let (&mlen, member) = rest.split_first()?;
    if member.len() != usize::from(mlen) {
        return None;
    }
    std::str::from_utf8(member).ok()
}

/// `at_ms kind key`: an entry of the expiry index.
pub fn expiry_key(at_ms: u64, kind: u8, key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + key.len());
    out.extend_from_slice(&at_ms.to_be_bytes());
    out.push(kind);
    out.extend_from_slice(key);
    out
}

/// The parts of an expiry-index key: (at_ms, kind, key).
pub fn parse_expiry_key(key: &[u8]) -> Option<(u64, u8, &[u8])> {
    if key.len() < 9 {
        return None;
    }
    let at = u64::from_be_bytes(key[..8].try_into().ok()?);
    Some((at, key[8], &key[9..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inbox_keys_sort_by_user_then_priority_then_seq() {
        let mut keys = [
            inbox_key("bob", 1, 1),
            inbox_key("bob", 0, 300),
            inbox_key("bob", 0, 2),
            inbox_key("bobby", 0, 0),
            inbox_key("bob", 15, u64::MAX),
            inbox_key("bob", 0, 256),
        ];
        keys.sort();
        let parsed: Vec<_> = keys.iter().map(|k| parse_inbox_key(k).unwrap()).collect();
        assert_eq!(
            parsed,
            [
                ("bob", 0, 2),
                ("bob", 0, 256),
                ("bob", 0, 300),
                ("bob", 1, 1),
                ("bob", 15, u64::MAX),
                ("bobby", 0, 0),
            ]
        );
        // One user's keys never fall under another's prefix.
        assert!(!inbox_key("bobby", 0, 0).starts_with(&inbox_prefix("bob")));
    }

    #[test]
    fn member_receipts_sort_inside_their_send() {
        let send = dedup_key("alice", 7);
        let member = member_receipt_key("alice", 7, "bob");
        let next = dedup_key("alice", 8);
        assert!(send < member && member < next);
        assert!(member.as_slice() < prefix_end(&send).as_slice());
        assert!(next.as_slice() > prefix_end(&send).as_slice());
        assert!(is_dedup_key(&send) && !is_dedup_key(&member) && !is_dedup_key(&[]));
    }

    #[test]
    fn group_keys() {
        let meta = group_key("team");
        let m1 = group_member_key("team", "ann");
        let m2 = group_member_key("team", "bob");
        assert!(meta < m1 && m1 < m2);
        assert!(m2.starts_with(&group_prefix("team")));
        assert!(!group_member_key("teams", "a").starts_with(&group_prefix("team")));
        assert_eq!(parse_group_member_key("team", &m2), Some("bob"));
        assert!(message_key(5) < message_refs_key(5));
        assert!(message_refs_key(5) < message_key(6));
    }

    #[test]
    fn expiry_keys_sort_by_time() {
        let a = expiry_key(255, EXPIRE_DEDUP, b"zzz");
        let b = expiry_key(256, EXPIRE_ITEM, b"aaa");
        assert!(a < b);
        assert_eq!(parse_expiry_key(&b), Some((256, EXPIRE_ITEM, &b"aaa"[..])));
        assert_eq!(parse_expiry_key(b"short"), None);
    }
}
