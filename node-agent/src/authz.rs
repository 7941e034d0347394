//! Who may call the agent. mTLS proves that a client holds a certificate signed by the CA; the CA may
//! sign other certificates too (other components, other tenants' tooling), so the agent also
//! requires the coordinator's own identity: a DNS or URI subject alternative name, or the common
//! name, listed in `--client-identity`.

use std::sync::Arc;

use tonic::{Request, Status};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

#[derive(Clone, Debug)]
pub struct ClientIdentity {
    allowed: Arc<Vec<String>>,
}

impl ClientIdentity {
    pub fn new(allowed: Vec<String>) -> Self {
        Self {
            allowed: Arc::new(allowed),
        }
    }

    /// Whether a DER certificate carries one of the allowed identities; `Err` says why not.
    pub fn check(&self, der: &[u8]) -> Result<(), String> {
        let names = identities(der)?;
        if names.iter().any(|n| self.allowed.contains(n)) {
            Ok(())
        } else {
            Err(format!(
                "the client certificate's identities ({}) are not among the allowed ones ({})",
                names.join(", "),
                self.allowed.join(", ")
            ))
        }
    }
}

/// The DNS and URI SANs and the CNs of a certificate.
fn identities(der: &[u8]) -> Result<Vec<String>, String> {
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| format!("the client certificate cannot be parsed: {e}"))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) => names.push((*d).to_string()),
                GeneralName::URI(u) => names.push((*u).to_string()),
                _ => {}
            }
        }
    }
    for cn in cert.subject().iter_common_name() {
        if let Ok(s) = cn.as_str() {
            names.push(s.to_string());
        }
    }
    Ok(names)
}

impl tonic::service::Interceptor for ClientIdentity {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let certs = req
            .peer_certs()
            .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
        let leaf = certs
            .first()
            .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
        match self.check(leaf.as_ref()) {
            Ok(()) => Ok(req),
            Err(why) => {
                tracing::warn!(reason = %why, "refused a client");
                Err(Status::permission_denied(why))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(cn: &str, sans: &[&str]) -> Vec<u8> {
        let mut params =
            rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn only_the_configured_identity_passes() {
        let id = ClientIdentity::new(vec!["stowage-coordinator".into()]);
        assert!(id.check(&cert("x", &["stowage-coordinator"])).is_ok());
        assert!(id.check(&cert("stowage-coordinator", &[])).is_ok());
        let err = id
            .check(&cert("intruder", &["intruder.example"]))
            .unwrap_err();
        assert!(err.contains("intruder.example"), "{err}");
        assert!(id.check(b"not a certificate").is_err());
    }
}
