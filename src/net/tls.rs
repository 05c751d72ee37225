//! TLS for the protocol listener: the certificate and key are loaded and
//! checked at start-up (errors name the file), and each connection's rustls
//! `ServerConnection` is driven by the event loop like the socket under it
//! (`net::conn`): no thread per connection. TLS 1.2 and 1.3 only (rustls
//! has nothing older).

use std::path::Path;
use std::sync::Arc;

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
