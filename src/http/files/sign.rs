//! Signed download URLs:
//! `/v1/files/{id}?exp=<unix s>&sig=<hex HMAC-SHA256(key, "{id}:{exp}")>`.
//!
//! The key is 32 random bytes kept in `<data_dir>/files.secret` (64 hex
//! characters and a newline, mode 0600), made at first start. Losing or
//! replacing the file invalidates every URL handed out; nothing else depends
//! on it. The MAC covers `exp` exactly as written in the URL, so a URL can be
//! neither extended nor moved to another file.

use std::fs;
use std::io::{self, Write};
use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Key length, bytes.
const KEY_LEN: usize = 32;
/// Longest `exp` accepted: the digits of `u64::MAX`.
const MAX_EXP_DIGITS: usize = 20;

/// Signs and checks download URLs with the server's key.
pub struct Signer {
    /// The HMAC key; never leaves the process except through `files.secret`.
    key: [u8; KEY_LEN],
}

/// The outcome of checking a URL's query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Neither `exp` nor `sig` present: the request relies on a token, if any.
    Absent,
    /// The signature matches and `exp` is in the future.
    Valid,
    /// Malformed, missing half, or not made with this server's key.
    BadSignature,
    /// A genuine signature whose `exp` has passed.
    Expired,
}

impl Signer {
    /// Reads the key from `path`, or creates the file with a new random key.
    /// A file that exists but does not hold a key is an error, not replaced:
    /// replacing it would silently break every URL already handed out.
    pub fn open(path: &Path) -> io::Result<Signer> {
        match fs::read_to_string(path) {
            Ok(text) => {
                let mut key = [0u8; KEY_LEN];
                hex::decode_to_slice(text.trim(), &mut key).map_err(|e| {
                    let message = format!("not a {KEY_LEN}-byte hex key: {e}");
                    io::Error::new(io::ErrorKind::InvalidData, message)
                })?;
                Ok(Signer { key })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let key: [u8; KEY_LEN] = rand::random();
                write_secret(path, &key)?;
                tracing::info!(path = %path.display(), "file URL signing key created");
                Ok(Signer { key })
            }
            Err(e) => Err(e),
        }
    }

    /// A signer with a given key (tests).
    #[cfg(test)]
    fn with_key(key: [u8; KEY_LEN]) -> Signer {
        Signer { key }
    }

    /// The signed path and query for file `id`, valid until `exp` (unix s).
    pub fn url(&self, id: &str, exp: u64) -> String {
        let exp = exp.to_string();
        let sig = hex::encode(self.mac(id, &exp).finalize().into_bytes());
        format!("/v1/files/{id}?exp={exp}&sig={sig}")
    }

    /// The signed path and query of file `id`'s thumbnail, valid until `exp`
    /// (unix s). The MAC covers `{id}/thumbnail`, so it opens the thumbnail
    /// only, never the file.
    pub fn thumbnail_url(&self, id: &str, exp: u64) -> String {
        let exp = exp.to_string();
        let sig = hex::encode(
            self.mac(&thumbnail_subject(id), &exp)
                .finalize()
                .into_bytes(),
        );
        format!("/v1/files/{id}/thumbnail?exp={exp}&sig={sig}")
    }

    /// Checks the `exp` and `sig` parameters of `query` for file `id` at
    /// `now` (unix s). The signature comparison is constant-time.
    pub fn verify(&self, id: &str, query: &str, now: u64) -> Verdict {
        let (exp, sig) = (param(query, "exp"), param(query, "sig"));
        let (exp, sig) = match (exp, sig) {
            (None, None) => return Verdict::Absent,
            (Some(exp), Some(sig)) => (exp, sig),
            _ => return Verdict::BadSignature,
        };
        if exp.is_empty() || exp.len() > MAX_EXP_DIGITS || !exp.bytes().all(|b| b.is_ascii_digit())
        {
            return Verdict::BadSignature;
        }
        let mut given = [0u8; 32];
        if hex::decode_to_slice(sig, &mut given).is_err() {
            return Verdict::BadSignature;
        }
        if self.mac(id, exp).verify_slice(&given).is_err() {
            return Verdict::BadSignature;
        }
        match exp.parse::<u64>() {
            Ok(exp) if exp > now => Verdict::Valid,
            _ => Verdict::Expired,
        }
    }

