//! HTTPS without a proxy in front: the mobile libraries only speak https,
//! and a small deployment should not need a reverse proxy just for that.
//! rustls with the ring provider (the one the ChurnZero client already
//! uses), HTTP/2 and HTTP/1.1 offered by ALPN.

use crate::config::TlsFiles;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;

/// What is wrong with the TLS files, naming the file and its flag.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("--tls-cert {path}: {reason}")]
    Cert { path: String, reason: String },
    #[error("--tls-key {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("--tls-cert {cert} with --tls-key {key}: {reason}")]
    Pair {
        cert: String,
        key: String,
        reason: String,
    },
}

/// ALPN protocols offered, preferred first.
pub const ALPN_H2: &[u8] = b"h2";
const ALPN_HTTP1: &[u8] = b"http/1.1";

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read the file: {e}"))
}

/// Loads the certificate chain and key, and checks that they belong together.
pub fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let cert_path = files.cert.display().to_string();
    let key_path = files.key.display().to_string();
    let cert_error = |reason: String| TlsError::Cert {
        path: cert_path.clone(),
        reason,
    };
    let cert_pem = read(&files.cert).map_err(cert_error)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_error(format!("not a valid PEM certificate file: {e}")))?;
    if chain.is_empty() {
        return Err(cert_error(
            "no certificate in it (expected a PEM `BEGIN CERTIFICATE` block)".into(),
        ));
    }
    let key_error = |reason: String| TlsError::Key {
        path: key_path.clone(),
        reason,
    };
    let key_pem = read(&files.key).map_err(key_error)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => key_error(
            "no private key in it (expected a PEM `BEGIN PRIVATE KEY`, `RSA PRIVATE KEY` or \
             `EC PRIVATE KEY` block)"
                .into(),
        ),
        e => key_error(format!("not a valid PEM key file: {e}")),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Pair {
            cert: cert_path.clone(),
            key: key_path.clone(),
            reason: e.to_string(),
        })?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Pair {
            cert: cert_path.clone(),
            key: key_path.clone(),
            reason: match e {
                rustls::Error::InconsistentKeys(_) => {
                    "the key does not belong to the certificate".to_string()
                }
                e => format!("rustls refuses them: {e}"),
            },
        })?;
    config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()];
    Ok(Arc::new(config))
}
