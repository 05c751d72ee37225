//! Column-family names and key layouts. All integers are big-endian so that
//! RocksDB's byte order is numeric order; addresses carry a length byte so that
//! one user's keys never share a prefix with another's ("bob" vs "bobby").
//!
//! ```text
//! cf        key                                             value
//! users     address                                         JSON user record
//! tokens    sha256(token)[32]                               expires_ms:u64 | address
//! inbox     alen:u8 address prio:u8 seq:u64                 item record (record.rs)
//! messages  (reserved for shared group payloads)
//! dedup     alen:u8 sender id:u64                           dedup record (record.rs)
//! expiry    at_ms:u64 kind:u8 key-of-that-kind              empty
//! meta      b"boot"                                         boot counter:u64
//! ```
//!
//! Expiry kinds: [`EXPIRE_ITEM`] (rest = an inbox key), [`EXPIRE_DEDUP`] (rest =
//! a dedup key). Scanning `expiry` from the start up to `now` yields exactly
//! what is due, oldest first.

pub const CF_USERS: &str = "users";
pub const CF_TOKENS: &str = "tokens";
pub const CF_INBOX: &str = "inbox";
pub const CF_MESSAGES: &str = "messages";
pub const CF_DEDUP: &str = "dedup";
pub const CF_EXPIRY: &str = "expiry";
pub const CF_META: &str = "meta";

/// Every column family, in the order they are opened.
pub const ALL_CFS: [&str; 7] = [
    CF_USERS,
    CF_TOKENS,
    CF_INBOX,
    CF_MESSAGES,
    CF_DEDUP,
    CF_EXPIRY,
    CF_META,
];

/// `meta` key of the boot counter.
pub const META_BOOT: &[u8] = b"boot";

/// Expiry-index kind: a queued inbox item.
pub const EXPIRE_ITEM: u8 = 1;
/// Expiry-index kind: a duplicate-detection record.
pub const EXPIRE_DEDUP: u8 = 2;

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

/// `alen sender id`: the duplicate-detection record of one SEND.
pub fn dedup_key(sender: &str, id: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + sender.len() + 8);
    push_address(&mut key, sender);
    key.extend_from_slice(&id.to_be_bytes());
    key
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
    fn expiry_keys_sort_by_time() {
        let a = expiry_key(255, EXPIRE_DEDUP, b"zzz");
        let b = expiry_key(256, EXPIRE_ITEM, b"aaa");
        assert!(a < b);
        assert_eq!(parse_expiry_key(&b), Some((256, EXPIRE_ITEM, &b"aaa"[..])));
        assert_eq!(parse_expiry_key(b"short"), None);
    }
}
