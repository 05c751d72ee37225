//! Who gets in: per-address connection limits and the back-off after failed
//! logins, for both listeners. A leaf: it imports nothing from the crate.
//!
//! - [`Conns`] counts open connections per client address, and those that
//!   have not logged in yet, and refuses a connection past either limit at
//!   accept. A [`Ticket`] is one admitted connection; dropping it gives the
//!   place back.
//! - [`Logins`] remembers failed logins per address. After
//!   [`FREE_FAILURES`] within [`FAILURE_WINDOW_MS`], the address is refused
//!   for a while that doubles with each further failure (1 s … 60 s): every
//!   login from it, good token or not, is refused unchecked meanwhile, so
//!   guessing gains nothing and costs no store read. There is no per-user
//!   counter: a token names no user until it is found, and a lock per user
//!   would let anyone lock a user out.
//! - [`Summary`] turns a flood of one event into one log line per interval,
//!   with a count.
//!
//! An address is an IPv4 address, or the /64 prefix of an IPv6 one (what
//! one host is usually given).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Failed logins an address may make within [`FAILURE_WINDOW_MS`] before it
/// is refused for a while.
pub const FREE_FAILURES: u32 = 5;
/// How long failures are remembered, ms.
pub const FAILURE_WINDOW_MS: u64 = 60_000;
/// The longest refusal after failed logins, ms.
pub const MAX_BACKOFF_MS: u64 = 60_000;
/// Addresses [`Logins`] remembers at most; past this, entries whose window
/// has passed are dropped, and failures from new addresses go uncounted
/// until there is room (memory stays bounded under a spoofed-source flood).
const MAX_TRACKED: usize = 100_000;
/// One log line per this many ms, at most, per [`Summary`].
const SUMMARY_INTERVAL_MS: u64 = 10_000;

/// The address limits count by: IPv4 as it is, IPv6 by its /64.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}

/// Counts one kind of event and logs, at most once per interval, how many
/// there were since the last line.
pub struct Summary {
    /// What is counted, e.g. "connections refused: over max_connections_per_ip".
    what: &'static str,
    count: AtomicU64,
    /// When the last line was written, ms.
    last: Mutex<u64>,
}

impl Summary {
    /// A summary of `what`.
    pub const fn new(what: &'static str) -> Summary {
        Summary {
            what,
            count: AtomicU64::new(0),
            last: Mutex::new(0),
        }
    }

    /// Counts one event; writes a warning line if the interval has passed.
    pub fn note(&self, now: u64) {
        self.count.fetch_add(1, Ordering::Relaxed);
        let Ok(mut last) = self.last.try_lock() else {
            return; // another thread is writing the line
        };
        if now.saturating_sub(*last) >= SUMMARY_INTERVAL_MS {
            *last = now;
            let count = self.count.swap(0, Ordering::Relaxed);
            tracing::warn!(count, "{} (count since the last such line)", self.what);
        }
    }
}

/// Why [`Conns::admit`] refused a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// The address has its limit of open connections.
    PerAddress,
    /// The address has its limit of connections that have not logged in.
    Unauthenticated,
}

/// Open connections per client address, for one listener.
pub struct Conns {
    /// Open connections one address may have; 0 = no limit.
    per_address: u32,
    /// Connections one address may have that are not logged in; 0 = no limit.
    unauth_per_address: u32,
    counts: Mutex<HashMap<IpAddr, Counts>>,
    /// Refusals, logged once per interval.
    pub refused: Summary,
}

#[derive(Default)]
struct Counts {
    open: u32,
    unauth: u32,
}

impl Conns {
    /// Limits for one listener (0 = no limit); `what` names the listener's
    /// refusals in the log.
    pub fn new(per_address: u32, unauth_per_address: u32, what: &'static str) -> Arc<Conns> {
        Arc::new(Conns {
            per_address,
            unauth_per_address,
            counts: Mutex::new(HashMap::new()),
            refused: Summary::new(what),
        })
    }

