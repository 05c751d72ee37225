//! TLS for both listeners: the certificate and key are loaded and checked
//! at start-up (errors name the file), and reloaded on demand (SIGHUP) for
//! the connections that come next. On the protocol listener each
//! connection's rustls `ServerConnection` is driven by the event loop like
//! the socket under it (`net::conn`): no thread per connection. The HTTP
//! listener takes the same configuration (`http`). TLS 1.2 and 1.3 only
//! (rustls has nothing older).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Plaintext a connection may have buffered in rustls, waiting for the
/// socket, before writes to it return short (backpressure, as a socket).
pub const BUFFER_LIMIT: usize = 256 * 1024;

/// Why the TLS configuration could not be built; names the file.
#[derive(Debug, thiserror::Error)]
#[error("{}: {message}", path.display())]
pub struct TlsError {
    /// The certificate or key file.
    pub path: std::path::PathBuf,
    /// What is wrong with it.
    pub message: String,
}

/// The server configuration for `cert` (PEM chain) and `key` (PEM private key).
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let err = |path: &Path, message: String| TlsError {
        path: path.to_owned(),
        message,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| err(cert, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| err(cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(err(cert, "no certificate in the file".into()));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| err(key, e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| err(cert, e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| {
            err(
                key,
                format!("does not match the certificate, or is not usable: {e}"),
            )
        })?;
    Ok(Arc::new(config))
}

/// The certificate in use, and where it came from: [`Certs::reload`] reads
/// the files again, and each new connection takes [`Certs::current`].
pub struct Certs {
    cert: PathBuf,
    key: PathBuf,
    current: ArcSwap<rustls::ServerConfig>,
}

impl Certs {
    /// Loads `cert` and `key`; an error names the file.
    pub fn load(cert: &Path, key: &Path) -> Result<Certs, TlsError> {
        Ok(Certs {
            current: ArcSwap::new(server_config(cert, key)?),
            cert: cert.to_owned(),
            key: key.to_owned(),
        })
    }

    /// The configuration for the next connection.
    pub fn current(&self) -> Arc<rustls::ServerConfig> {
        self.current.load_full()
    }

    /// Reads the files again. On an error (a renewal half written, a key
    /// that does not match) the certificate in use stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        self.current.store(server_config(&self.cert, &self.key)?);
        Ok(())
    }
}

/// A CA and a server certificate it signed, PEM-encoded: what
/// `tern gen-cert` writes, for trying TLS without a real CA (and for the
/// tests and the load generator).
pub struct Pki {
    /// The CA certificate: what clients trust (`--ca`).
    pub ca: String,
    /// The server certificate (`tls_cert`).
    pub cert: String,
    /// The server's private key, PKCS#8 (`tls_key`).
    pub key: String,
}

impl Pki {
    /// A new CA named `ca_name` and a certificate for `names` (DNS names or
    /// IP addresses), valid for a year. The CA's key is not kept: to renew,
    /// make a new pair.
    pub fn generate(ca_name: &str, names: &[String]) -> Result<Pki, rcgen::Error> {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        // An hour back, for clocks a little behind.
        let now = time::OffsetDateTime::from_unix_timestamp(unix - 3600)
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
        let year = time::Duration::days(365);
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, ca_name);
        (ca_params.not_before, ca_params.not_after) = (now, now + year);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names.to_vec())?;
        (params.not_before, params.not_after) = (now, now + year);
        let cert = params.signed_by(&key, &ca)?;
        Ok(Pki {
            ca: ca.pem(),
            cert: cert.pem(),
            key: key.serialize_pem(),
        })
    }

    /// Writes `ca.pem`, `cert.pem` and `key.pem` (mode 0600) under `dir`.
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("ca.pem"), &self.ca)?;
        std::fs::write(dir.join("cert.pem"), &self.cert)?;
        let mut key = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(dir.join("key.pem"))?;
        key.write_all(self.key.as_bytes())
    }
}