    fn mac(&self, id: &str, exp: &str) -> Hmac<Sha256> {
        // HMAC accepts keys of any length: this cannot fail.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.key)
            .expect("HMAC takes keys of any length");
        mac.update(id.as_bytes());
        mac.update(b":");
        mac.update(exp.as_bytes());
        mac
    }
}

/// What a thumbnail URL's MAC covers, in place of the file id.
pub fn thumbnail_subject(id: &str) -> String {
    format!("{id}/thumbnail")
}

/// The value of the first `name=value` pair of a raw query string.
fn param<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Writes the key next to `path`, syncs it and renames it into place, so a
/// crash leaves either no file or a whole one.
fn write_secret(path: &Path, key: &[u8; KEY_LEN]) -> io::Result<()> {
    let tmp = path.with_extension("secret.tmp");
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&tmp)?;
    file.write_all(format!("{}\n", hex::encode(key)).as_bytes())?;
    file.sync_all()?;
    drop(file);
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{Signer, Verdict};

    const ID: &str = "0123456789abcdef0123456789abcdef";

    fn query(url: &str) -> &str {
        url.split_once('?').map(|(_, q)| q).unwrap_or("")
    }

    #[test]
    fn round_trip_and_expiry() {
        let s = Signer::with_key([7; 32]);
        let url = s.url(ID, 1000);
        assert!(url.starts_with(&format!("/v1/files/{ID}?exp=1000&sig=")));
        assert_eq!(s.verify(ID, query(&url), 999), Verdict::Valid);
        assert_eq!(s.verify(ID, query(&url), 1000), Verdict::Expired);
    }

    #[test]
    fn tampering_is_caught() {
        let s = Signer::with_key([7; 32]);
        let url = s.url(ID, 1000);
        let q = query(&url);
        let other = "f".repeat(32);
        assert_eq!(s.verify(&other, q, 0), Verdict::BadSignature);
        let later = q.replace("exp=1000", "exp=2000");
        assert_eq!(s.verify(ID, &later, 0), Verdict::BadSignature);
        let padded = q.replace("exp=1000", "exp=01000");
        assert_eq!(s.verify(ID, &padded, 0), Verdict::BadSignature);
        let sig_pos = q.find("sig=").unwrap() + 4;
        let mut flipped = q.to_owned();
        let c = if &q[sig_pos..sig_pos + 1] == "0" {
            "1"
        } else {
            "0"
        };
        flipped.replace_range(sig_pos..sig_pos + 1, c);
        assert_eq!(s.verify(ID, &flipped, 0), Verdict::BadSignature);
        let other_key = Signer::with_key([8; 32]);
        assert_eq!(other_key.verify(ID, q, 0), Verdict::BadSignature);
    }

    #[test]
    fn thumbnail_urls_open_the_thumbnail_only() {
        let s = Signer::with_key([7; 32]);
        let url = s.thumbnail_url(ID, 1000);
        assert!(url.starts_with(&format!("/v1/files/{ID}/thumbnail?exp=1000&sig=")));
        let q = query(&url);
        let subject = super::thumbnail_subject(ID);
        assert_eq!(s.verify(&subject, q, 999), Verdict::Valid);
        assert_eq!(s.verify(ID, q, 999), Verdict::BadSignature);
        let file = s.url(ID, 1000);
        assert_eq!(s.verify(&subject, query(&file), 999), Verdict::BadSignature);
    }

    #[test]
    fn malformed_queries() {
        let s = Signer::with_key([7; 32]);
        assert_eq!(s.verify(ID, "", 0), Verdict::Absent);
        assert_eq!(s.verify(ID, "x=1", 0), Verdict::Absent);
        for q in [
            "exp=1",
            "sig=00",
            "exp=&sig=",
            "exp=-1&sig=00",
            "exp=1&sig=zz",
            "exp=1&sig=%00",
            "exp=999999999999999999999999&sig=00",
        ] {
            assert_eq!(s.verify(ID, q, 0), Verdict::BadSignature, "{q}");
        }
    }

    #[test]
    fn key_file_is_created_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("files.secret");
        let a = Signer::open(&path).unwrap();
        let b = Signer::open(&path).unwrap();
        assert_eq!(a.key, b.key);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(&path, "not hex").unwrap();
        assert!(Signer::open(&path).is_err());
    }
}