    /// Admits a new, not yet authenticated connection from `ip`, or says why not.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Ticket, Refused> {
        let key = client_key(ip);
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let c = counts.entry(key).or_default();
        if self.per_address != 0 && c.open >= self.per_address {
            return Err(Refused::PerAddress);
        }
        if self.unauth_per_address != 0 && c.unauth >= self.unauth_per_address {
            return Err(Refused::Unauthenticated);
        }
        c.open += 1;
        c.unauth += 1;
        Ok(Ticket {
            conns: self.clone(),
            key,
            unauth: true,
        })
    }

    /// Addresses with at least one connection (for tests and metrics).
    pub fn addresses(&self) -> usize {
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// One admitted connection; dropping it frees its place.
pub struct Ticket {
    conns: Arc<Conns>,
    key: IpAddr,
    /// Still counted as not logged in.
    unauth: bool,
}

impl Ticket {
    /// Still counted as not logged in.
    pub fn is_unauthenticated(&self) -> bool {
        self.unauth
    }

    /// The connection logged in: it no longer counts against the limit of
    /// connections waiting to log in.
    pub fn authenticated(&mut self) {
        if std::mem::take(&mut self.unauth) {
            let mut counts = self.conns.counts.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(c) = counts.get_mut(&self.key) {
                c.unauth = c.unauth.saturating_sub(1);
            }
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut counts = self.conns.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = counts.get_mut(&self.key) {
            c.open = c.open.saturating_sub(1);
            if self.unauth {
                c.unauth = c.unauth.saturating_sub(1);
            }
            if c.open == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

/// Failed logins per address, shared by both listeners.
pub struct Logins {
    failures: Mutex<HashMap<IpAddr, Failures>>,
    /// Failed logins, logged once per interval.
    pub failed: Summary,
    /// Logins refused unchecked during a back-off, logged once per interval.
    pub refused: Summary,
}

struct Failures {
    /// Failures since `since`.
    count: u32,
    /// Start of the current window, ms.
    since: u64,
    /// Logins are refused until then, ms.
    until: u64,
}

impl Default for Logins {
    fn default() -> Self {
        Logins {
            failures: Mutex::new(HashMap::new()),
            failed: Summary::new("failed logins"),
            refused: Summary::new(
                "logins refused unchecked: the address is backing off after failed logins",
            ),
        }
    }
}

impl Logins {
    /// `Ok` if `ip` may try to log in at `now`; else the ms to wait.
    pub fn check(&self, ip: IpAddr, now: u64) -> Result<(), u64> {
        let until = {
            let failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
            failures.get(&client_key(ip)).map_or(0, |f| f.until)
        };
        if until > now {
            self.refused.note(now);
            return Err(until - now);
        }
        Ok(())
    }

    /// Records a failed login from `ip` at `now`.
    pub fn failed(&self, ip: IpAddr, now: u64) {
        self.failed.note(now);
        let key = client_key(ip);
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if failures.len() >= MAX_TRACKED && !failures.contains_key(&key) {
            failures
                .retain(|_, f| now.saturating_sub(f.since) < FAILURE_WINDOW_MS || f.until > now);
            if failures.len() >= MAX_TRACKED {
                return;
            }
        }
        let f = failures.entry(key).or_insert(Failures {
            count: 0,
            since: now,
            until: 0,
        });
        if now.saturating_sub(f.since) >= FAILURE_WINDOW_MS && f.until <= now {
            f.count = 0;
            f.since = now;
        }
        f.count += 1;
        if f.count > FREE_FAILURES {
            let doublings = (f.count - FREE_FAILURES - 1).min(16);
            let backoff = (1000u64 << doublings).min(MAX_BACKOFF_MS);
            f.until = now + backoff;
            // The window runs on while the address keeps failing.
            f.since = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    #[test]
    fn logins_back_off_after_free_failures_and_double() {
        let l = Logins::default();
        for _ in 0..FREE_FAILURES {
            assert_eq!(l.check(A, 1000), Ok(()));
            l.failed(A, 1000);
        }
        assert_eq!(l.check(A, 1000), Ok(()));
        l.failed(A, 1000); // the sixth: 1 s
        assert_eq!(l.check(A, 1500), Err(500));
        assert_eq!(l.check(B, 1500), Ok(()), "other addresses are not affected");
        assert_eq!(l.check(A, 2000), Ok(()));
        l.failed(A, 2000); // the seventh: 2 s
        assert_eq!(l.check(A, 2001), Err(1999));
        for i in 0..20 {
            l.failed(A, 5000 + i);
        }
        assert_eq!(l.check(A, 5020), Err(MAX_BACKOFF_MS - 1));
        // Long after the last failure, the slate is clean again.
        let later = 5019 + MAX_BACKOFF_MS + FAILURE_WINDOW_MS;
        assert_eq!(l.check(A, later), Ok(()));
        l.failed(A, later);
        assert_eq!(l.check(A, later), Ok(()));
    }

    #[test]
    fn ipv6_hosts_count_by_their_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_key(a), client_key(b));
        assert_ne!(client_key(a), client_key(c));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(client_key(mapped), A);
    }

    #[test]
    fn tickets_count_open_and_unauthenticated_connections() {
        let conns = Conns::new(3, 2, "test");
        let mut t1 = conns.admit(A).unwrap();
        let _t2 = conns.admit(A).unwrap();
        assert_eq!(conns.admit(A).err(), Some(Refused::Unauthenticated));
        t1.authenticated();
        let t3 = conns.admit(A).unwrap();
        assert_eq!(conns.admit(A).err(), Some(Refused::PerAddress));
        assert!(conns.admit(B).is_ok(), "other addresses are not affected");
        drop(t3);
        drop(t1);
        let _t4 = conns.admit(A).unwrap();
        assert_eq!(conns.addresses(), 1);
    }
}
