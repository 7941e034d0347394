//! The gRPC listener's mutual TLS, re-read when its files change. Each accepted connection is
//! handshaken with the newest good configuration (certificate, key and client CA), so a renewed
//! certificate is served without a restart; connections already open keep theirs. Files that do
//! not make a good configuration (half-written, a key that does not match the certificate) leave
//! the previous one in place, and the log says why.
//!
//! tonic's built-in `tls_config` reads its files once, hence this listener; tonic still sees the
//! peer's certificates (`Request::peer_certs`), which the client-identity check needs.

use std::path::PathBuf;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

/// A handshake that has not finished by then is dropped (a client that connects and says nothing).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; connections beyond are closed at once rather than queued.
const MAX_HANDSHAKES: usize = 128;
/// How often the files are compared even without an inotify event.
const POLL: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what} holds no PEM certificate")]
    NoCertificate { what: &'static str },
    #[error("{what} is not valid PEM: {source}")]
    Pem {
        what: &'static str,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("the client CA cannot be used: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("the certificate and key cannot be served: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The three files, as named by --tls-cert, --tls-key and --tls-client-ca.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

impl TlsFiles {
    fn paths(&self) -> Vec<PathBuf> {
        vec![self.cert.clone(), self.key.clone(), self.client_ca.clone()]
    }
}

fn certificates(what: &'static str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem { what, source })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { what });
    }
    Ok(certs)
}

/// A server configuration that requires a client certificate signed by `ca` (which client the
/// agent then serves is the client-identity check's business) and speaks HTTP/2 only.
pub fn server_config(cert: &[u8], key: &[u8], ca: &[u8]) -> Result<rustls::ServerConfig, TlsError> {
    let chain = certificates("the agent's certificate", cert)?;
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|source| TlsError::Pem {
        what: "the agent's key",
        source,
    })?;
    let mut roots = RootCertStore::empty();
    for c in certificates("the client CA", ca)? {
        roots.add(c)?;
    }
    // The provider tonic and kube use here (ring), named rather than left to a process default.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
            .build()?;
    // with_single_cert refuses a key that does not match the certificate (a half-done rotation).
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

fn from_contents(contents: &[Vec<u8>]) -> Result<rustls::ServerConfig, TlsError> {
    match contents {
        [cert, key, ca] => server_config(cert, key, ca),
        _ => Err(TlsError::NoCertificate {
            what: "the agent's certificate",
        }),
    }
}

/// The current configuration, swapped whole when the files change.
#[derive(Clone)]
pub struct ReloadingConfig {
    current: Arc<RwLock<Arc<rustls::ServerConfig>>>,
}

impl ReloadingConfig {
    /// Reads the files now (an error here stops the agent: it has nothing to serve with), then
    /// follows their changes until `shutdown`.
    pub fn start(files: &TlsFiles, shutdown: CancellationToken) -> Result<Self, StartError> {
        let paths = files.paths();
        let contents = paths
            .iter()
            .zip([
                "the agent's certificate",
                "the agent's key",
                "the client CA",
            ])
            .map(|(p, what)| stowage_common::runtime::read_pem(what, Some(p)))
            .collect::<Result<Vec<_>, _>>()?;
        let reloading = Self {
            current: Arc::new(RwLock::new(Arc::new(from_contents(&contents)?))),
        };
        let mut changes = stowage_common::tls_files::watch(paths, POLL);
        let target = reloading.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    changed = changes.changed() => if changed.is_err() { return },
                }
                let contents = changes.borrow_and_update().clone();
                match from_contents(&contents) {
                    Ok(config) => {
                        *target
                            .current
                            .write()
                            .unwrap_or_else(PoisonError::into_inner) = Arc::new(config);
                        tracing::info!(
                            "TLS files changed: new connections use the new certificate, key and client CA"
                        );
                    }
                    Err(e) => tracing::warn!(error = %e,
                        "TLS files changed but do not make a usable configuration; still serving the previous one"),
                }
            }
        });
        Ok(reloading)
    }

    fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(Arc::clone(
            &self.current.read().unwrap_or_else(PoisonError::into_inner),
        ))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Read(#[from] stowage_common::runtime::RuntimeError),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// The connections of `listener` after their TLS handshake, for tonic's `serve_with_incoming`.
/// Accepting stops at `shutdown`.
pub fn incoming(
    listener: TcpListener,
    tls: ReloadingConfig,
    shutdown: CancellationToken,
) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = mpsc::channel(16);
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors, mostly: a pause instead of a busy loop.
                    tracing::warn!(error = %e, "accepting a gRPC connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = Arc::clone(&handshakes).try_acquire_owned() else {
                tracing::debug!(%peer, "too many TLS handshakes in progress; closed a connection");
                continue;
            };
            let acceptor = tls.acceptor();
            let tx = tx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let _ = tcp.set_nodelay(true);
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => {
                        tracing::info!(%peer, error = %e, "refused a connection: TLS handshake failed")
                    }
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issued() -> (String, String, String) {
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = rcgen::CertifiedIssuer::self_signed(ca, ca_key).expect("ca");
        let key = rcgen::KeyPair::generate().expect("key");
        let leaf = rcgen::CertificateParams::new(vec!["agent".to_string()])
            .expect("params")
            .signed_by(&key, &ca)
            .expect("sign");
        (leaf.pem(), key.serialize_pem(), ca.pem())
    }

    #[test]
    fn a_matching_set_serves_and_garbage_or_a_mismatched_key_is_refused_with_a_sentence() {
        let (cert, key, ca) = issued();
        let config = server_config(cert.as_bytes(), key.as_bytes(), ca.as_bytes()).expect("good");
        assert_eq!(config.alpn_protocols, vec![b"h2".to_vec()]);

        let err = server_config(b"not pem", key.as_bytes(), ca.as_bytes()).expect_err("garbage");
        assert_eq!(
            err.to_string(),
            "the agent's certificate holds no PEM certificate"
        );
        // A rotation seen half-way: the new certificate beside the old key.
        let (_, other_key, _) = issued();
        let err = server_config(cert.as_bytes(), other_key.as_bytes(), ca.as_bytes())
            .expect_err("mismatch");
        assert!(
            err.to_string()
                .starts_with("the certificate and key cannot be served"),
            "{err}"
        );
    }
}
